# The module Zappa's handler (zappa.handler.lambda_handler) reads at start-up: what
# `zappa package` writes from zappa_settings.json ({"django_settings": "clicks.settings"}),
# kept here so that SAM (template.yaml, DjangoExampleFunction) and `make demo DJANGO=1` run
# Zappa's own handler unchanged. A project deployed with `zappa deploy` does not need it.
EXCEPTION_HANDLER = None
DEBUG = False
LOG_LEVEL = "INFO"
BINARY_SUPPORT = False
CONTEXT_HEADER_MAPPINGS: dict[str, str] = {}
DOMAIN = None
BASE_PATH = None
ENVIRONMENT_VARIABLES: dict[str, str] = {}
API_STAGE = "demo"
PROJECT_NAME = "pgbroker-django-example"
SETTINGS_FILE = None
DJANGO_SETTINGS = "clicks.settings"
AWS_EVENT_MAPPING: dict[str, list[str]] = {}
AWS_BOT_EVENT_MAPPING: dict[str, str] = {}
COGNITO_TRIGGER_MAPPING: dict[str, str] = {}
ASYNC_RESPONSE_TABLE = ""
ADDITIONAL_TEXT_MIMETYPES: list[str] = []

from django.apps import AppConfig


class DjangoAppConfig(AppConfig):
    name = "devtools.djangoapp"
    label = "djangoapp"

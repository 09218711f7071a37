# pgbroker — every task a developer or CI runs goes through here.
# `make demo` and `make test` work on a fresh machine: they create .venv and install what they need.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PROTO_OUT := client/lambda_client/_proto/pgbroker/v1

.PHONY: install proto proto-check test test-dbapi20 test-large test-client-pythons \
        sqlalchemy-suite sqlalchemy-suite-ci django-suite lint run demo bench chaos validate image \
        deploy clean

IMAGE    ?= pgbroker:dev
PLATFORM ?= linux/arm64

$(STAMP): pyproject.toml client/pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "pgbroker needs Python 3.11 or newer"'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ./client -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Regenerate the Python code for the wire contract. The path mapping makes the generated
# modules import each other as lambda_client._proto.pgbroker.v1 (the client ships alone).
proto: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m grpc_tools.protoc \
	  -Ilambda_client/_proto=protos \
	  --python_out=client --grpc_python_out=client --mypy_out=client --mypy_grpc_out=client \
	  protos/pgbroker/v1/broker.proto

# Fails when the committed generated code is not what `make proto` would write.
proto-check: $(STAMP)
	$(PY) -m pytest -q tests/test_proto_fresh.py

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# The PEP 249 compliance suite (dbapi20) against lambda_client.dbapi (also part of `make test`),
# then the same suite, unmodified, against pg8000's DB-API for comparison (its failures are
# pg8000's and do not fail the target).
test-dbapi20: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests/lambda_client/test_dbapi20.py
	-PGBROKER_DBAPI20_COMPARE=1 $(PY) -m pytest -q -p no:cacheprovider -k Pg8000 \
	  tests/lambda_client/test_dbapi20.py

# Streamed reads of 5 million rows and 200 MB of bytea with both sides' memory sampled, and
# Django's iterator() over a million rows (minutes on a shared machine; skipped by `make test`).
test-large: $(STAMP)
	PGBROKER_LARGE_TESTS=1 $(PY) -m pytest -p no:cacheprovider tests/lambda_client/test_stream_large.py \
	  tests/lambda_client/test_django_backend.py::test_iterator_over_a_million_rows_keeps_memory_bounded \
	  -s $(PYTEST_ARGS)

# The client distribution alone (pip install ./client pytest, one .venv-client-<version> each)
# on the oldest and newest Python it supports, from pyenv, against a broker run from .venv.
CLIENT_PYTHONS ?= 3.10 3.13
test-client-pythons: $(STAMP)
	$(PY) -m devtools.clientpythons $(CLIENT_PYTHONS)

# SQLAlchemy's and Alembic's dialect compliance suites against postgresql+pgbroker (through a
# real broker) and stock postgresql+pg8000, on one temporary Postgres, counts side by side; a
# pgbroker failure not in tests/sqlalchemy_suite/expected_failures.toml fails it. The -ci
# target runs that file's fixed subset, without the generic-requirements baseline.
sqlalchemy-suite: $(STAMP)
	$(PY) -m devtools.sqlasuite $(ARGS)

sqlalchemy-suite-ci: $(STAMP)
	$(PY) -m devtools.sqlasuite --ci $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-logo

# Django's own test suite (the 5.2 sdist, cached in .cache/) on the stock postgresql backend and
# on lambda_client.django through brokers, in one run, counts side by side; fails on a test that
# fails only through the broker. CI=1: the fixed quick subset; ARGS: app labels, --only, --extra.
# DJANGO=6.1: that series' suite, in a virtualenv of its own on pyenv's SUITE_PYTHON (3.12).
django-suite: $(STAMP)
	$(PY) -m devtools.djangosuite $(if $(CI),--ci) $(if $(DJANGO),--django $(DJANGO)) \
	  $(if $(SUITE_PYTHON),--suite-python $(SUITE_PYTHON)) $(ARGS)

# With PGBROKER_DATABASE_URL unset, demo.run starts an embedded Postgres beside the broker.
run: $(STAMP)
	$(PY) -m demo.run $(ARGS)

demo: $(STAMP)
	$(PY) -m demo $(if $(DJANGO),--django) $(ARGS)

bench: $(STAMP)
	$(PY) -m bench $(if $(QUICK),--quick) $(ARGS)

# The chaos suite, longer than in CI: more transfers and broker kills (tests/chaos/).
# Each scenario prints one JSON line with its figures.
CHAOS_TRANSFERS ?= 1000
CHAOS_KILLS ?= 5
chaos: $(STAMP)
	PGBROKER_CHAOS_TRANSFERS=$(CHAOS_TRANSFERS) PGBROKER_CHAOS_KILLS=$(CHAOS_KILLS) \
	  $(PY) -m pytest -p no:cacheprovider -q -s tests/chaos $(ARGS)

# The broker image for Fargate ARM64 (needs a Docker engine); PUSH=1 pushes IMAGE to its registry.
image:
	docker buildx build --platform $(PLATFORM) --tag $(IMAGE) $(if $(PUSH),--push,--load) .

# Offline checks of the deployment: sam validate --lint, sam build, the layers' grpc extensions
# (arm64 and x86_64), hadolint. Uses its own virtualenv (.venv-sam): aws-sam-cli pins its own boto3.
validate:
	bash deploy/validate.sh

# sam build (in validate), then sam deploy: --guided the first time, the answers saved in
# samconfig.toml after that. See docs/deploy.md for the parameters.
deploy: validate
	.venv-sam/bin/sam deploy $(if $(wildcard samconfig.toml),,--guided) $(ARGS)

clean:
	rm -rf $(VENV) .venv-client-* .venv-sam .mypy_cache .ruff_cache .pytest_cache .import_linter_cache .aws-sam

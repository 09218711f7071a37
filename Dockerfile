# syntax=docker/dockerfile:1
# pgbroker broker image: `make image` builds it for linux/arm64 (the Fargate task is ARM64).
# Two stages: the first installs the broker and its runtime dependencies (pyproject.toml's
# `dependencies`, no dev extras) into a virtualenv; the second copies only that virtualenv
# onto a clean slim base and runs it as an unprivileged user.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python -m venv /opt/pgbroker
# Dependencies rarely change: copy the project metadata first so this layer stays cached.
COPY pyproject.toml README.md LICENSE ./
COPY client/ client/
COPY broker/ broker/
RUN /opt/pgbroker/bin/pip install ./client .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="pgbroker" \
      org.opencontainers.image.description="Lambda-native Postgres pooling broker (gRPC)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/pgbroker/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PGBROKER_LISTEN=0.0.0.0:50051
# The RDS CA bundle, so sslmode=verify-full works against RDS and Aurora (template.yaml points
# sslrootcert at this path).
ADD --chmod=644 https://truststore.pki.rds.amazonaws.com/global/global-bundle.pem \
    /etc/ssl/certs/rds-global-bundle.pem
RUN groupadd --system --gid 10001 pgbroker \
 && useradd --system --uid 10001 --gid pgbroker --no-create-home \
    --home-dir /nonexistent --shell /usr/sbin/nologin pgbroker
COPY --from=build /opt/pgbroker /opt/pgbroker
USER 10001:10001
EXPOSE 50051
# The broker drains on SIGTERM: health NOT_SERVING, in-flight work finishes within
# PGBROKER_SHUTDOWN_GRACE, the pool closes, exit 0. ECS's stopTimeout must cover that.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "broker", "health"]
# Exec form: no shell in between, so SIGTERM reaches python itself.
# `docker run IMAGE stats` or `... health` runs the other subcommands.
ENTRYPOINT ["python", "-m", "broker"]
CMD ["run"]

# syntax=docker/dockerfile:1.7
#
# Switchboard gateway image: one image, every role.
#
#   docker build -t switchboard:dev .
#   docker run --rm -p 50051:50051 -p 8080:8080 switchboard:dev            # serve all, embedded default
#   docker run --rm switchboard:dev config check
#
# Kubernetes runs it twice per pod (`serve grpc`, `serve http`) and once as a Job (`migrate`):
# see deploy/k8s/. Needs BuildKit (the default builder of Docker 23+).

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------
# build: generate the protobuf code (never committed) and build wheels for the package and
# every runtime dependency, so the runtime stage installs offline and carries no build tools.
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src

# The code generators, at the versions pyproject's dev extra asks for (read from it, so the two
# never drift). Their grpcio and protobuf versions become constraints for the runtime wheels:
# generated code checks at import that the runtime is not older than the generator.
COPY pyproject.toml ./
RUN python -c "import re, tomllib; \
dev = tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['dev']; \
print('\n'.join(d for d in dev \
    if re.match(r'[A-Za-z0-9_.-]+', d).group(0).lower() in ('grpcio-tools', 'mypy-protobuf')))" \
        > /tmp/codegen.txt \
 && cat /tmp/codegen.txt \
 && python -m venv /opt/codegen \
 && /opt/codegen/bin/pip install --requirement /tmp/codegen.txt \
 && /opt/codegen/bin/pip freeze | grep -iE '^(grpcio|protobuf)==' > /tmp/constraints.txt \
 && cat /tmp/constraints.txt

COPY README.md ./
COPY protos ./protos
COPY clients ./clients
COPY channels ./channels
COPY gateway ./gateway

# The same command as the Makefile's proto target (protoc-gen-mypy_grpc is found on PATH).
RUN rm -f clients/python/switchboard/v1/*_pb2*.py clients/python/switchboard/v1/*_pb2*.pyi \
 && PATH="/opt/codegen/bin:$PATH" /opt/codegen/bin/python -m grpc_tools.protoc -I protos \
      --python_out=clients/python --pyi_out=clients/python \
      --grpc_python_out=clients/python --mypy_grpc_out=quiet:clients/python \
      protos/switchboard/v1/*.proto

# One wheel for the gateway, one per dependency (binary wheels only where they exist).
RUN python -m pip wheel --prefer-binary --wheel-dir /wheels \
      --constraint /tmp/constraints.txt . \
 && python -m zipfile -l /wheels/switchboard_gateway-*.whl | grep -q 'switchboard/v1/messaging_pb2_grpc.py' \
 && ls /wheels

# ---------------------------------------------------------------------------------------------
# runtime: python:3.11-slim, a virtualenv with the wheels only, non-root, no pip, no compilers.
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="switchboard" \
      org.opencontainers.image.description="Multi-channel messaging gateway: channel OAuth, webhooks in, Send API out, gRPC to your AI backend." \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/switchboard \
    PATH=/opt/switchboard/bin:$PATH \
    SWITCHBOARD_GRPC_ADDR=0.0.0.0:50051 \
    SWITCHBOARD_HTTP_ADDR=0.0.0.0:8080 \
    SWITCHBOARD_METRICS_ADDR=0.0.0.0:9464 \
    SWITCHBOARD_LOG_FORMAT=json

RUN groupadd --system --gid 10001 switchboard \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /var/lib/switchboard --shell /usr/sbin/nologin switchboard \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/switchboard

# Installed offline from the build stage's wheels (bind-mounted: they never land in a layer);
# bytecode is compiled now, so a read-only root filesystem costs nothing at start. Then the
# installer itself goes: the image runs the gateway and nothing else.
# (/usr/local/bin/python is the base image's interpreter; `python` on PATH is the virtualenv's.)
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    /usr/local/bin/python -m venv --without-pip /opt/switchboard \
 && /usr/local/bin/python -m pip --disable-pip-version-check --no-cache-dir \
      --python /opt/switchboard/bin/python \
      install --no-index --find-links /wheels switchboard-gateway \
 && /usr/local/bin/python -m pip --disable-pip-version-check uninstall --yes pip setuptools wheel \
 && /opt/switchboard/bin/python -c "import gateway.app, switchboard.v1.messaging_pb2_grpc" \
 && /opt/switchboard/bin/switchboard version

# Embedded default (SQLite, ./var) lands here when run without a database URL.
WORKDIR /var/lib/switchboard
USER 10001:10001

# gRPC, HTTP sidecar, metrics (9465: the http container's metrics port in the k8s pod).
EXPOSE 50051 8080 9464 9465
STOPSIGNAL SIGTERM

ENTRYPOINT ["switchboard"]
CMD ["serve", "all"]

# syntax=docker/dockerfile:1
# The two bases every Python image builds FROM, so that each app Dockerfile says only what is its own:
#   builder  a virtualenv at /opt/venv to pip-install into, in a discarded build stage;
#   runtime  the non-root user, the environment and the working directory the app's venv runs with.
# scripts/build-images.sh builds both first (--target builder / --target runtime) and passes them as
# BUILDER_IMAGE and RUNTIME_IMAGE; skaffold.yaml does the same with `requires`. By hand, from the
# repository root:
#   docker build -f images/python.Dockerfile --target builder -t mnist-mlops/python-builder:dev .
#   docker build -f images/python.Dockerfile --target runtime -t mnist-mlops/python-runtime:dev .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
# The host's package index settings, declared in every build stage built FROM this one;
# scripts/build-images.sh passes them when set. That stage is discarded, so they do not reach an image.
ONBUILD ARG PIP_INDEX_URL
ONBUILD ARG PIP_EXTRA_INDEX_URL
ONBUILD ARG PIP_TRUSTED_HOST
ONBUILD ARG PIP_DEFAULT_TIMEOUT
ONBUILD ARG PIP_PROXY
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
# An app's build stage then installs, in this order: its requirement set; the installer tools; our own
# packages (COPY'd to /src, then `pip install --no-deps --no-build-isolation --target /opt/ours`:
# installed from their pyproject.toml, not copied file by file, with the byte-code the read-only root
# filesystem needs; --no-deps because the requirement set is the audited, pinned list). Its runtime
# stage copies /opt/venv, then /opt/ours into the venv's site-packages: an edit of our code leaves
# the requirements' layer (2.4 GB for training) as it was, cached. venv bundles pip 23.0.1 and
# setuptools 66.1.1, which have known vulnerabilities and would ship in the images:
# `replace-installer-tools FILE` replaces them with the pins of requirements/mlflow-server.txt (one
# file sets them for every image), after the requirements, so an edit of that file reuses the
# requirements layer.
COPY images/replace-installer-tools.sh /usr/local/bin/replace-installer-tools

FROM ${PYTHON_IMAGE} AS runtime
# A numeric uid, so Kubernetes can verify runAsNonRoot without reading /etc/passwd; the chart's pods
# run as the same uid.
RUN groupadd --gid 10001 mnist \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin mnist
# The root filesystem is read-only at run time: byte-code is compiled when the builder installs, and
# HOME (pip, Keras and MLflow caches) is the /tmp emptyDir.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp
WORKDIR /tmp
USER 10001:10001

# syntax=docker/dockerfile:1
# aemon in a container: docker build -t aemon . && docker run -v aemon-data:/data -p 9108:9108 aemon
# See deploy/README.md ("Building the image": docker, podman, and buildah from a local base without a registry).

# Any Debian-based image with python3 (3.11+) and its venv module: the public python:3.11-slim-bookworm, or the
# local base that deploy/build-image.sh makes with debootstrap (--build-arg PYTHON_IMAGE=localhost/aemon-base:bookworm).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: the run-time virtual environment, installed and trimmed here, then copied whole into the final image
FROM ${PYTHON_IMAGE} AS build
# pip verifies TLS with the system's CA bundle (package ca-certificates), not its own copy: a build behind a
# TLS-inspecting proxy mounts the host's bundle there (deploy/build-image.sh does).
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1 PIP_CERT=/etc/ssl/certs/ca-certificates.crt
# binutils only for strip, in this stage only.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends binutils \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY aemon ./aemon
COPY models ./models
COPY deploy/smoke.py ./
# The pip cache is a build cache mount: it speeds up rebuilds and never reaches a layer.
# Trimmed, none of it read at run time: the pip and setuptools of the venv; libclang (a TensorFlow dependency for
# its code generators, never imported); TensorFlow's C++ headers (tensorflow/include, ~290 MB, for building custom
# ops); the packages' own test suites (directories named "tests"); and the symbol tables
# of TensorFlow's shared libraries (strip --strip-unneeded keeps the dynamic symbols; ~225 MB, most of it
# libtensorflow_cc). Libraries that auditwheel patched (the *.libs folders of numpy, scipy...) must not be
# stripped: they stop loading. Bytecode: pip compiles every module it installs (140 MB); only the modules
# that aemon's verbs and daemon import are compiled again (a module left out still works, compiled in
# memory when imported). deploy/smoke.py runs every verb and the daemon once in the trimmed environment: a
# trim that breaks one fails the build, and it compiles the bytecode of what they import.
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -m venv /opt/aemon \
    && /opt/aemon/bin/pip install /src \
    && /opt/aemon/bin/pip uninstall -y libclang \
    && /opt/aemon/bin/pip uninstall -y setuptools pip \
    && site=$(/opt/aemon/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
    && rm -rf "$site/tensorflow/include" \
    && find "$site" -depth -type d -name tests -exec rm -rf {} + \
    && find "$site/tensorflow" -type f \( -name '*.so' -o -name '*.so.*' \) -exec strip --strip-unneeded {} + \
    && find /opt/aemon -depth -type d -name __pycache__ -exec rm -rf {} + \
    && env -u PYTHONDONTWRITEBYTECODE /opt/aemon/bin/python /src/smoke.py

# --- final: that environment, run as a non-root user; no compiler, no pip, no caches
FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PATH=/opt/aemon/bin:$PATH
RUN useradd --system --uid 10001 --user-group --home-dir /data --no-create-home --shell /usr/sbin/nologin aemon \
    && mkdir -p /data \
    && chown aemon:aemon /data
COPY --from=build /opt/aemon /opt/aemon

# Inside the container only, listen on every interface so that -p 9108:9108 and other
# containers (Prometheus) reach /metrics. Outside a container the default stays 127.0.0.1.
ENV AEMON_ROOT=/data \
    AEMON_METRICS_HOST=0.0.0.0 \
    AEMON_METRICS_PORT=9108 \
    AEMON_LOG_FORMAT=json \
    MPLCONFIGDIR=/tmp/matplotlib \
    KERAS_HOME=/tmp/keras

VOLUME ["/data"]
EXPOSE 9108
USER 10001:10001
WORKDIR /data

# /healthz answers 200 while the daemon's loop is alive; urllib raises (exit 1) on anything else.
# The venv's python: the same path on every base (Debian's own python3 has no "python").
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/opt/aemon/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('AEMON_METRICS_PORT', '9108'), timeout=4)"]

# SIGTERM finishes the batch in hand (AEMON_SHUTDOWN_GRACE_SECONDS) and exits 0; SIGHUP reloads the bundle.
STOPSIGNAL SIGTERM
ENTRYPOINT ["aemon"]
CMD ["run"]

# syntax=docker/dockerfile:1
# aemon in a container: docker build -t aemon . && docker run -v aemon-data:/data -p 9108:9108 aemon
# See deploy/README.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: one wheel of aemon (it carries the default bundles), plus wheels of its dependencies
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY aemon ./aemon
COPY models ./models
RUN python -m pip wheel --wheel-dir /wheels .

# --- final: a virtual environment installed from those wheels only, run as a non-root user
FROM ${PYTHON_IMAGE}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PATH=/opt/aemon/bin:$PATH
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv /opt/aemon \
    && /opt/aemon/bin/pip install --no-index --find-links=/wheels /wheels/aemon-*.whl \
    && useradd --system --uid 10001 --user-group --home-dir /data --no-create-home --shell /usr/sbin/nologin aemon \
    && mkdir -p /data \
    && chown aemon:aemon /data

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
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('AEMON_METRICS_PORT', '9108'), timeout=4)"]

# SIGTERM finishes the batch in hand (AEMON_SHUTDOWN_GRACE_SECONDS) and exits 0; SIGHUP reloads the bundle.
STOPSIGNAL SIGTERM
ENTRYPOINT ["aemon"]
CMD ["run"]

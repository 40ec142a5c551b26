# tlpipe: the transfer-learning pipeline and its CLI; `docker run IMAGE` runs the whole flow.
#
# CPU by default. The base must provide python3.11 with venv: the lock files target it.
# For a GPU host pick a CUDA base, e.g.
#   docker build --build-arg BASE_IMAGE=tensorflow/tensorflow:2.21.0-gpu -t tlpipe:gpu .
#   docker run --gpus all -e KERAS_BACKEND=jax tlpipe:gpu stage finetune
# The lock pins tensorflow-cpu, so on such a base the GPU is used by a backend with CUDA wheels
# (add jax[cuda12] to the image and set KERAS_BACKEND=jax, as DESIGN.md's GPU section does).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_NO_CACHE=1 \
    PATH=/app/.venv/bin:$PATH \
    TF_CPP_MIN_LOG_LEVEL=2 \
    GX_ANALYTICS_ENABLED=false \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=180

# A fresh container creates Prefect's temporary server database on every `tlpipe run`; that takes
# longer than Prefect's 20 s startup default on a few cores, hence the timeout above. Pass
# PREFECT_API_URL to use a running Prefect server instead.

RUN groupadd --gid 10001 tlpipe \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin tlpipe \
    && mkdir /app && chown 10001:10001 /app
USER 10001:10001
WORKDIR /app

# The same lock and the same commands as `make setup` (Makefile); dependencies first, so a code change
# reuses this layer.
COPY --chown=10001:10001 requirements.lock ./
RUN python3.11 -m venv .venv \
    && .venv/bin/python -m pip install uv==0.13.8 \
    && .venv/bin/uv pip install --python .venv/bin/python -r requirements.lock

COPY --chown=10001:10001 . .
RUN .venv/bin/uv pip install --python .venv/bin/python --no-deps -e .

ENTRYPOINT ["tlpipe"]
CMD ["run"]

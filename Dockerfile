# tlpipe: the transfer-learning pipeline and its CLI; `docker run IMAGE` runs the whole flow.
#
#   docker build -t tlpipe .                                  CPU (the default)
#   docker build --build-arg VARIANT=gpu -t tlpipe:gpu .      adds JAX with CUDA 12 (NVIDIA GPUs)
#   docker run --gpus all -e KERAS_BACKEND=jax tlpipe:gpu stage finetune
#
# Several machines (docs/scaling.md): the same entry point in every worker, the cluster from Keras's
# KERAS_DISTRIBUTION_JOB_ADDRESSES / _NUM_PROCESSES / _PROCESS_ID; deploy/k8s/ runs this GPU image so.
#
# The lock pins tensorflow-cpu, so the GPU variant fine-tunes on the JAX backend. The CUDA libraries
# come as wheels: no CUDA base image is needed, the host needs only the NVIDIA driver and container
# toolkit. Set KERAS_BACKEND=jax for the fine-tune stage only (the backend tests cover it there;
# export converts through TensorFlow). BASE_IMAGE swaps the base (a mirror, a hardened image); it
# must be Debian-like (apt-get) and provide python3.11 with venv, which the lock files target.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG VARIANT=cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    UV_NO_CACHE=1 \
    UV_COMPILE_BYTECODE=1 \
    PATH=/app/.venv/bin:$PATH \
    TF_CPP_MIN_LOG_LEVEL=2 \
    GX_ANALYTICS_ENABLED=false \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DVC_NO_ANALYTICS=1 \
    PREFECT_HOME=/tmp/prefect \
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=180

# A fresh container creates Prefect's temporary server database on every `tlpipe run`; that takes
# longer than Prefect's 20 s startup default on a few cores, hence the timeout above. Pass
# PREFECT_API_URL to use a running Prefect server instead. PREFECT_HOME sits in /tmp so that
# `docker run --user "$(id -u):$(id -g)"` (to write into a mounted checkout) works too.

# git: promotion records the code commit and tags releases (components/deploy/promote.py). Not pinned
# (DL3008): Debian drops superseded package versions from its mirrors, so a pin breaks the build.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 10001 tlpipe \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin tlpipe \
    && mkdir /app && chown 10001:10001 /app
USER 10001:10001
WORKDIR /app

# The same lock and the same commands as `make setup` (tests/test_dockerfile.py compares them
# with `make -n`); dependencies first, so a code change reuses this layer.
COPY --chown=10001:10001 requirements.lock requirements-test.lock ./
RUN python3.11 -m venv .venv \
    && .venv/bin/python -m pip install --quiet --disable-pip-version-check uv==0.13.8 \
    && .venv/bin/uv pip install --quiet --python .venv/bin/python -r requirements.lock

# GPU: jax and its dependencies pinned by the test lock (the version the backend tests run);
# only the CUDA plugin and NVIDIA library wheels that jax[cuda12] adds are resolved at build time.
RUN if [ "$VARIANT" = gpu ]; then \
        .venv/bin/uv pip install --quiet --python .venv/bin/python -c requirements-test.lock "jax[cuda12]"; \
    elif [ "$VARIANT" != cpu ]; then \
        echo "VARIANT must be cpu or gpu, not '$VARIANT'" >&2; exit 1; \
    fi

COPY --chown=10001:10001 . .
RUN .venv/bin/uv pip install --quiet --python .venv/bin/python --no-deps -e .

# The multi-worker coordinator's port (process 0; deploy/k8s/finetune-multiworker.yaml).
EXPOSE 7777
ENTRYPOINT ["tlpipe"]
CMD ["run"]

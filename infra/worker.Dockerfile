# The GPU worker image: CUDA torch + this repository + its dependencies. The Kubernetes work pools
# (infra/work-pools/kubernetes-gpu.json) run each flow run in a pod of this image; prefect.yaml's pull
# step cds into FINETUNE_REPO_DIR, where the code is baked in. Base models come from a volume (/models).
#   docker build -f infra/worker.Dockerfile -t ghcr.io/your-org/prefect-finetune-gpu:$(git rev-parse --short HEAD) .
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}
ARG TORCH="torch==2.13.0"
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    FINETUNE_REPO_DIR=/opt/prefect-finetune HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv
# torch first, from the CUDA index, so no other dependency pulls a different build.
RUN pip install "${TORCH}" --index-url "${TORCH_INDEX}"
WORKDIR /opt/prefect-finetune
COPY pyproject.toml README.md ./
COPY flows ./flows
COPY tasks ./tasks
COPY deployments ./deployments
# gpu: Liger kernels; prefect-kubernetes lets the same image run a Kubernetes worker too.
RUN pip install ".[gpu]" prefect-kubernetes
# A flow run is started by the worker as `python -m prefect.engine`; nothing to run by default.
CMD ["prefect", "version"]

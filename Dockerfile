# loraflow's image for the Kubernetes work pool (docs/kubernetes.md): Python 3.11, the project with CUDA vLLM (which
# pins its CUDA torch) and prefect-kubernetes, the code at /opt/loraflow where deployments/kubernetes/prefect.yaml's
# pull step runs it. Build from the repository root:
#
#   docker build -t REGISTRY/loraflow:0.1.0 .
#
# torch 2.14 (vllm 0.33's pin) ships its CUDA 13.0 libraries as wheels; the base image brings the CUDA 13.0 user
# space that matches them. GPU nodes need an NVIDIA driver >= 580.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu22.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Ubuntu 22.04 ships Python 3.10: 3.11 comes from the deadsnakes PPA. gcc and the Python headers: Triton (vLLM,
# bitsandbytes kernels) compiles a small launcher with them at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN python3.11 -m venv $VIRTUAL_ENV && pip install pip==26.3

WORKDIR /opt/loraflow
COPY . .
# Editable, as in a checkout: code that finds files next to it (configs/, data/) finds them here. The locked CUDA
# set (requirements/cuda.txt, `make lock`) as constraints: the image is rebuilt from the same versions.
RUN pip install -c requirements/cuda.txt -e ".[serve-cuda,k8s]"

# State (Hugging Face cache, step outputs, checkpoints) lives here; the pool template mounts a volume claim on it.
ENV LORAFLOW_HOME=/var/lib/loraflow
# The Kubernetes worker sets the command (`prefect flow-run execute`); this one only shows the image works. On a GPU
# node, `docker run --gpus all IMAGE loraflow check-gpu` proves bitsandbytes' CUDA library loads and NF4-quantizes
# there (a build has no GPU to run it on).
CMD ["loraflow", "--help"]

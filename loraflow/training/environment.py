"""What a training ran with, recorded on its MLflow run so a version can be reproduced: the frozen package list
(every installed distribution, as `pip freeze` prints it, an artifact) and the interpreter, torch, CUDA and GPU
(params, comparable across runs in the MLflow UI)."""

from __future__ import annotations

import platform
from importlib import metadata

import torch

FROZEN_ARTIFACT = "environment/requirements.txt"


def frozen_packages() -> str:
    """`name==version` per installed distribution, sorted; the editable project itself included."""
    versions = {dist.metadata["Name"]: dist.version for dist in metadata.distributions() if dist.metadata["Name"]}
    return "".join(f"{name}=={versions[name]}\n" for name in sorted(versions, key=str.lower))


def environment_params() -> dict[str, str]:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {"env.python": platform.python_version(), "env.platform": platform.platform(),
            "env.torch": torch.__version__, "env.cuda": torch.version.cuda or "none", "env.gpu": gpu,
            "env.gpu_count": str(torch.cuda.device_count())}

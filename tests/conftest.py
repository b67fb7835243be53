"""Session fixtures: one LORAFLOW_HOME per test session, the tiny-ko base built once per machine, and one real
`finetune` flow run whose outputs (dataset, chat, adapter, metrics, registry) the other tests read."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SESSION_HOME = Path(tempfile.mkdtemp(prefix="loraflow-test-"))
os.environ["LORAFLOW_HOME"] = str(SESSION_HOME)
for name in (
    "PREFECT_HOME",
    "PREFECT_API_URL",
    "MLFLOW_TRACKING_URI",
    "HF_HOME",
    "PREFECT_RESULTS_LOCAL_STORAGE_PATH",
    "PREFECT_SERVER_MEMO_STORE_PATH",
):
    os.environ.pop(name, None)
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never download
os.chdir(REPO)  # configs name data files relative to the repo root

# The built base model is content-addressed and reproducible: share it with the user's state dir so it is
# built once per machine rather than once per session.
_models = REPO / ".loraflow" / "models"
_models.mkdir(parents=True, exist_ok=True)
(SESSION_HOME / "models").symlink_to(_models, target_is_directory=True)

from loraflow.env import configure_environment  # noqa: E402

configure_environment()

import pytest  # noqa: E402

from loraflow.config import JobConfig, load_config  # noqa: E402
from loraflow.results import ChatResult, DatasetResult, EvalResult, TrainResult  # noqa: E402

TINY_CONFIG = "configs/tiny-ko.yaml"
# One epoch with frequent checkpoints: the whole suite trains this adapter once. Serving is tested with its own
# vLLM processes (tests/test_serving.py), not by the session flow.
TINY_OVERRIDES = {"training.epochs": 1, "training.save_steps": 20, "serving.enabled": False}


@pytest.fixture(scope="session")
def tiny_home() -> Path:
    return SESSION_HOME


@pytest.fixture(scope="session")
def tiny_base_dir() -> Path:
    from loraflow.tiny.base import tiny_ko_dir

    return tiny_ko_dir()


@pytest.fixture(scope="session")
def tiny_config(tiny_base_dir: Path) -> JobConfig:
    return load_config(TINY_CONFIG, TINY_OVERRIDES)


@pytest.fixture(scope="session")
def finetune_run(tiny_config: JobConfig) -> dict:
    """The real flow, cold, once per session (Prefect ephemeral server, embedded MLflow store)."""
    from flows.finetune import finetune

    return finetune(config=TINY_CONFIG, overrides=TINY_OVERRIDES)


@pytest.fixture(scope="session")
def step_results(finetune_run: dict, tiny_config: JobConfig) -> dict:
    """The finished step records of the session's flow run, looked up by their content keys."""
    from loraflow.keys import chat_key, dataset_key, eval_key, train_key
    from loraflow.steps import load_result

    job = tiny_config
    dataset = load_result("dataset", dataset_key(job.data), DatasetResult)
    chat = load_result("chat", chat_key(dataset, job.model, job.training), ChatResult)
    trained = load_result(
        "train", train_key(chat, job.model, job.lora, job.quantization, job.training), TrainResult
    )
    evaluated = load_result(
        "evaluate", eval_key(chat, trained, job.model, job.quantization, job.eval), EvalResult
    )
    return {"dataset": dataset, "chat": chat, "trained": trained, "evaluated": evaluated}


@pytest.fixture(scope="session")
def trained(step_results: dict) -> TrainResult:
    return step_results["trained"]


@pytest.fixture(scope="session", autouse=True)
def _stop_prefect_ephemeral_server():
    """Stop Prefect's temporary server while pytest's streams are open (its atexit stop logs to a closed one)."""
    yield
    from prefect.server.api.server import SubprocessASGIServer

    for server in list(SubprocessASGIServer._instances.values()):
        server.stop()

"""Every fixture and helper of the test suite (conftest.py registers this module as a plugin).

- the tiny-ko session: the base built once per machine and one real `finetune` flow run whose outputs (dataset,
  chat, adapter, metrics, registry) the other tests read;
- `local_stack`: the real local stack (Prefect server, process worker, MLflow server) on free ports, started and
  stopped through `loraflow up` / `loraflow down`, with deployments/prefect.yaml and tests/stackflows.yaml deployed;
- small PEFT adapters on the tiny-ko base, registered in a real MLflow store the way the register step does it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import psutil
import pytest
import torch
from mlflow import MlflowClient
from peft import LoraConfig, get_peft_model
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.settings import PREFECT_API_URL, temporary_settings
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraflow.config import JobConfig, load_config
from loraflow.config.lora import ALL_LINEAR
from loraflow.hashing import sha_of_text
from loraflow.localstack.lifecycle import SERVICE_ORDER, deploy, recorded_process
from loraflow.localstack.stack import REPO_ROOT, Stack
from loraflow.process import alive
from loraflow.registry.client import client_at
from loraflow.results import ChatResult, DatasetResult, EvalResult, TrainResult
from loraflow.templates import load_template

TINY_CONFIG = "configs/tiny-ko.yaml"
# One epoch with frequent checkpoints: the whole suite trains this adapter once. Serving is tested with its own
# vLLM processes (tests/test_serving.py), not by the session flow.
TINY_OVERRIDES = {"training.epochs": 1, "training.save_steps": 20, "serving.enabled": False}
TEST_FLOWS_FILE = REPO_ROOT / "tests" / "stackflows.yaml"
TERMINAL = {StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED}
ATTENTION = list(ALL_LINEAR[:4])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def share_built_models(home: Path) -> None:
    """The tiny-ko base is content-addressed and reproducible: build it once per machine (the repo's state dir),
    not once per LORAFLOW_HOME."""
    shared = REPO_ROOT / ".loraflow" / "models"
    shared.mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(shared, target_is_directory=True)


# --- the tiny-ko session ----------------------------------------------------------------------------------


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
    from loraflow.outputs import load_result

    job = tiny_config
    dataset = load_result("dataset", dataset_key(job.data), DatasetResult)
    chat = load_result("chat", chat_key(dataset, job.model, job.training), ChatResult)
    trained = load_result("train", train_key(chat, job.model, job.lora, job.quantization, job.training), TrainResult)
    evaluated = load_result("evaluate", eval_key(chat, trained, job.model, job.quantization, job.eval), EvalResult)
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


# --- the local stack --------------------------------------------------------------------------------------


@dataclass
class RunningStack:
    stack: Stack
    env: dict[str, str]  # os.environ plus what a CLI needs to reach this stack
    timings: dict[str, float]  # seconds to healthy per service at the first `up`, plus `deploy`

    @property
    def home(self) -> Path:
        return self.stack.home

    def cli(self, *args: str, check: bool = True, timeout: float = 600,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """A console script of the venv (`loraflow`, `prefect`) from the repo root, against this stack."""
        result = subprocess.run([str(Path(sys.executable).parent / args[0]), *args[1:]], cwd=REPO_ROOT,
                                env=env or self.env, capture_output=True, text=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def new_shell_env(self) -> dict[str, str]:
        """A new login shell of the same user: no Prefect, MLflow or loraflow variables, the same HOME."""
        return {name: os.environ[name] for name in ("PATH", "LANG") if name in os.environ} | {"HOME": self.env["HOME"]}

    def prefect(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return self.cli("prefect", *args, check=check, timeout=timeout)

    @contextmanager
    def client(self) -> Iterator[SyncPrefectClient]:
        with temporary_settings({PREFECT_API_URL: self.stack.prefect_api_url}), get_client(sync_client=True) as client:
            yield client

    def flow_run(self, flow_run_id: UUID | str) -> FlowRun:
        with self.client() as client:
            return client.read_flow_run(UUID(str(flow_run_id)))

    def wait_for_flow_run(self, flow_run_id: UUID | str, timeout: float = 300, after: FlowRun | None = None) -> FlowRun:
        """The run once it is in a terminal state; with `after`, a terminal state newer than `after`'s (a retried
        run must not be judged by the state it was retried from)."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.flow_run(flow_run_id)
            newer = after is None or (run.state is not None and run.state.id != after.state.id
                                      and run.state.timestamp > after.state.timestamp)
            if run.state is not None and run.state.type in TERMINAL and newer:
                return run
            if time.monotonic() > deadline:
                raise AssertionError(f"flow run {flow_run_id} still {run.state} after {timeout} s")
            time.sleep(1)

    def run_deployment(self, name: str, *params: str, timeout: float = 900) -> FlowRun:
        """`prefect deployment run NAME --param ...`, then the run's own state through the API: the CLI's `--watch`
        was seen to miss the end of a long run and wait forever."""
        created = re.findall(r"UUID: ([0-9a-f-]{36})", self.prefect("deployment", "run", name, *params).stdout)
        run = self.wait_for_flow_run(created[0], timeout)
        assert run.state is not None and run.state.type == StateType.COMPLETED, run.state
        return run

    def mlflow(self, method: str, endpoint: str, **kwargs: Any) -> dict[str, Any]:
        response = httpx.request(method, f"{self.stack.mlflow_url}/api/2.0/mlflow/{endpoint}", timeout=30, **kwargs)
        response.raise_for_status()
        return response.json()

    def started_processes(self) -> list[psutil.Process]:
        """Every live process of the stack: the recorded leaders and all their descendants."""
        found: list[psutil.Process] = []
        for name in SERVICE_ORDER:
            leader = recorded_process(self.stack, name)
            if leader is not None:
                found += [leader, *leader.children(recursive=True)]
        return found

    def up(self) -> dict[str, float]:
        """`loraflow up`; returns the printed seconds-to-ready per service."""
        output = self.cli("loraflow", "up").stdout
        return {name: float(s) for name, s in re.findall(r"^([\w-]+): ready in ([\d.]+) s$", output, re.M)}

    def down(self) -> list[int]:
        """`loraflow down`; fails if any process that was running before is still alive."""
        before = self.started_processes()
        self.cli("loraflow", "down")
        survivors = [p.pid for p in before if alive(p)]
        assert not survivors, f"still alive after `stack down`: {survivors}"
        return [p.pid for p in before]


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    home = tmp_path_factory.mktemp("loraflow-home")
    prefect_port, mlflow_port, webhook_port = free_port(), free_port(), free_port()
    # Its own HOME: `loraflow up` writes the Prefect profile into HOME/.prefect, where a new shell finds it.
    env = {**os.environ, "LORAFLOW_HOME": str(home), "LORAFLOW_PREFECT_PORT": str(prefect_port),
           "LORAFLOW_MLFLOW_PORT": str(mlflow_port), "LORAFLOW_WEBHOOK_PORT": str(webhook_port),
           "HOME": str(home / "user-home")}
    env.pop("PREFECT_PROFILES_PATH", None)
    share_built_models(home)
    stack = Stack(home=home, prefect_port=prefect_port, mlflow_port=mlflow_port, webhook_port=webhook_port)
    running = RunningStack(stack, env, {})
    running.env.update(running.stack.client_env())
    try:
        running.timings.update(running.up())
        deploy(running.stack, TEST_FLOWS_FILE)
        (home / "timings.json").write_text(json.dumps(running.timings))
        yield running
    finally:
        running.down()


# --- adapters and a registry ------------------------------------------------------------------------------


def make_adapter(base_dir: Path, out_dir: Path, *, r: int, targets: list[str], seed: int, b_std: float = 0.3) -> Path:
    """A LoRA adapter whose lora_B is random (PEFT inits it to zero: no change); b_std=0 keeps it zero."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, task_type="CAUSAL_LM"))
    for name, param in model.named_parameters():
        if "lora_B" in name and b_std > 0:
            torch.nn.init.normal_(param, std=b_std)
    model.save_pretrained(str(out_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    tokenizer.chat_template = load_template("qwen2.5")  # as the train step saves it
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def retarget_adapter(adapter_dir: Path, module: str, renamed: str) -> Path:
    """Rename a target module in weights and config to one the base does not have: a target-modules
    mismatch (vLLM may load it and silently serve the base, vllm#34186)."""
    weights_file = adapter_dir / "adapter_model.safetensors"
    weights = {k.replace(f".{module}.", f".{renamed}."): v for k, v in load_file(str(weights_file)).items()}
    save_file(weights, str(weights_file))
    config_file = adapter_dir / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["target_modules"] = [renamed if m == module else m for m in config["target_modules"]]
    config_file.write_text(json.dumps(config, indent=2))
    return adapter_dir


@dataclass(frozen=True)
class RegistryFixture:
    tracking_uri: str
    model_name: str
    experiment_id: str

    def client(self) -> MlflowClient:
        return client_at(self.tracking_uri)

    def register(self, adapter_dir: Path, template_sha: str | None = None) -> str:
        """Log the adapter dir as a run artifact and register it as a new version; returns the version."""
        client = self.client()
        run = client.create_run(self.experiment_id)
        client.log_artifacts(run.info.run_id, str(adapter_dir), "adapter")
        client.set_terminated(run.info.run_id)
        if not client.search_registered_models(f"name = '{self.model_name}'"):
            client.create_registered_model(self.model_name)
        sha = template_sha or sha_of_text(load_template("qwen2.5"))
        version = client.create_model_version(self.model_name, source=f"{run.info.artifact_uri}/adapter",
                                              run_id=run.info.run_id,
                                              tags={"template_sha": sha, "base_model": "embedded:tiny-ko"})
        return str(version.version)

    def set_alias(self, alias: str, version: str) -> None:
        self.client().set_registered_model_alias(self.model_name, alias, version)

    def delete_alias(self, alias: str) -> None:
        self.client().delete_registered_model_alias(self.model_name, alias)

    def tags(self, version: str) -> dict[str, str]:
        return self.client().get_model_version(self.model_name, version).tags


def make_registry(root: Path, model_name: str) -> RegistryFixture:
    uri = f"sqlite:///{root / 'mlflow.db'}"
    # An explicit artifact location: a fresh store's default experiment would write to ./mlruns.
    experiment_id = client_at(uri).create_experiment("serving-tests", artifact_location=(root / "artifacts").as_uri())
    return RegistryFixture(tracking_uri=uri, model_name=model_name, experiment_id=experiment_id)

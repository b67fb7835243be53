"""Serving against a real vLLM process on CPU and a real MLflow registry: one stack for the module (startup
is the expensive part); the tests run in file order and move the aliases the way a person would."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from flows.serve import serve
from loraflow import paths
from loraflow.config import JobConfig, load_config
from loraflow.process import alive
from loraflow.serving.names import base_name, versioned_name
from loraflow.serving.reconcile import ReconcileReport, reconcile
from loraflow.serving.records import state_dir, stop_all_servers
from loraflow.serving.servers import ServingStack, start_stack
from tests.fixtures import (
    ALL_LINEAR,
    ATTENTION,
    RegistryFixture,
    free_port,
    make_adapter,
    make_registry,
    retarget_adapter,
)

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-ko.yaml"
MODEL = "tiny-ko-served"
KEY_ENV = "LORAFLOW_TEST_SERVING_KEY"
KEY = "test-key-not-a-secret"
PROMPT = "대한민국 헌법 제1조는 무엇입니까?"


@pytest.fixture(scope="module")
def adapters(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    made = {
        "a": make_adapter(tiny_base_dir, root / "a", r=8, targets=ATTENTION, seed=1),
        "b": make_adapter(tiny_base_dir, root / "b", r=16, targets=ALL_LINEAR, seed=2),
        # lora_B left at zero, as PEFT initialises it: loads fine, changes nothing
        "noop": make_adapter(tiny_base_dir, root / "noop", r=8, targets=ATTENTION, seed=3, b_std=0),
        "mismatch": retarget_adapter(make_adapter(tiny_base_dir, root / "mismatch", r=8, targets=["q_proj"], seed=4),
                                     "q_proj", "query_proj"),
        "template": make_adapter(tiny_base_dir, root / "template", r=8, targets=ATTENTION, seed=5),
    }
    # trained with some other chat template than the one its version's `template_sha` records
    (made["template"] / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    return made


@pytest.fixture(scope="module")
def registry(adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """name -> registered version"""
    reg = make_registry(tmp_path_factory.mktemp("mlflow"), MODEL)
    versions = {name: reg.register(adapters[name]) for name in ("a", "b", "noop", "mismatch", "template")}
    return {"uri": reg.tracking_uri, **versions}


@pytest.fixture(scope="module")
def reg(registry: dict[str, str]) -> RegistryFixture:
    return RegistryFixture(tracking_uri=registry["uri"], model_name=MODEL, experiment_id="")


@pytest.fixture(scope="module")
def overrides(registry: dict[str, str]) -> dict[str, object]:
    return {
        "registry.model_name": MODEL,
        "registry.tracking_uri": registry["uri"],
        "serving.enabled": True,
        "serving.port": free_port(),
        "serving.vllm_port": free_port(),
        "serving.api_key_env": KEY_ENV,
        "serving.max_model_len": 512,
    }


@pytest.fixture(scope="module")
def job(overrides: dict[str, object]) -> JobConfig:
    return load_config(CONFIG, overrides)


@pytest.fixture(scope="module")
def stack(job: JobConfig, adapters: dict[str, Path]) -> Iterator[ServingStack]:
    os.environ[KEY_ENV] = KEY
    started = start_stack(job, [adapters["a"], adapters["b"]])
    try:
        yield started
    finally:
        # The path `make down` takes: every serving stack recorded under LORAFLOW_HOME, found by its records.
        stopped = stop_all_servers(paths.home())
        os.environ.pop(KEY_ENV, None)
    assert {started.vllm.pid, started.router.pid} <= set(stopped)
    for server in (started.vllm, started.router):
        assert server.process is not None and not alive(server.process), f"{server.name} still running"


@pytest.fixture(scope="module")
def sync(job: JobConfig, stack: ServingStack, registry: dict[str, str]):
    adapters_root = state_dir(job.registry.model_name) / "adapters"  # where the deploy step downloads versions

    def run() -> ReconcileReport:
        return reconcile(job, stack.endpoint, registry["uri"], KEY, adapters_root, drain_timeout_s=60)

    return run


def chat(url: str, model: str, max_tokens: int = 24, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "temperature": 0, "return_token_ids": True}
    return httpx.post(f"{url}/v1/chat/completions", headers=headers, timeout=120, json=body)


def model_ids(url: str) -> set[str]:
    reply = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    reply.raise_for_status()
    return {entry["id"] for entry in reply.json()["data"]}


def peft_greedy(base_dir: Path, adapter_dir: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    tuned = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    with torch.no_grad():
        out = tuned.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt_ids) :].tolist()


def test_api_key_is_required(stack: ServingStack) -> None:
    for url in (stack.endpoint.router_url, stack.endpoint.vllm_url):
        assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401
        assert chat(url, base_name(MODEL), key=None).status_code == 401
        assert base_name(MODEL) in model_ids(url)


def test_champion_is_served_and_matches_peft_token_for_token(
    stack: ServingStack, sync, reg: RegistryFixture, registry: dict[str, str], adapters: dict[str, Path],
    tiny_base_dir: Path,
) -> None:
    reg.set_alias("champion", registry["a"])
    report = sync()
    v_a = versioned_name(MODEL, registry["a"])
    assert report.routes == {MODEL: v_a}
    assert [c.passed for c in report.canaries] == [True]
    assert reg.tags(registry["a"])["serving.canary"] == "passed"
    assert {MODEL, v_a, base_name(MODEL)} <= model_ids(stack.endpoint.router_url)

    stable = chat(stack.endpoint.router_url, MODEL).json()
    pinned = chat(stack.endpoint.router_url, v_a).json()
    base = chat(stack.endpoint.router_url, base_name(MODEL)).json()
    assert stable["model"] == v_a  # the answer names the version that produced it
    served = stable["choices"][0]["token_ids"]
    assert served == pinned["choices"][0]["token_ids"]
    assert served != base["choices"][0]["token_ids"]

    # The prompt vLLM rendered is the one transformers renders with the adapter's own template.
    tokenizer = AutoTokenizer.from_pretrained(str(adapters["a"]))
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                               tokenize=True, return_dict=True)["input_ids"]
    assert stable["prompt_token_ids"] == prompt_ids
    expected = peft_greedy(tiny_base_dir, adapters["a"], prompt_ids, max_new_tokens=24)
    assert served == expected


def test_moving_champion_switches_stable_name_without_failed_requests(
    stack: ServingStack, sync, reg: RegistryFixture, registry: dict[str, str]
) -> None:
    v_a, v_b = versioned_name(MODEL, registry["a"]), versioned_name(MODEL, registry["b"])
    url = stack.endpoint.router_url
    stop = threading.Event()
    answers: list[tuple[int, str]] = []

    def hammer() -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
            while True:
                reply = client.post(
                    f"{url}/v1/chat/completions",
                    json={
                        "model": MODEL,
                        "messages": [{"role": "user", "content": PROMPT}],
                        "max_tokens": 32,
                        "temperature": 0,
                    },
                )
                answers.append((reply.status_code, reply.json().get("model", reply.text)))
                if stop.is_set():
                    return

    reg.set_alias("champion", registry["b"])
    with ThreadPoolExecutor(16) as pool:
        workers = [pool.submit(hammer) for _ in range(16)]
        time.sleep(1.0)  # requests are in flight on the old champion
        report = sync()
        time.sleep(1.0)
        stop.set()
        for worker in workers:
            worker.result()

    assert report.routes == {MODEL: v_b}
    assert report.unloaded == [v_a]  # no alias points at it any more
    assert [status for status, _ in answers if status != 200] == []
    assert {name for _, name in answers} == {v_a, v_b}, "requests did not run through the switch"
    assert len(answers) >= 32
    ids = model_ids(url)
    assert v_b in ids and v_a not in ids
    expected_b = chat(stack.endpoint.vllm_url, v_b).json()["choices"][0]["token_ids"]
    assert chat(url, MODEL).json()["choices"][0]["token_ids"] == expected_b


@pytest.mark.parametrize(
    ("adapter", "reason"),
    [
        ("noop", "equals the base"),
        ("mismatch", "expected target modules"),  # vLLM 0.32 refuses it at load; either way it is not served
        ("template", "template"),
    ],
)
def test_failed_canary_keeps_previous_champion(
    stack: ServingStack, sync, reg: RegistryFixture, registry: dict[str, str], adapter: str, reason: str
) -> None:
    v_b, bad = versioned_name(MODEL, registry["b"]), versioned_name(MODEL, registry[adapter])
    before = chat(stack.endpoint.router_url, MODEL).json()["choices"][0]["token_ids"]
    reg.set_alias("champion", registry[adapter])
    report = sync()

    assert report.routes == {MODEL: v_b}
    assert [c.passed for c in report.canaries] == [False]
    tags = reg.tags(registry[adapter])
    assert tags["serving.canary"] == "failed"
    assert reason in tags["serving.reason"]
    assert bad not in model_ids(stack.endpoint.router_url)
    after = chat(stack.endpoint.router_url, MODEL).json()
    assert after["model"] == v_b and after["choices"][0]["token_ids"] == before
    # Not retried on the next pass: the tag records the verdict (delete it to retry).
    assert sync().canaries == []


def test_challenger_is_served_under_its_version_only_and_rollback_is_an_alias_move(
    stack: ServingStack, sync, reg: RegistryFixture, registry: dict[str, str]
) -> None:
    v_a, v_b = versioned_name(MODEL, registry["a"]), versioned_name(MODEL, registry["b"])
    reg.set_alias("champion", registry["b"])
    reg.set_alias("challenger", registry["a"])
    report = sync()
    assert report.routes == {MODEL: v_b}
    assert set(report.loaded) == {v_a, v_b}
    assert chat(stack.endpoint.router_url, MODEL).json()["model"] == v_b

    # Rollback: champion back to the older version, challenger cleared.
    reg.set_alias("champion", registry["a"])
    reg.delete_alias("challenger")
    report = sync()
    assert report.routes == {MODEL: v_a} and report.unloaded == [v_b] and report.canaries == []
    assert chat(stack.endpoint.router_url, MODEL).json()["model"] == v_a
    again = sync()
    assert (again.canaries, again.unloaded, again.routes) == ([], [], {MODEL: v_a})


def test_serve_flow_reconciles_the_running_stack(stack: ServingStack, overrides: dict[str, object],
                                                 reg: RegistryFixture, registry: dict[str, str]) -> None:
    """The Prefect flow `serve` attaches to the job's running stack (stack.json) and moves the stable name."""
    reg.set_alias("champion", registry["b"])
    summary = serve(config=str(CONFIG), overrides=overrides, start=False)
    v_b = versioned_name(MODEL, registry["b"])
    assert summary["routes"] == {MODEL: v_b}
    assert chat(stack.endpoint.router_url, MODEL).json()["model"] == v_b


def test_an_adapter_loaded_from_other_files_under_a_versions_name_is_replaced(
    stack: ServingStack, sync, registry: dict[str, str], adapters: dict[str, Path]
) -> None:
    """Another registry's adapter (a second LORAFLOW_HOME on the same vLLM) under this registry's version name:
    names prove nothing, so the reconciler unloads it and loads this version's own files, canary included."""
    v_b = versioned_name(MODEL, registry["b"])
    served = stack.endpoint.client(KEY)
    served.unload_adapter(v_b)
    served.load_adapter(v_b, str(adapters["a"]))  # the impostor: other weights under b's name
    report = sync()
    assert v_b in report.unloaded
    assert [(c.version, c.passed) for c in report.canaries] == [(registry["b"], True)]
    expected = state_dir(MODEL) / "adapters" / f"v{registry['b']}"
    assert Path(served.served_models()[v_b]).resolve() == expected.resolve()
    assert chat(stack.endpoint.router_url, MODEL).json()["model"] == v_b

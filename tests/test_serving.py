"""Serving one job against a real vLLM process on CPU and a real MLflow registry, through the stack's endpoint: one
endpoint and base server for the module (startup is the expensive part); the tests run in file order and move the
aliases the way a person would. Several jobs on one server: tests/test_serving_jobs.py."""

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

from loraflow.localstack.serving_pass import serve_pass
from loraflow.process import wait_for
from loraflow.serving.client import ServerClient
from loraflow.serving.names import base_name, versioned_name
from loraflow.serving.reconcile import ReconcileReport
from loraflow.serving.records import job_dir
from tests.fixtures import (
    ALL_LINEAR,
    ATTENTION,
    RegistryFixture,
    make_adapter,
    make_registry,
    retarget_adapter,
)
from tests.fixtures.serving import PROMPT, ServedJobs

pytestmark = pytest.mark.slow

MODEL = "tiny-ko-served"
KEY_ENV = "LORAFLOW_TEST_SERVING_KEY"
KEY = "test-key-not-a-secret"


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
def reg(tmp_path_factory: pytest.TempPathFactory) -> RegistryFixture:
    return make_registry(tmp_path_factory.mktemp("mlflow"), MODEL)


@pytest.fixture(scope="module")
def registry(adapters: dict[str, Path], reg: RegistryFixture) -> dict[str, str]:
    """name -> registered version"""
    return {name: reg.register(adapters[name]) for name in ("a", "b", "noop", "mismatch", "template")}


@pytest.fixture(scope="module")
def served(registry: dict[str, str], reg: RegistryFixture) -> Iterator[ServedJobs]:
    """The module's endpoint and base server, started by the first pass (no alias yet: nothing loaded)."""
    os.environ[KEY_ENV] = KEY
    jobs = ServedJobs(KEY_ENV, KEY)
    try:
        first = jobs.deploy(reg)
        assert first.routes == {} and first.loaded == []
        yield jobs
    finally:
        jobs.stop()  # the path `make down` takes: everything recorded under LORAFLOW_HOME, found by its records
        os.environ.pop(KEY_ENV, None)


@pytest.fixture(scope="module")
def sync(served: ServedJobs, reg: RegistryFixture):
    def run() -> ReconcileReport:
        return served.deploy(reg)

    return run


@pytest.fixture(scope="module")
def server_url(served: ServedJobs, sync) -> str:
    return served.server_url(sync())


def peft_greedy(base_dir: Path, adapter_dir: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    tuned = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    with torch.no_grad():
        out = tuned.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt_ids) :].tolist()


def test_api_key_is_required(served: ServedJobs, server_url: str) -> None:
    for url in (served.url, server_url):
        assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 401
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401
        assert served.chat(base_name(MODEL), url, headers={}).status_code == 401
    assert base_name(MODEL) in served.model_ids()


def test_champion_is_served_and_matches_peft_token_for_token(
    served: ServedJobs, sync, reg: RegistryFixture, registry: dict[str, str], adapters: dict[str, Path],
    tiny_base_dir: Path,
) -> None:
    reg.set_alias("champion", registry["a"])
    report = sync()
    v_a = versioned_name(MODEL, registry["a"])
    assert report.routes == {MODEL: v_a}
    assert [c.passed for c in report.canaries] == [True]
    assert reg.tags(registry["a"])["serving.canary"] == "passed"
    assert {MODEL, v_a, base_name(MODEL), report.server} <= served.model_ids()

    stable = served.chat(MODEL).json()
    pinned = served.chat(v_a).json()
    base = served.chat(base_name(MODEL)).json()
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
    served: ServedJobs, sync, reg: RegistryFixture, registry: dict[str, str], server_url: str
) -> None:
    v_a, v_b = versioned_name(MODEL, registry["a"]), versioned_name(MODEL, registry["b"])
    stop = threading.Event()
    answers: list[tuple[int, str]] = []

    def hammer() -> None:
        with httpx.Client(headers=served.headers(), timeout=120) as client:
            while True:
                reply = client.post(f"{served.url}/v1/chat/completions", json={
                    "model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 32,
                    "temperature": 0})
                answers.append((reply.status_code, reply.json().get("model", reply.text)))
                if stop.is_set():
                    return

    reg.set_alias("champion", registry["b"])
    with ThreadPoolExecutor(16) as pool:
        workers = [pool.submit(hammer) for _ in range(16)]
        time.sleep(1.0)  # requests are in flight on the old champion
        started = time.monotonic()
        report = sync()
        pass_s = time.monotonic() - started
        time.sleep(1.0)
        stop.set()
        for worker in workers:
            worker.result()

    assert report.routes == {MODEL: v_b}
    assert [status for status, _ in answers if status != 200] == []
    assert {name for _, name in answers} == {v_a, v_b}, "requests did not run through the switch"
    assert len(answers) >= 32
    # v_a left the job's names at once and is unloaded once its last open request finished: the pass did not wait.
    assert v_a not in served.model_ids() and v_b in served.model_ids()
    wait_for(lambda: v_a not in ServerClient(server_url, KEY).served_models(), 120)
    print(f"[timing] pass with 16 clients streaming on the old champion: {pass_s:.1f} s")
    expected_b = served.chat(v_b, server_url).json()["choices"][0]["token_ids"]
    assert served.chat(MODEL).json()["choices"][0]["token_ids"] == expected_b


@pytest.mark.parametrize(
    ("adapter", "reason"),
    [
        ("noop", "equals the base"),
        ("mismatch", "expected target modules"),  # vLLM 0.32 refuses it at load; either way it is not served
        ("template", "template"),
    ],
)
def test_failed_canary_keeps_previous_champion(
    served: ServedJobs, sync, reg: RegistryFixture, registry: dict[str, str], adapter: str, reason: str
) -> None:
    v_b, bad = versioned_name(MODEL, registry["b"]), versioned_name(MODEL, registry[adapter])
    before = served.chat(MODEL).json()["choices"][0]["token_ids"]
    reg.set_alias("champion", registry[adapter])
    report = sync()

    assert report.routes == {MODEL: v_b}
    assert [c.passed for c in report.canaries] == [False]
    tags = reg.tags(registry[adapter])
    assert tags["serving.canary"] == "failed"
    assert reason in tags["serving.reason"]
    assert bad not in served.model_ids()
    after = served.chat(MODEL).json()
    assert after["model"] == v_b and after["choices"][0]["token_ids"] == before
    # Not retried on the next pass: the tag records the verdict (delete it to retry).
    assert sync().canaries == []


def test_challenger_is_served_under_its_version_only_and_rollback_is_an_alias_move(
    served: ServedJobs, sync, reg: RegistryFixture, registry: dict[str, str]
) -> None:
    v_a, v_b = versioned_name(MODEL, registry["a"]), versioned_name(MODEL, registry["b"])
    reg.set_alias("champion", registry["b"])
    reg.set_alias("challenger", registry["a"])
    report = sync()
    assert report.routes == {MODEL: v_b}
    assert set(report.loaded) == {v_a, v_b}
    assert served.chat(MODEL).json()["model"] == v_b

    # Rollback: champion back to the older version, challenger cleared.
    reg.set_alias("champion", registry["a"])
    reg.delete_alias("challenger")
    report = sync()
    assert report.routes == {MODEL: v_a} and report.unloaded == [v_b] and report.canaries == []
    assert served.chat(MODEL).json()["model"] == v_a
    again = sync()
    assert (again.canaries, again.unloaded, again.routes) == ([], [], {MODEL: v_a})


def test_a_serving_pass_moves_the_stable_name_of_the_running_servers(served: ServedJobs, reg: RegistryFixture,
                                                                     registry: dict[str, str]) -> None:
    """The pass the stack's reconciler runs per alias move (and `loraflow serve`): attaches, never starts."""
    reg.set_alias("champion", registry["b"])
    report = serve_pass("configs/tiny-ko.yaml", served.overrides(reg), start=False, why="test")
    v_b = versioned_name(MODEL, registry["b"])
    assert report is not None and report.routes == {MODEL: v_b}
    assert served.chat(MODEL).json()["model"] == v_b


def test_an_adapter_loaded_from_other_files_under_a_versions_name_is_replaced(
    served: ServedJobs, sync, registry: dict[str, str], adapters: dict[str, Path], server_url: str
) -> None:
    """Another registry's adapter (a second LORAFLOW_HOME on the same vLLM) under this registry's version name:
    names prove nothing, so the reconciler unloads it and loads this version's own files, canary included."""
    v_b = versioned_name(MODEL, registry["b"])
    server = ServerClient(server_url, KEY)
    server.unload_adapter(v_b)
    server.load_adapter(v_b, str(adapters["a"]))  # the impostor: other weights under b's name
    report = sync()
    assert v_b in report.unloaded
    assert [(c.version, c.passed) for c in report.canaries] == [(registry["b"], True)]
    expected = job_dir(MODEL) / "adapters" / f"v{registry['b']}"
    assert Path(server.served_models()[v_b]).resolve() == expected.resolve()
    assert served.chat(MODEL).json()["model"] == v_b

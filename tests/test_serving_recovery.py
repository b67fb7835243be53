"""vLLM killed under concurrent load, real processes (vLLM, router with its supervisor, MLflow registry): the stable
port never refuses a connection, answers 503 + Retry-After while vLLM restarts, and the stable name answers again
with the champion without anyone running a command; a reconcile during the restart waits for it instead of racing.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest

from loraflow.config import load_config
from loraflow.process import alive, read_record
from loraflow.serving.deploy import deploy_aliases
from loraflow.serving.names import versioned_name
from loraflow.serving.records import STACK_FILE, state_dir, stop_job_servers
from tests.fixtures import ATTENTION, free_port, make_adapter, make_registry

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-ko.yaml"
MODEL = "tiny-ko-recovery"
KEY_ENV, KEY = "LORAFLOW_TEST_RECOVERY_KEY", "recovery-key-not-a-secret"
CLIENTS = 12


def outcome(client: httpx.Client, url: str, stream: bool) -> tuple[str, str | None]:
    """What one request got: `200 <model>`, `503` (with Retry-After and an OpenAI error body), another status,
    `refused`, or `cut` (the connection dropped mid-response: vLLM died under a request already answering)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "헌법 제1조는?"}], "max_tokens": 8,
            "stream": stream}
    try:
        with client.stream("POST", f"{url}/v1/chat/completions", json=body) as reply:
            text = reply.read().decode()
    except httpx.ConnectError:
        return "refused", None
    except httpx.TransportError:
        return "cut", None
    if reply.status_code == 200:
        return "200", text
    if reply.status_code == 503:
        ok = int(reply.headers.get("retry-after", 0)) > 0 and reply.json()["error"]["message"]
        return ("503" if ok else "503 without retry-after"), None
    return str(reply.status_code), text


def test_a_killed_vllm_restarts_behind_a_router_that_stays_up(tiny_base_dir: Path,
                                                                tmp_path_factory: pytest.TempPathFactory) -> None:
    reg = make_registry(tmp_path_factory.mktemp("recovery-mlflow"), MODEL)
    version = reg.register(make_adapter(tiny_base_dir, tmp_path_factory.mktemp("recovery") / "a", r=8,
                                        targets=ATTENTION, seed=7))
    reg.set_alias("champion", version)
    job = load_config(CONFIG, {"registry.model_name": MODEL, "registry.tracking_uri": reg.tracking_uri,
                               "serving.enabled": True, "serving.port": free_port(), "serving.vllm_port": free_port(),
                               "serving.api_key_env": KEY_ENV, "serving.max_model_len": 512})
    os.environ[KEY_ENV] = KEY
    stack_file = state_dir(MODEL) / STACK_FILE
    try:
        started = deploy_aliases(job)
        assert started is not None
        url, served = started[0].router_url, versioned_name(MODEL, version)
        before = read_record(stack_file)["processes"]
        stop = threading.Event()
        results: list[tuple[float, float, str]] = []  # (sent, answered, outcome), monotonic seconds

        def load(index: int) -> None:
            with httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as client:
                while not stop.is_set():
                    sent = time.monotonic()
                    got, text = outcome(client, url, stream=index % 2 == 1)
                    if got == "200" and served not in (text or ""):
                        got = "200 from another model"
                    results.append((sent, time.monotonic(), got))
                    if got != "200":
                        time.sleep(0.5)  # as a client honouring Retry-After would, only faster

        with ThreadPoolExecutor(CLIENTS + 1) as pool:
            workers = [pool.submit(load, i) for i in range(CLIENTS)]
            time.sleep(3)  # requests in flight when vLLM dies
            kill_at = time.monotonic()
            psutil.Process(before["vllm"]["pid"]).kill()  # SIGKILL, the leader alone, as the OOM killer would
            # A reconcile pass meanwhile (the 60 s poll, an alias event) waits for the supervisor, never races it.
            reconciled = pool.submit(deploy_aliases, job, False)
            deadline = time.monotonic() + 480  # liveness: vLLM's start on 2 busy cores, not a speed bound
            while not any(s > kill_at and got == "200" for s, _, got in results) and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(5)  # the load keeps running on the restarted vLLM
            stop.set()
            for worker in workers:
                worker.result()
            endpoint, report = reconciled.result(timeout=600)

        counts = Counter(got for _, _, got in results)
        after_kill = [(s, a, got) for s, a, got in results if a > kill_at]
        first_503 = min((a - kill_at for _, a, got in after_kill if got == "503"), default=None)
        first_200 = min((a - kill_at for s, a, got in after_kill if got == "200" and s > kill_at), default=None)
        print(f"[timing] vLLM SIGKILL -> first 503 after {first_503} s, first 200 through the stable name after "
              f"{first_200} s; {CLIENTS} clients got {dict(counts)}")
        assert first_200 is not None, f"the stable name never answered again: {dict(counts)}"
        assert counts["refused"] == 0 and set(counts) <= {"200", "503", "cut"}, dict(counts)
        assert counts["503"] > 0, "the restart window was never seen"
        # Only a response already streaming when vLLM died can be cut; one sent later got a 503 or a 200.
        assert all(s < kill_at for s, _, got in results if got == "cut"), dict(counts)

        after = read_record(stack_file)["processes"]
        assert after["router"]["pid"] == before["router"]["pid"], "the router must not go down with vLLM"
        assert after["vllm"]["pid"] != before["vllm"]["pid"] and alive(psutil.Process(after["vllm"]["pid"]))
        # The supervisor reloaded the champion from the registry's files: the pass had nothing to load or check.
        assert endpoint.router_url == url and report.routes == {MODEL: served}, report
        assert report.canaries == [] and served in report.loaded, report
    finally:
        stopped = stop_job_servers(MODEL)
        os.environ.pop(KEY_ENV, None)
    assert {after["vllm"]["pid"], after["router"]["pid"]} <= set(stopped)
    assert all(gone(pid) for pid in stopped), stopped


def gone(pid: int) -> bool:
    try:
        return not alive(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return True

"""The shared vLLM killed under concurrent load on two jobs, real processes (vLLM, the endpoint with its supervisor,
MLflow registries): the public port never refuses a connection, answers 503 + Retry-After while vLLM restarts, and
every job's stable name answers again with its own champion without anyone running a command; a reconcile pass
whose vLLM dies under it (between placing the job and its first call to vLLM, where the kill lands here) waits for
the restart instead of failing.
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

from loraflow.process import alive
from loraflow.serving import deploy
from loraflow.serving.deploy import place_job
from loraflow.serving.names import versioned_name
from loraflow.serving.records import read_endpoint, read_server
from tests.fixtures import ATTENTION, make_adapter, make_registry
from tests.fixtures.serving import ServedJobs

pytestmark = pytest.mark.slow

MODELS = ("recovery-ko", "recovery-intent")
KEY_ENV, KEY = "LORAFLOW_TEST_RECOVERY_KEY", "recovery-key-not-a-secret"
CLIENTS = 12


def outcome(client: httpx.Client, url: str, model: str, stream: bool) -> tuple[str, str | None]:
    """What one request got: `200 <model>`, `503` (with Retry-After and an OpenAI error body), another status,
    `refused`, or `cut` (the connection dropped mid-response: vLLM died under a request already answering)."""
    body = {"model": model, "messages": [{"role": "user", "content": "헌법 제1조는?"}], "max_tokens": 8,
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


def test_a_killed_vllm_restarts_behind_an_endpoint_that_stays_up(tiny_base_dir: Path,
                                                                 tmp_path_factory: pytest.TempPathFactory,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path_factory.mktemp("recovery")
    registries = [make_registry(root / model, model) for model in MODELS]
    for seed, registry in enumerate(registries, start=7):
        registry.set_alias("champion", registry.register(make_adapter(tiny_base_dir, root / f"a{seed}", r=8,
                                                                      targets=ATTENTION, seed=seed)))
    served = ServedJobs(KEY_ENV, KEY)
    os.environ[KEY_ENV] = KEY
    try:
        reports = [served.deploy(registry) for registry in registries]
        assert len({report.server for report in reports}) == 1, "both jobs on one vLLM"
        server_id, url = reports[0].server, served.url
        before, endpoint_pid = read_server(server_id).process, read_endpoint().process["pid"]
        champions = {model: versioned_name(model, 1) for model in MODELS}
        stop = threading.Event()
        results: list[tuple[float, float, str, str]] = []  # (sent, answered, model, outcome), monotonic seconds

        def load(index: int) -> None:
            model = MODELS[index % 2]
            with httpx.Client(headers=served.headers(), timeout=120) as client:
                while not stop.is_set():
                    sent = time.monotonic()
                    got, text = outcome(client, url, model, stream=index % 4 >= 2)
                    if got == "200" and champions[model] not in (text or ""):
                        got = "200 from another model"
                    results.append((sent, time.monotonic(), model, got))
                    if got != "200":
                        time.sleep(0.5)  # as a client honouring Retry-After would, only faster

        def answered_again(model: str) -> bool:
            return any(s > kill_at and m == model and got == "200" for s, _, m, got in results)

        killed = threading.Event()

        def place_then_kill(*args: object, **kwargs: object) -> object:
            placed = place_job(*args, **kwargs)
            if not killed.is_set():
                nonlocal kill_at
                kill_at = time.monotonic()
                psutil.Process(before["pid"]).kill()  # SIGKILL, the leader alone, as the OOM killer would
                killed.set()
            return placed

        kill_at = float("inf")
        monkeypatch.setattr(deploy, "place_job", place_then_kill)
        with ThreadPoolExecutor(CLIENTS + 1) as pool:
            workers = [pool.submit(load, i) for i in range(CLIENTS)]
            time.sleep(3)  # requests in flight when vLLM dies
            # A reconcile pass (the reconciler's drift check, an alias event) whose server dies under it.
            reconciled = pool.submit(served.deploy, registries[0])
            assert killed.wait(60), "the pass never placed its job"
            deadline = time.monotonic() + 480  # liveness: vLLM's start on 2 busy cores, not a speed bound
            while not all(answered_again(m) for m in MODELS) and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(5)  # the load keeps running on the restarted vLLM
            stop.set()
            for worker in workers:
                worker.result()
            report = reconciled.result(timeout=600)

        counts = Counter(got for _, _, _, got in results)
        after_kill = [(s, a, m, got) for s, a, m, got in results if a > kill_at]
        first_503 = min((a - kill_at for _, a, _, got in after_kill if got == "503"), default=None)
        back = {m: min((a - kill_at for s, a, mm, got in after_kill if mm == m and got == "200" and s > kill_at),
                       default=None) for m in MODELS}
        print(f"[timing] vLLM SIGKILL -> first 503 after {first_503} s, each job's first 200 through its stable "
              f"name after {back} s; {CLIENTS} clients got {dict(counts)}")
        assert all(seconds is not None for seconds in back.values()), f"a job never answered again: {back}"
        assert counts["refused"] == 0 and set(counts) <= {"200", "503", "cut"}, dict(counts)
        assert counts["503"] > 0, "the restart window was never seen"
        # Only a response already streaming when vLLM died can be cut; one sent later got a 503 or a 200.
        assert all(s < kill_at for s, _, _, got in results if got == "cut"), dict(counts)

        after = read_server(server_id).process
        assert read_endpoint().process["pid"] == endpoint_pid, "the endpoint must not go down with vLLM"
        assert after["pid"] != before["pid"] and alive(psutil.Process(after["pid"]))
        # The supervisor reloaded both champions from the registry's files: the pass had nothing to load or check.
        assert report.routes == {MODELS[0]: champions[MODELS[0]]} and report.canaries == [], report
        assert [served.chat(m).json()["model"] for m in MODELS] == [champions[m] for m in MODELS]
    finally:
        stopped = served.stop()
        os.environ.pop(KEY_ENV, None)
    assert {after["pid"], endpoint_pid} <= set(stopped)
    assert all(gone(pid) for pid in stopped), stopped


def gone(pid: int) -> bool:
    try:
        return not alive(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return True

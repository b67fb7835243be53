"""Several jobs on one base, real processes (one endpoint, one vLLM, an MLflow registry per job): two jobs answer
through one port from one vLLM; promoting one never disturbs the other's streams; a third job whose adapters need
a larger rank than the server allows grows the server (503 + Retry-After meanwhile, never a refused connection
or a cut response) and the reason is tagged on its version; a version its server lost is
drift, loaded again by the next pass. The tests run in file order on one endpoint."""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from loraflow.config import ConfigError
from loraflow.serving.client import ServerClient
from loraflow.serving.drift import drift
from loraflow.serving.names import base_name, versioned_name
from loraflow.serving.placement import RESTART_TAG
from loraflow.serving.records import job_records, read_server, server_records
from tests.fixtures import ALL_LINEAR, ATTENTION, RegistryFixture, make_adapter, make_registry
from tests.fixtures.serving import PROMPT, ServedJobs

pytestmark = pytest.mark.slow

KEY_ENV, KEY = "LORAFLOW_TEST_JOBS_KEY", "jobs-key-not-a-secret"
KO, INTENT, WIDE = "jobs-ko", "jobs-intent", "jobs-wide"


@pytest.fixture(scope="module")
def registries(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, RegistryFixture]:
    root = tmp_path_factory.mktemp("jobs")
    made = {model: make_registry(root / model, model) for model in (KO, INTENT, WIDE)}
    for model, seeds, rank in ((KO, (11, 12), 8), (INTENT, (13,), 16), (WIDE, (14,), 64)):
        for seed in seeds:
            made[model].register(make_adapter(tiny_base_dir, root / f"{model}-{seed}", r=rank,
                                              targets=ALL_LINEAR if rank > 8 else ATTENTION, seed=seed))
        made[model].set_alias("champion", "1")
    return made


@pytest.fixture(scope="module")
def served(registries: dict[str, RegistryFixture]) -> Iterator[ServedJobs]:
    os.environ[KEY_ENV] = KEY
    jobs = ServedJobs(KEY_ENV, KEY)
    try:
        yield jobs
    finally:
        jobs.stop()
        os.environ.pop(KEY_ENV, None)


def stable(served: ServedJobs, model: str) -> str:
    return served.chat(model).json()["model"]


def test_two_jobs_answer_through_one_port_from_one_vllm(served: ServedJobs,
                                                         registries: dict[str, RegistryFixture]) -> None:
    ko = served.deploy(registries[KO])
    intent = served.deploy(registries[INTENT], config="configs/tiny-intent.yaml")
    assert ko.server == intent.server and len(server_records()) == 1, "both jobs' adapters on one vLLM"
    servers = {r.model: r.server for r in job_records()}  # this session's other modules' jobs are recorded too
    assert (servers[KO], servers[INTENT]) == (ko.server, ko.server)
    ids = served.model_ids()
    assert {KO, INTENT, versioned_name(KO, 1), versioned_name(INTENT, 1), base_name(KO), base_name(INTENT),
            ko.server} <= ids
    assert stable(served, KO) == versioned_name(KO, 1) and stable(served, INTENT) == versioned_name(INTENT, 1)
    reply = httpx.get(f"{served.url}/v1/models", headers=served.headers(), timeout=30)
    listing = {entry["id"]: entry["root"] for entry in reply.json()["data"]}
    assert listing[KO] == versioned_name(KO, 1) and listing[base_name(INTENT)] == ko.server


def test_a_job_whose_endpoint_settings_differ_fails_naming_the_field(served: ServedJobs,
                                                                     registries: dict[str, RegistryFixture]) -> None:
    for field, value in (("serving.port", served.port + 1), ("serving.api_key_env", "ANOTHER_KEY_ENV")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            served.deploy(registries[WIDE], **{field: value})
    assert WIDE not in {r.model for r in job_records()}, "nothing of it may be served"


def test_promoting_one_job_leaves_the_others_streams_untouched(served: ServedJobs,
                                                               registries: dict[str, RegistryFixture]) -> None:
    """The intent job streams greedily while the ko job's champion moves; every stream completes with exactly the
    text it gives when nothing moves (a load beside it must never decode it with another adapter)."""
    body = {"model": INTENT, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 48, "temperature": 0}
    expected = served.chat(INTENT, max_tokens=48).json()["choices"][0]["message"]["content"]
    stop, streams = threading.Event(), []

    def stream() -> None:
        with httpx.Client(headers=served.headers(), timeout=120) as client:
            while not stop.is_set():
                text, done = "", False
                with client.stream("POST", f"{served.url}/v1/chat/completions", json={**body, "stream": True}) as r:
                    for line in r.iter_lines():
                        if line == "data: [DONE]":
                            done = True
                        elif line.startswith("data: "):
                            text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                streams.append((r.status_code, done, text))

    registries[KO].set_alias("champion", "2")
    with ThreadPoolExecutor(8) as pool:
        workers = [pool.submit(stream) for _ in range(8)]
        time.sleep(2)
        report = served.deploy(registries[KO])
        time.sleep(2)
        stop.set()
        for worker in workers:
            worker.result()
    assert report.routes == {KO: versioned_name(KO, 2)} and stable(served, KO) == versioned_name(KO, 2)
    failed = [s for s in streams if s != (200, True, expected)]
    print(f"[streams] {len(streams)} {INTENT} streams during the {KO} promotion, {len(failed)} failed or changed")
    assert streams and failed == []
    assert stable(served, INTENT) == versioned_name(INTENT, 1)


def test_a_job_needing_a_larger_rank_grows_the_shared_server_without_failing_requests(
        served: ServedJobs, registries: dict[str, RegistryFixture]) -> None:
    server_id = {r.model: r.server for r in job_records()}[KO]
    before = read_server(server_id)
    assert before is not None and before.max_lora_rank == 16
    outcomes: Counter[str] = Counter()
    stop = threading.Event()

    def ask() -> None:
        with httpx.Client(headers=served.headers(), timeout=120) as client:
            while not stop.is_set():
                try:
                    reply = client.post(f"{served.url}/v1/chat/completions", json={
                        "model": KO, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8})
                except httpx.ConnectError:
                    outcomes["refused"] += 1
                    continue
                except httpx.TransportError:
                    outcomes["cut"] += 1
                    continue
                retry = reply.status_code == 503 and int(reply.headers.get("retry-after", 0)) > 0
                outcomes["503" if retry else str(reply.status_code)] += 1
                if reply.status_code != 200:
                    time.sleep(0.5)

    with ThreadPoolExecutor(5) as pool:
        workers = [pool.submit(ask) for _ in range(4)]
        report = pool.submit(served.deploy, registries[WIDE]).result(timeout=900)
        time.sleep(2)
        stop.set()
        for worker in workers:
            worker.result()
    after = read_server(server_id)
    print(f"[restart] requests to {KO} while the server grew to rank 64: {dict(outcomes)}")
    assert after is not None and after.max_lora_rank == 64 and after.process["pid"] != before.process["pid"]
    assert report.server == server_id and report.routes == {WIDE: versioned_name(WIDE, 1)}
    assert set(outcomes) <= {"200", "503"} and outcomes["503"] > 0, dict(outcomes)
    assert "--max-lora-rank 16 -> 64" in registries[WIDE].tags("1")[RESTART_TAG]
    # Every job answers with its own champion on the restarted server (its adapters reloaded there).
    assert [stable(served, m) for m in (KO, INTENT, WIDE)] == [versioned_name(KO, 2), versioned_name(INTENT, 1),
                                                                versioned_name(WIDE, 1)]


def test_a_version_its_server_lost_is_drift_and_the_next_pass_loads_it_again(
        served: ServedJobs, registries: dict[str, RegistryFixture]) -> None:
    """A restart that could not load one of a job's versions again (refused, or loaded a moment after the
    supervisor's last look) leaves the job's entry naming a version its server lacks: the drift check names it and
    the job's next pass loads it again, through the canary."""
    server = read_server({r.model: r.server for r in job_records()}[KO])
    assert server is not None
    champion, vllm = versioned_name(KO, 2), ServerClient(server.url, KEY)
    vllm.unload_adapter(champion)
    assert drift(served.job(registries[KO])) == f"drift: {champion} not loaded on {server.server_id}"
    assert drift(served.job(registries[INTENT])) is None, "another job's entry is not its drift"
    served.deploy(registries[KO])
    assert champion in vllm.served_models() and stable(served, KO) == champion
    assert drift(served.job(registries[KO])) is None

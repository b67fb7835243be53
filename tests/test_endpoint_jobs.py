"""The endpoint's table: one entry per job, each replaced as a whole; several base servers behind one port, each
job's names reaching its own; a server restarting answers 503 for its names only. Fast: fake upstreams that are real
HTTP servers (tests/fixtures/fake_vllm.py)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from loraflow.serving.client import ADMIN_PATH
from tests.fixtures.fake_vllm import JOBS, ROUTES_PATH, SERVER, Upstream, endpoint, one_server, serve


def test_bad_job_entries_are_400_json_and_change_nothing(fake: Upstream, tmp_path: Path) -> None:
    with one_server(fake.url, tmp_path) as url, httpx.Client(base_url=url, timeout=10) as client:
        jobs = f"{ADMIN_PATH}/jobs/tiny"
        for raw in (b"", b"{", b"[]", b'"x"', b"{}", b'{"server": ""}', b'{"server": 1}', b"\xff",
                    json.dumps({"server": SERVER, "stable": "tiny-v4", "versions": ["tiny-v3"]}).encode(),
                    json.dumps({"server": SERVER, "stable": None, "versions": [""]}).encode(),
                    json.dumps({"server": "base-unknown", "stable": None, "versions": []}).encode()):
            reply = client.put(jobs, content=raw)
            assert reply.status_code == 400 and reply.json()["error"]["message"], raw
        assert client.post(jobs, json={}).status_code == 405 and client.put(ROUTES_PATH, json={}).status_code == 405
        assert client.get(f"{ADMIN_PATH}/nope").status_code == 404
        assert json.loads((tmp_path / "routes.json").read_text()) == {"jobs": JOBS}
        moved = {"server": SERVER, "stable": "tiny-v4", "versions": ["tiny-v3", "tiny-v4"]}
        assert client.put(jobs, json=moved).json()["jobs"]["tiny"] == moved
        assert json.loads((tmp_path / "routes.json").read_text()) == {"jobs": {"tiny": moved}}
        assert fake.seen == []


def test_jobs_on_two_servers_each_answer_by_model_and_one_jobs_entry_moves_alone(tmp_path: Path) -> None:
    """Two base servers behind one port: every job's names reach its own server; replacing one job's entry (its
    promotion) leaves the other's routes as they were; /v1/models and /metrics cover both servers."""
    ko, intent = Upstream(), Upstream(base="base-other-1111bbbb", adapters=("intent-v1", "intent-v2"))
    jobs = {**JOBS, "intent": {"server": intent.base, "stable": "intent-v1", "versions": ["intent-v1"]}}
    with serve(ko.app) as ko.url, serve(intent.app) as intent.url, \
            endpoint({SERVER: ko.url, intent.base: intent.url}, tmp_path, jobs=jobs) as (url, _), \
            httpx.Client(base_url=url, timeout=10) as client:
        for model, upstream, name in (("tiny", ko, "tiny-v3"), ("tiny-v3", ko, "tiny-v3"),
                                      ("intent", intent, "intent-v1"), ("intent-base", intent, intent.base),
                                      ("tiny-base", ko, SERVER), (intent.base, intent, intent.base)):
            seen = client.post("/v1/completions", json={"model": model, "prompt": "x"}).json()
            assert json.loads(seen["body"])["model"] == name and upstream.seen[-1] == seen, model
        listed = {entry["id"]: entry["root"] for entry in client.get("/v1/models").json()["data"]}
        # intent-v2 is loaded on its server but in no job's entry: not routed, so not listed.
        assert listed["intent"] == "intent-v1" and listed["tiny"] == "tiny-v3" and "intent-v2" not in listed
        metrics = client.get("/metrics").text
        assert metrics.count("# TYPE vllm:x counter") == 1 and f'model_name="{intent.base}"' in metrics
        assert f'model_name="{SERVER}"' in metrics

        promoted = {"server": intent.base, "stable": "intent-v2", "versions": ["intent-v1", "intent-v2"]}
        assert client.put(f"{ADMIN_PATH}/jobs/intent", json=promoted).status_code == 200
        assert json.loads(client.post("/v1/completions", json={"model": "intent", "prompt": "x"}).json()["body"])[
            "model"] == "intent-v2"
        assert json.loads(client.post("/v1/completions", json={"model": "tiny", "prompt": "x"}).json()["body"])[
            "model"] == "tiny-v3"
        assert client.get(ROUTES_PATH).json()["jobs"]["tiny"] == JOBS["tiny"]
        assert "intent-v2" in {entry["id"] for entry in client.get("/v1/models").json()["data"]}

        # A model nobody serves is a 404 naming it; a POST of vLLM's own that names no model cannot be routed
        # between two servers (400); a GET of vLLM's own (/version) goes to the first server.
        missing = client.post("/v1/chat/completions", json={"model": "nobody", "messages": []})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
        assert client.post("/tokenize", json={"prompt": "x"}).status_code == 400
        assert client.get("/version").json()["method"] == "GET"
        assert client.delete(f"{ADMIN_PATH}/jobs/intent").status_code == 200
        assert client.post("/v1/completions", json={"model": "intent", "prompt": "x"}).status_code == 404


def test_a_restarting_server_answers_503_for_its_names_only(fake: Upstream, tmp_path: Path) -> None:
    other = Upstream(base="base-other-1111bbbb", adapters=("intent-v1",))
    jobs = {**JOBS, "intent": {"server": other.base, "stable": "intent-v1", "versions": ["intent-v1"]}}
    with serve(other.app) as other.url, endpoint({SERVER: fake.url, other.base: other.url}, tmp_path,
                                                 jobs=jobs) as (url, supervisor):
        supervisor.restarting.add(SERVER)  # what the supervisor marks while it restarts a vLLM
        with httpx.Client(base_url=url, timeout=10) as client:
            down = client.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
            assert down.status_code == 503 and int(down.headers["retry-after"]) > 0
            assert "restarting" in down.json()["error"]["message"]
            assert client.post("/v1/completions", json={"model": "intent", "prompt": "x"}).status_code == 200
            assert client.get(ROUTES_PATH).json()["servers"][SERVER]["restarting"] is True

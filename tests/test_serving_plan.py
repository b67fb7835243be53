"""Which jobs share a base server, what a server must hold, what `loraflow plan --serving` says a set of jobs
takes, and what `loraflow status` says about sharing: offline, no server started."""

from __future__ import annotations

import json
from dataclasses import replace

import psutil
import pytest

from loraflow.cli import main
from loraflow.config import load_config
from loraflow.localstack.lifecycle import describe_serving
from loraflow.process import record_of
from loraflow.serving import records
from loraflow.serving.memory_plan import plan_serving
from loraflow.serving.server_spec import SLOT_STEP, Capacity, combined, server_spec

KO, INTENT, QWEN = "configs/tiny-ko.yaml", "configs/tiny-intent.yaml", "configs/qwen-ko.yaml"


def test_jobs_of_one_base_and_settings_share_a_server_and_a_difference_is_named() -> None:
    ko, intent = server_spec(load_config(KO), pin=False), server_spec(load_config(INTENT), pin=False)
    assert ko == intent and ko.server_id.startswith("base-tiny-ko-")  # different LoRA, data, task: same server
    longer = server_spec(load_config(INTENT, {"serving.max_model_len": 2048}), pin=False)
    assert longer.server_id != ko.server_id
    assert longer.differences(ko) == ["serving.max_model_len: 2048 here, 1024 there"]
    assert server_spec(load_config(QWEN), pin=False).base == "Qwen/Qwen2.5-7B-Instruct"


def test_a_servers_capacity_holds_every_job_in_steps() -> None:
    assert combined([Capacity(16, 3)]) == Capacity(16, SLOT_STEP)
    assert combined([Capacity(16, 3), Capacity(8, 3), Capacity(64, 3)]) == Capacity(64, SLOT_STEP * 2)
    assert Capacity(16, 8).growth(Capacity(64, 16)) == "--max-lora-rank 16 -> 64, --max-loras 8 -> 16"
    assert Capacity(64, 16).holds(Capacity(16, 9)) and not Capacity(16, 8).holds(Capacity(32, 8))


def test_serving_plan_counts_the_base_once_per_server() -> None:
    jobs = [load_config(KO), load_config(INTENT), load_config(KO, {"name": "third", "registry.model_name": "third"})]
    plan = plan_serving(jobs)
    [server] = plan.servers
    assert server.jobs == ["tiny-ko", "tiny-intent", "third"] and server.max_loras == 16
    assert plan.shared_gib == pytest.approx(server.weights_gib + server.lora_gib, abs=1e-3)
    # One vLLM per job holds the base three times, and each its own SLOT_STEP slots (half the shared server's 16).
    assert plan.separate_gib == pytest.approx(3 * server.weights_gib + 3 * server.lora_gib / 2, abs=2e-3)
    assert plan_serving([load_config(QWEN)]).separate_gib == plan_serving([load_config(QWEN)]).shared_gib
    qwen = plan_serving([load_config(QWEN)]).servers[0]
    assert qwen.dtype == "bfloat16" and qwen.weights_gib == pytest.approx(7_615_616_512 * 2 / 1024**3, abs=1e-3)
    # KV per token: 2 (k, v) x 28 layers x 4 KV heads x 128 dims x 2 bytes.
    assert qwen.kv_bytes_per_token == 2 * 28 * 4 * 128 * 2
    assert qwen.total_gib["H100 80 GB"] == pytest.approx(0.45 * 81559 / 1024, abs=0.01)


def test_plan_serving_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--serving", KO, INTENT]) == 0
    text = capsys.readouterr().out
    assert "for tiny-ko, tiny-intent" in text and "once, shared by 2 job(s)" in text
    assert main(["plan", "--serving", "--json", KO, QWEN]) == 0
    assert len(json.loads(capsys.readouterr().out)["servers"]) == 2
    assert main(["plan", KO]) == 0
    assert "serving (with every other job of its base" in capsys.readouterr().out
    assert main(["plan", KO, INTENT]) == 2  # several jobs only with --serving


def test_status_says_which_jobs_share_which_server_and_why_one_does_not(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LORAFLOW_HOME", str(tmp_path))
    assert describe_serving(tmp_path) == [
        "serving        off (a finetune run of a served job, or `loraflow serve CONFIG`, starts it)"]
    me = record_of(psutil.Process(), argv=["x"], log="x")
    shared = server_spec(load_config(KO), pin=False)
    own = replace(shared, max_model_len=512)
    records.save_endpoint(records.EndpointRecord("http://127.0.0.1:8000", "127.0.0.1", 8000, "K", me))
    for spec in (shared, own):
        records.save_server(records.ServerRecord(spec.server_id, "http://127.0.0.1:1", 1, "sha", spec.__dict__,
                                                 {"max_lora_rank": 16, "max_loras": 8}, me))
    for model, spec, notes in (("tiny-ko", shared, []), ("tiny-intent", shared, []),
                               ("short", own, [f"not on {shared.server_id}: " + "; ".join(own.differences(shared))])):
        records.save_job(records.JobRecord(model, model, "c.yaml", {}, spec.server_id, {}, notes=notes))
    lines = describe_serving(tmp_path)
    assert lines[0] == f"endpoint       http://127.0.0.1:8000/v1 (pid {me['pid']})"
    assert f"base server    {shared.server_id} (pid {me['pid']}, --max-lora-rank 16, --max-loras 8): " \
           "tiny-intent, tiny-ko" in lines
    assert f"  short: not on {shared.server_id}: serving.max_model_len: 512 here, 1024 there" in lines

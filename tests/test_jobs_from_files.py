"""Jobs from files: every job config gets its deployments from the config itself (loraflow/localstack/jobs.py),
offline: what is generated, which files are jobs, and what a broken or duplicate file is told."""

from __future__ import annotations

from pathlib import Path

import yaml

from loraflow.config import load_config
from loraflow.localstack import jobs
from loraflow.localstack.stack import PREFECT_FILE, Stack


def test_a_served_job_gets_finetune_and_parity_and_its_schedule() -> None:
    qwen = {d["entrypoint"]: d for d in jobs.deployments_of(Path("configs/qwen-ko.yaml"),
                                                            load_config("configs/qwen-ko.yaml"))}
    finetune, parity = qwen["flows/finetune.py:finetune"], qwen["flows/parity.py:parity"]
    assert (finetune["name"], finetune["parameters"]) == ("qwen-ko", {"config": "configs/qwen-ko.yaml"})
    assert finetune["schedules"] == [{"cron": "0 3 * * 0", "timezone": "Asia/Seoul", "slug": "schedule",
                                      "active": True}]
    assert finetune["description"].startswith("qwen-ko: Qwen2.5-7B-Instruct adapted to Korean")
    assert jobs.GENERATED_TAG in finetune["tags"] and jobs.GENERATED_TAG in parity["tags"]
    [trigger] = parity["triggers"]
    assert trigger["match"] == {"prefect.resource.id": "loraflow.served-model.qwen-ko"}
    assert trigger["expect"] == [jobs.CHAMPION_ROUTED]
    assert trigger["parameters"] == {"config": "configs/qwen-ko.yaml", "version": "{{ event.payload.version }}"}
    assert "concurrency_limit" not in parity  # a crashed run can hold no deployment slot


def test_a_job_that_is_not_served_gets_its_finetune_only(tmp_path: Path) -> None:
    (tmp_path / "x.yaml").write_text("# x: a job of mine\nname: x\n")
    made = jobs.deployments_of(tmp_path / "x.yaml", load_config("configs/tiny-ko.yaml", {"serving.enabled": False}))
    assert [d["entrypoint"] for d in made] == ["flows/finetune.py:finetune"]
    assert made[0]["parameters"] == {"config": str((tmp_path / "x.yaml").resolve())}
    assert made[0]["description"] == f"x: a job of mine ({(tmp_path / 'x.yaml').resolve()})"
    assert "schedules" not in made[0]


def test_the_shipped_configs_are_the_jobs_and_the_generated_file_deploys_them(tmp_path: Path) -> None:
    stack = Stack(home=tmp_path)
    files = jobs.job_files(stack)
    assert [f.name for f in files] == ["banking77-qwen1.5b.yaml", "qwen-ko-dpo.yaml", "qwen-ko.yaml",
                                       "tiny-intent.yaml", "tiny-ko-dpo.yaml", "tiny-ko.yaml"]
    found, errors = jobs.read_jobs(files)
    assert errors == []
    document = yaml.safe_load(jobs.write_prefect_file(stack, PREFECT_FILE, found, []).read_text())
    assert document["pull"] == yaml.safe_load(PREFECT_FILE.read_text())["pull"]
    names = {f"{d['entrypoint'].rsplit(':', 1)[1]}/{d['name']}" for d in document["deployments"]}
    assert names == jobs.generated_names(found) >= {"finetune/tiny-ko", "parity/tiny-ko", "finetune/tiny-intent",
                                                    "parity/tiny-intent", "finetune/qwen-ko"}
    assert {j.name: (j.model, j.serving) for j in jobs.deployed_jobs(stack)}["tiny-intent"] == ("tiny-intent", True)


def test_a_file_named_by_path_is_remembered_until_it_is_gone(tmp_path: Path) -> None:
    stack, extra = Stack(home=tmp_path / "home"), tmp_path / "mine.yaml"
    config = yaml.safe_load(Path("configs/tiny-ko.yaml").read_text())
    extra.write_text(yaml.safe_dump({**config, "name": "mine", "registry": {"model_name": "mine"}}))
    found, _ = jobs.read_jobs(jobs.job_files(stack, [str(extra)]))
    jobs.write_prefect_file(stack, PREFECT_FILE, found, [str(extra)])
    assert extra.resolve() in [f.resolve() for f in jobs.job_files(stack)]  # a later deploy still has it
    extra.unlink()
    found, errors = jobs.read_jobs(jobs.job_files(stack))
    assert "mine" not in {job.name for job in found.values()} and errors == []


def test_broken_and_duplicate_job_files_are_named(tmp_path: Path) -> None:
    broken, twin = tmp_path / "broken.yaml", tmp_path / "twin.yaml"
    broken.write_text("name: broken\nmodel: {base: embedded:tiny-ko}\ntraining: {learning_rate: -1}\n")
    twin.write_text(Path("configs/tiny-ko.yaml").read_text())
    found, errors = jobs.read_jobs([Path("configs/tiny-ko.yaml"), broken, twin])
    assert list(found) == [Path("configs/tiny-ko.yaml")]
    assert errors[0].startswith(f"{broken}: ") and "training.learning_rate" in errors[0]
    assert errors[1] == (f"{twin}: job name 'tiny-ko' is already configs/tiny-ko.yaml's: a job's deployments are "
                         "named after it, so names are unique")

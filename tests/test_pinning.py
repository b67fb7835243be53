"""Pin once, key once: the pre-flight resolves every moving reference (the base's and each data source's) once, and
the dataset key, the build and the lineage all read that one pinned value, even when `main` moves mid-run."""

from __future__ import annotations

from pathlib import Path

import pytest
from datasets import load_from_disk
from prefect import flow
from pydantic import ValidationError

import loraflow.data.sources
from loraflow.data.keys import dataset_key
from loraflow.data.sources import PinnedData, SourceFingerprint, pin_data
from loraflow.registry.lineage import source_tags
from loraflow.results import DatasetResult
from tasks.build_dataset import build_dataset
from tasks.validate import validated_job
from tests.fixtures import TINY_CONFIG
from tests.fixtures.sources import SHA1, SHA2, chat_row, hub_rows, hub_snapshot, write_jsonl

pytest_plugins = ["tests.fixtures.sources"]  # the `hub_cache` fixture
FIELDS = {"prompt": "instruction", "response": "output"}


@pytest.mark.slow  # a real Prefect flow run (Prefect's temporary server)
def test_a_cache_miss_fingerprints_each_source_once_and_loads_the_pinned_commit(
        tmp_path: Path, hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub_snapshot(hub_cache, "datasets--org--name", SHA1, {"data.jsonl": hub_rows("old", 4)})
    local = write_jsonl(tmp_path / "local" / "a.jsonl", [chat_row(f"local{i}", "x") for i in range(4)])
    sources = [{"path": str(local.parent)}, {"hub_id": "org/name", "revision": "main", "fields": FIELDS}]
    calls: list[str] = []
    real = loraflow.data.sources.source_fingerprint

    def counted(source, index=None) -> SourceFingerprint:
        calls.append(source.label)
        return real(source, index)

    monkeypatch.setattr(loraflow.data.sources, "source_fingerprint", counted)

    @flow
    def dataset_flow() -> tuple[PinnedData, DatasetResult]:
        """The finetune flow's first two lines, with `main` moving between the pre-flight and the build."""
        job, data, _ = validated_job(str(TINY_CONFIG), {"data.sources": sources})
        assert job.data == data.data and job.data.sources[1].revision == SHA1
        hub_snapshot(hub_cache, "datasets--org--name", SHA2, {"data.jsonl": hub_rows("new", 6)})
        return data, build_dataset(data)

    pinned, result = dataset_flow()
    assert len(calls) == 2, f"fingerprinted {len(calls)} times for 2 sources: {calls}"
    # Keyed, loaded and tagged as the commit `main` held at flow start, not the one it moved to.
    assert result.key == dataset_key(pinned)
    splits = load_from_disk(result.dataset_dir)
    prompts = sorted(r["messages"][-2]["content"] for r in [*splits["train"], *splits["eval"]])
    assert prompts == sorted([f"local{i}" for i in range(4)] + [f"old{i}" for i in range(4)])
    assert source_tags(result.manifest)["data.sources.1.revision"] == SHA1
    assert dataset_key(pin_data(pinned.data.model_copy(update={"sources": [
        pinned.data.sources[0], pinned.data.sources[1].model_copy(update={"revision": "main"})]}))) != result.key


def test_a_pinned_value_refuses_a_config_of_another_commit(tmp_path: Path, hub_cache: Path) -> None:
    hub_snapshot(hub_cache, "datasets--org--name", SHA1, {"data.jsonl": hub_rows("q", 2)})
    pinned = pin_data(PinnedData.model_fields["data"].annotation.model_validate(  # type: ignore[union-attr]
        {"sources": [{"hub_id": "org/name", "fields": FIELDS}]}))
    assert pinned.data.sources[0].revision == SHA1 == pinned.fingerprints[0].revision
    moved = pinned.data.model_copy(update={"sources": [pinned.data.sources[0].model_copy(update={"revision": SHA2})]})
    with pytest.raises(ValidationError, match=r"data\.sources\[0\]\.revision: '2{40}' is not the pinned hub"):
        PinnedData(data=moved, fingerprints=pinned.fingerprints)

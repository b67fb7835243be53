"""Sources keyed by what they are: local files by content (file, directory or glob), hub datasets and bases by the
commit their revision resolves to, through huggingface_hub's own resolution against a hub cache built here."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import pandas as pd
import pytest
from datasets import load_from_disk

from loraflow.base.revision import resolve_model_revision
from loraflow.config import load_config
from loraflow.config.data import DataConfig
from loraflow.config.model import ModelConfig
from loraflow.data.build_dataset import build_dataset
from loraflow.data.keys import chat_key, dataset_key
from loraflow.data.sources import pin_data, source_fingerprint
from loraflow.hub import RevisionError
from loraflow.registry.lineage import base_revision_tag, changes_markdown, data_changes, source_tags
from loraflow.results import ChatResult, DatasetResult
from loraflow.training.keys import train_key
from tests.fixtures.sources import SHA1, SHA2, chat_row, hub_rows, hub_snapshot, write_jsonl

pytest_plugins = ["tests.fixtures.sources"]  # the `hub_cache` fixture
REPO = Path(__file__).resolve().parent.parent


def _build(tmp_path: Path, data: DataConfig, name: str = "out") -> tuple[DatasetResult, list[dict], list]:
    out = tmp_path / name
    out.mkdir()
    pinned = pin_data(data)  # as the flow's pre-flight does: keyed and built from one fingerprint
    result = build_dataset(pinned, out, dataset_key(pinned))
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    splits = load_from_disk(result.dataset_dir)
    return result, rejected, [r["messages"][0]["content"] for r in [*splits["train"], *splits["eval"]]]


# --- local sources ----------------------------------------------------------------------------------------


def test_directory_key_follows_file_contents_not_mtimes(tmp_path: Path):
    data = tmp_path / "data"
    write_jsonl(data / "a.jsonl", [chat_row(f"a{i}", "x") for i in range(5)])
    write_jsonl(data / "b.jsonl", [chat_row(f"b{i}", "x") for i in range(5)])
    config = DataConfig(sources=[{"path": str(data)}])
    k1 = dataset_key(config)
    os.utime(data / "a.jsonl", (1_000_000, 1_000_000))  # touched, same bytes
    (data / "README.md").write_text("not data")  # not a supported format
    write_jsonl(data / ".ipynb_checkpoints" / "a-checkpoint.jsonl", [chat_row("stale", "x")])  # hidden: skipped
    assert dataset_key(config) == k1
    write_jsonl(data / "c.jsonl", [chat_row("c0", "x")])
    k2 = dataset_key(config)
    write_jsonl(data / "b.jsonl", [chat_row(f"b{i}", "y") for i in range(5)])
    k3 = dataset_key(config)
    (data / "c.jsonl").unlink()
    k4 = dataset_key(config)
    assert len({k1, k2, k3, k4}) == 4
    assert [e.path for e in source_fingerprint(config.sources[0]).files] == ["a.jsonl", "b.jsonl"]


def test_directory_rows_from_every_file_and_format_land_in_the_dataset(tmp_path: Path):
    data = tmp_path / "data"
    fields = {"prompt": "instruction", "response": "output"}
    write_jsonl(data / "a.jsonl", [{"instruction": f"j{i}", "output": "x"} for i in range(4)] + [{"instruction": "q"}])
    write_jsonl(data / "nested" / "b.jsonl", [{"instruction": f"n{i}", "output": "x"} for i in range(3)])
    pd.DataFrame({"instruction": [f"c{i}" for i in range(3)], "output": ["x"] * 3}).to_csv(data / "c.csv", index=False)
    pd.DataFrame({"instruction": [f"p{i}" for i in range(2)], "output": ["x"] * 2}).to_parquet(data / "d.parquet")
    config = DataConfig(sources=[{"path": str(data), "fields": fields}])
    result, rejected, prompts = _build(tmp_path, config)
    assert sorted(prompts) == sorted([f"j{i}" for i in range(4)] + [f"n{i}" for i in range(3)]
                                     + [f"c{i}" for i in range(3)] + [f"p{i}" for i in range(2)])
    assert [(r["file"], r["row"]) for r in rejected] == [("a.jsonl", 5)]
    assert result.stats["sources"][str(data)] == {"read": 13, "kept": 12, "rejected": 1}
    files = {e["path"]: e for e in result.manifest["files"]}
    assert {p: e["rows"] for p, e in files.items()} == {"a.jsonl": 5, "c.csv": 3, "d.parquet": 2,
                                                        "nested/b.jsonl": 3}
    assert json.loads((Path(result.path) / "manifest.json").read_text()) == result.manifest
    manifest_sha = result.manifest["sources"][0]["manifest_sha"]
    assert source_tags(result.manifest) == {"data.sources.0.manifest_sha": manifest_sha}


def test_format_applies_to_every_file_of_the_source(tmp_path: Path):
    write_jsonl(tmp_path / "data" / "a.json", [chat_row(f"q{i}", "x") for i in range(4)])  # JSON lines named .json
    _, _, prompts = _build(tmp_path, DataConfig(sources=[{"path": str(tmp_path / "data"), "format": "jsonl"}]))
    assert sorted(prompts) == [f"q{i}" for i in range(4)]


def test_glob_source_reads_and_keys_its_matches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "data" / "a.jsonl", [chat_row(f"a{i}", "x") for i in range(3)])
    write_jsonl(tmp_path / "data" / "b.jsonl", [chat_row(f"b{i}", "x") for i in range(3)])
    write_jsonl(tmp_path / "data" / "sub" / "c.jsonl", [chat_row("c0", "x")])  # not matched by data/*.jsonl
    config = DataConfig(sources=[{"path": "data/*.jsonl"}])
    key = dataset_key(config)
    result, _, prompts = _build(tmp_path, config)
    assert sorted(prompts) == ["a0", "a1", "a2", "b0", "b1", "b2"]
    assert [e["path"] for e in result.manifest["files"]] == ["a.jsonl", "b.jsonl"]
    write_jsonl(tmp_path / "data" / "d.jsonl", [chat_row("d0", "x")])
    assert dataset_key(config) != key
    recursive = DataConfig(sources=[{"path": "data/**/*.jsonl"}])
    assert [e.path for e in source_fingerprint(recursive.sources[0]).files] == [
        "a.jsonl", "b.jsonl", "d.jsonl", "sub/c.jsonl"]


def test_an_empty_match_names_the_field_and_the_path(tmp_path: Path):
    good = write_jsonl(tmp_path / "good.jsonl", [chat_row("q", "a")])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no data here")
    with pytest.raises(FileNotFoundError, match=r"data\.sources\[1\]\.path: no jsonl/json/csv/parquet file in "
                                                r"directory .*empty"):
        dataset_key(DataConfig(sources=[{"path": str(good)}, {"path": str(tmp_path / "empty")}]))
    with pytest.raises(FileNotFoundError, match=r"data\.sources\[0\]\.path: no file matches .*/nothing/\*\.jsonl"):
        dataset_key(DataConfig(sources=[{"path": str(tmp_path / "nothing" / "*.jsonl")}]))


# --- hub sources and bases, offline, through huggingface_hub's resolution -----------------------------------


def test_hub_dataset_key_and_rows_follow_the_branch(tmp_path: Path, hub_cache: Path):
    hub_snapshot(hub_cache, "datasets--org--name", SHA1, {"data.jsonl": hub_rows("old", 4)})
    config = DataConfig(sources=[{"hub_id": "org/name", "revision": "main",
                                  "fields": {"prompt": "instruction", "response": "output"}}])
    k1 = dataset_key(config)
    assert dataset_key(config) == k1  # the branch did not move: a cache hit
    assert source_fingerprint(config.sources[0]).revision == SHA1
    first, _, prompts = _build(tmp_path, config, "o1")
    assert sorted(prompts) == [f"old{i}" for i in range(4)]

    hub_snapshot(hub_cache, "datasets--org--name", SHA2, {"data.jsonl": hub_rows("new", 6)})  # main moves
    k2 = dataset_key(config)
    assert k2 != k1
    pinned = DataConfig(sources=[config.sources[0].model_dump() | {"revision": SHA2}])
    assert dataset_key(pinned) == k2  # `main` -> sha2 is keyed as sha2 itself
    second, _, prompts = _build(tmp_path, config, "o2")
    # datasets 5.2 cannot load a hub dataset offline by revision (it falls back to "the latest cached version" of
    # its own cache): build_dataset reads the commit's snapshot in the hub cache as a local dataset directory.
    assert sorted(prompts) == [f"new{i}" for i in range(6)]
    assert second.manifest["sources"][0]["revision"] == SHA2
    assert source_tags(second.manifest) == {"data.sources.0.revision": SHA2}
    changes = data_changes(first.manifest, second.manifest)
    assert changes["changed"] == [{"source": "hf://datasets/org/name", "path": "train", "old_sha": SHA1,
                                   "new_sha": SHA2, "old_rows": 4, "new_rows": 6}]
    assert (changes["rows_added"], changes["rows_removed"]) == (2, 0)


def test_an_unresolvable_revision_names_the_field(hub_cache: Path):
    with pytest.raises(RevisionError, match=r"data\.sources\[0\]\.revision: cannot resolve revision 'v2' of "
                                            r"dataset 'org/absent'"):
        dataset_key(DataConfig(sources=[{"hub_id": "org/absent", "revision": "v2"}]))


def test_hub_base_resolves_to_its_commit_in_keys_and_lineage(tmp_path: Path, hub_cache: Path):
    hub_snapshot(hub_cache, "models--org--base", SHA1, {"config.json": "{}"})
    job = load_config(REPO / "configs" / "qwen-ko.yaml", {"model.base": "org/base", "model.revision": "main"})
    dataset = DatasetResult(key="d", path=str(tmp_path), dataset_sha="sha", stats={})
    chat = ChatResult(key="c", path=str(tmp_path), dataset_sha="sha", template_sha="t", stats={})

    def keys() -> tuple[str, str]:
        return (chat_key(dataset, job.model, job.training),
                train_key(chat, job.model, job.lora, job.quantization, job.training))

    before = keys()
    assert resolve_model_revision(job.model) == SHA1 == base_revision_tag(job.model)
    assert keys() == before
    hub_snapshot(hub_cache, "models--org--base", SHA2, {"config.json": "{}"})
    assert resolve_model_revision(job.model) == SHA2 == base_revision_tag(job.model)
    after = keys()
    assert after[0] != before[0] and after[1] != before[1]
    pinned = job.model.model_copy(update={"revision": SHA2})
    assert chat_key(dataset, pinned, job.training) == after[0]


def test_embedded_and_local_bases_keep_their_configured_revision(tmp_path: Path):
    embedded = ModelConfig(base="embedded:tiny-ko")
    assert resolve_model_revision(embedded) is None
    assert base_revision_tag(embedded).startswith("embedded:tiny-ko@")
    local = ModelConfig(base=str(tmp_path))
    assert resolve_model_revision(local) is None and base_revision_tag(local) == "local"


def test_computing_keys_loads_no_torch_transformers_or_datasets(tmp_path: Path, hub_cache: Path):
    hub_snapshot(hub_cache, "datasets--org--name", SHA1, {"data.jsonl": hub_rows("q", 2)})
    hub_snapshot(hub_cache, "models--org--base", SHA2, {"config.json": "{}"})
    write_jsonl(tmp_path / "data" / "a.jsonl", [chat_row("q", "a")])
    script = f"""
import sys
from loraflow.config.data import DataConfig
from loraflow.config.model import ModelConfig
from loraflow.config.training import TrainingConfig
from loraflow.base.revision import resolve_model_revision
from loraflow.data.keys import chat_key, dataset_key
from loraflow.results import DatasetResult
data = DataConfig(sources=[{{"path": {str(tmp_path / "data")!r}}}, {{"hub_id": "org/name"}}])
model = ModelConfig(base="org/base", revision="main")
print(dataset_key(data), chat_key(DatasetResult(key="k", path=".", dataset_sha="s", stats={{}}), model,
      TrainingConfig()), resolve_model_revision(model))
print(sorted(m for m in ("torch", "transformers", "datasets") if m in sys.modules))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0].endswith(SHA2) and done.stdout.splitlines()[1] == "[]"


# --- what changed since the champion ----------------------------------------------------------------------


def test_data_changes_lists_files_and_rows_since_an_earlier_build(tmp_path: Path):
    data = tmp_path / "data"
    write_jsonl(data / "keep.jsonl", [chat_row(f"k{i}", "x") for i in range(3)])
    write_jsonl(data / "grow.jsonl", [chat_row(f"g{i}", "x") for i in range(3)])
    write_jsonl(data / "gone.jsonl", [chat_row(f"o{i}", "x") for i in range(2)])
    config = DataConfig(sources=[{"path": str(data)}])
    champion, _, _ = _build(tmp_path, config, "o1")
    (data / "gone.jsonl").unlink()
    write_jsonl(data / "grow.jsonl", [chat_row(f"g{i}", "x") for i in range(5)])
    write_jsonl(data / "new.jsonl", [chat_row(f"n{i}", "x") for i in range(4)])
    os.utime(data / "keep.jsonl", (1_000_000, 1_000_000))
    current, _, _ = _build(tmp_path, config, "o2")

    changes = data_changes(champion.manifest, current.manifest)
    assert [e["path"] for e in changes["added"]] == ["new.jsonl"]
    assert [e["path"] for e in changes["removed"]] == ["gone.jsonl"]
    assert [(c["path"], c["old_rows"], c["new_rows"]) for c in changes["changed"]] == [("grow.jsonl", 3, 5)]
    assert changes["unchanged"] == 1
    assert (changes["rows_added"], changes["rows_removed"]) == (4 + 2, 2)
    assert data_changes(current.manifest, current.manifest) | {"unchanged": 0} == {
        "added": [], "removed": [], "changed": [], "unchanged": 0, "rows_added": 0, "rows_removed": 0}
    markdown = changes_markdown(changes)
    assert "1 file(s) added, 1 removed, 1 changed, 1 unchanged; +6 / -2 rows." in markdown
    assert f"| changed | {data} | grow.jsonl | 3 -> 5 |" in markdown


def test_an_unreachable_hub_falls_back_to_the_cached_ref(hub_cache: Path, monkeypatch: pytest.MonkeyPatch):
    """Online mode, but the Hub refuses connections: the key comes from the hub cache's refs/main. (Loading is not
    exercised here: datasets downloads through URLs fixed at import and retries for ~25 s before giving up.)"""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{_free_port()}")
    hub_snapshot(hub_cache, "datasets--org--name", SHA1, {"data.jsonl": hub_rows("cached", 3)})
    hub_snapshot(hub_cache, "models--org--base", SHA2, {"config.json": "{}"})
    assert source_fingerprint(DataConfig(sources=[{"hub_id": "org/name"}]).sources[0]).revision == SHA1
    assert resolve_model_revision(ModelConfig(base="org/base")) == SHA2


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]

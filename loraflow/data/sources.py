"""What a run's data and base really are: moving references resolved to immutable ones, local files by content.

Hub datasets and hub bases are resolved branch/tag -> commit sha once per key or load (`HfApi.resolve_revision`:
the Hub when reachable, else the sha that the local hub cache's `refs/<branch>` holds), so a scheduled run on
`revision: main` retrains exactly when `main` moved. A local source (a file, a directory or a glob) is a manifest
of (relative path, content sha256), as DVC keys a directory: a new, changed or removed file changes it, a touched
one does not. Keys (loraflow/keys.py) and loaders (build_dataset) call the same functions, so what is keyed is
what is loaded. Nothing here imports torch, transformers or datasets: keys are computed on every run.
"""

from __future__ import annotations

import glob
import hashlib
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from loraflow.config.data import DataConfig, DataSource
from loraflow.config.model import ModelConfig
from loraflow.hashing import sha_of

FORMATS = {"jsonl": "jsonl", "json": "json", "csv": "csv", "parquet": "parquet"}
COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
GLOB_CHARS = re.compile(r"[*?\[]")


class ManifestEntry(BaseModel):
    """One file of a local source (or the split of a hub source) and what it held."""

    model_config = ConfigDict(frozen=True)

    source: str  # stable across runs, so diffs match entries: the configured path, or hf://datasets/<id>[/<subset>]
    path: str  # relative to the source's root (local) or the split (hub)
    sha: str  # sha256 of the file's bytes (local) or the commit sha (hub)
    rows: int | None = None  # rows read; filled in by build_dataset


class SourceFingerprint(BaseModel):
    model_config = ConfigDict(frozen=True)

    label: str
    kind: Literal["local", "hub"]
    revision: str | None = None  # hub: the resolved commit sha
    root: str | None = None  # local: the directory manifest paths are relative to
    files: list[ManifestEntry]
    manifest_sha: str | None = None  # local: hash of the (path, sha) manifest
    content_key: str  # what dataset_key hashes for this source


class RevisionError(ValueError):
    """A moving reference that cannot be resolved (offline and not in the hub cache, or unknown on the Hub)."""


def resolve_revision(repo_id: str, revision: str | None, repo_type: str = "model", *, field: str = "") -> str:
    """The commit sha a branch/tag points to now; a 40-hex sha is returned as is (no network).

    huggingface_hub's own resolution: `repo_info(...).sha` (model_info/dataset_info) online, caching it in the hub
    cache's refs/; offline (HF_HUB_OFFLINE) or when the Hub cannot be reached, the sha cached in refs/<revision>.
    """
    if revision is not None and COMMIT_SHA.fullmatch(revision):
        return revision
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError, RevisionResolutionError

    try:
        # local_files_only when offline: the Hub is not asked at all (no warning per key computed).
        resolved = HfApi().resolve_revision(repo_id, repo_type=repo_type, revision=revision,
                                            local_files_only=constants.is_offline_mode())
    except (RevisionResolutionError, HfHubHTTPError) as error:
        where = f"{field}: " if field else ""
        raise RevisionError(f"{where}cannot resolve revision {revision or 'main'!r} of {repo_type} {repo_id!r}: "
                            f"{error}") from error
    return resolved.resolved


def is_hub_model(model: ModelConfig) -> bool:
    """A hub id: neither `embedded:...` nor an existing local directory (what transformers loads first)."""
    return not model.is_embedded and not Path(model.base).expanduser().exists()


def resolve_model_revision(model: ModelConfig) -> str | None:
    """The base's commit sha for a hub base; embedded and local bases keep `model.revision` (they have no hub
    revision). Keys hash this and serving passes it as vLLM's `--revision`."""
    if not is_hub_model(model):
        return model.revision
    return resolve_revision(model.base, model.revision, "model", field="model.revision")


def pinned_model(model: ModelConfig) -> ModelConfig:
    """The model config with its revision resolved (unchanged, the same object, when nothing moves)."""
    revision = resolve_model_revision(model)
    return model if revision == model.revision else model.model_copy(update={"revision": revision})


def pinned_data(data: DataConfig, fingerprints: list[SourceFingerprint]) -> DataConfig:
    """The data config with every hub source's revision replaced by the sha it resolved to."""
    sources = [s.model_copy(update={"revision": fp.revision}) if fp.kind == "hub" else s
               for s, fp in zip(data.sources, fingerprints, strict=True)]
    return data.model_copy(update={"sources": sources})


def file_format(source: DataSource, file: Path, field: str = "data.sources") -> str:
    """`format` when set (it applies to every file of the source), else the file's suffix."""
    if source.format != "auto":
        return source.format
    suffix = file.suffix.lower().lstrip(".")
    if suffix not in FORMATS:
        raise ValueError(f"{field}.format: cannot tell the format of {file}; set `format`")
    return FORMATS[suffix]


def local_files(spec: str, field: str = "data.sources") -> tuple[Path, list[Path]]:
    """(root, files) of a `path`: a file; a directory, recursively, files of the supported formats (hidden files
    and folders skipped: editor and notebook checkpoints would be read twice); or a glob (`**` recursive), taken
    literally. Sorted, so the rows come in the same order on every machine."""
    if GLOB_CHARS.search(spec):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        prefix = GLOB_CHARS.split(spec, maxsplit=1)[0]
        root = Path(prefix) if prefix.endswith(("/", "\\")) else Path(prefix).parent
        if not files:
            raise FileNotFoundError(f"{field}.path: no file matches {spec}")
        return root, files
    path = Path(spec)
    if path.is_file():
        return path.parent, [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in FORMATS
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise FileNotFoundError(f"{field}.path: no {'/'.join(FORMATS)} file in directory {spec}")
        return path, files
    raise FileNotFoundError(f"{field}.path: file not found: {spec}")


def file_sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def hub_origin(source: DataSource) -> str:
    return f"hf://datasets/{source.hub_id}" + (f"/{source.subset}" if source.subset else "")


def source_fingerprint(source: DataSource, index: int | None = None) -> SourceFingerprint:
    """What a source is now: a hub dataset's resolved commit, or a local source's manifest of file contents.
    `index` names the field in errors (`data.sources[0].path`)."""
    field = "data.sources" if index is None else f"data.sources[{index}]"
    if source.path is None:
        assert source.hub_id is not None  # DataSource allows exactly one of path / hub_id
        sha = resolve_revision(source.hub_id, source.revision, "dataset", field=f"{field}.revision")
        entry = ManifestEntry(source=hub_origin(source), path=source.split, sha=sha)
        return SourceFingerprint(label=source.label, kind="hub", revision=sha, files=[entry],
                                 content_key=sha_of(source.hub_id, sha, source.subset, source.split))
    root, files = local_files(source.path, field)
    entries = []
    for file in files:
        file_format(source, file, field)  # an unreadable format fails here, before any work
        entries.append(ManifestEntry(source=source.path, path=file.relative_to(root).as_posix(),
                                     sha=file_sha256(file)))
    manifest_sha = sha_of([(e.path, e.sha) for e in entries])
    return SourceFingerprint(label=source.label, kind="local", root=str(root), files=entries,
                             manifest_sha=manifest_sha, content_key=manifest_sha)


def cached_snapshot(repo_id: str, revision: str, repo_type: str = "dataset") -> Path | None:
    """The hub cache's `snapshots/<sha>/` of a resolved revision, or None; never contacts the Hub."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, repo_type=repo_type, revision=revision, local_files_only=True))
    except IncompleteSnapshotError as error:
        # A split's files may be all a previous load fetched; loading then fails clearly if they are missing.
        return Path(error.snapshot_path)
    except LocalEntryNotFoundError:
        return None


# --- lineage: tags and manifests ---------------------------------------------------------------------------


def base_revision_tag(model: ModelConfig) -> str:
    """`base_revision`: the resolved commit sha of a hub base; `embedded:tiny-ko@<build key>` (the recipe the
    weights are built from) for an embedded base; `local` for a local directory (no revision to record)."""
    if model.is_embedded:
        from loraflow.tiny.base import build_key  # imports torch: only the register step (torch loaded) calls this

        return f"{model.base}@{build_key()}"
    if not is_hub_model(model):
        return "local"
    return resolve_model_revision(model) or "main"


def source_tags(manifest: dict[str, Any]) -> dict[str, str]:
    """`data.sources.<i>.revision` (hub commit) or `data.sources.<i>.manifest_sha` (local) for each source of a
    dataset's manifest; shas only, far below MLflow's 5000-character tag limit."""
    tags = {}
    for index, source in enumerate(manifest.get("sources", [])):
        if source.get("kind") == "hub":
            tags[f"data.sources.{index}.revision"] = str(source["revision"])
        else:
            tags[f"data.sources.{index}.manifest_sha"] = str(source["manifest_sha"])
    return tags


def dataset_manifest(fingerprints: list[SourceFingerprint], rows: dict[tuple[int, str], int]) -> dict[str, Any]:
    """The dataset step's manifest (stats.json `manifest`, MLflow `data/manifest.json`): each source's resolved
    revision or manifest sha, and every file (path, sha, rows) for `data_changes` against the champion's.
    `rows` is keyed by (source index, path): rows read from that file."""
    return {
        "sources": [fp.model_dump(mode="json", include={"label", "kind", "revision", "manifest_sha", "content_key"})
                    for fp in fingerprints],
        "files": [e.model_copy(update={"rows": rows.get((index, e.path), 0)}).model_dump(mode="json")
                  for index, fp in enumerate(fingerprints) for e in fp.files],
    }


def data_changes(old_manifest: dict[str, Any], new_manifest: dict[str, Any]) -> dict[str, Any]:
    """Files added, removed and changed between two dataset manifests (`dataset_manifest`), matched by (source,
    path), and rows added/removed. Rows are net per file: a changed file that gained 5 rows and lost 2 counts +3."""
    old = {(e["source"], e["path"]): e for e in old_manifest.get("files", [])}
    new = {(e["source"], e["path"]): e for e in new_manifest.get("files", [])}

    def rows(entry: dict[str, Any]) -> int:
        return int(entry.get("rows") or 0)

    added = [new[k] for k in sorted(new.keys() - old.keys())]
    removed = [old[k] for k in sorted(old.keys() - new.keys())]
    changed = [{"source": k[0], "path": k[1], "old_sha": old[k]["sha"], "new_sha": new[k]["sha"],
                "old_rows": rows(old[k]), "new_rows": rows(new[k])}
               for k in sorted(old.keys() & new.keys()) if old[k]["sha"] != new[k]["sha"]]
    return {
        "added": added,
        "removed": removed,
        "changed": changed,
        "unchanged": len(old.keys() & new.keys()) - len(changed),
        "rows_added": sum(rows(e) for e in added) + sum(max(0, c["new_rows"] - c["old_rows"]) for c in changed),
        "rows_removed": sum(rows(e) for e in removed) + sum(max(0, c["old_rows"] - c["new_rows"]) for c in changed),
    }


def changes_markdown(changes: dict[str, Any], since: str = "the champion") -> str:
    """`data_changes` as a short markdown section (the 'what is new since the champion' artifact)."""
    lines = [f"## Data since {since}", "",
             f"{len(changes['added'])} file(s) added, {len(changes['removed'])} removed, "
             f"{len(changes['changed'])} changed, {changes['unchanged']} unchanged; "
             f"+{changes['rows_added']} / -{changes['rows_removed']} rows.", ""]
    if changes["added"] or changes["removed"] or changes["changed"]:
        lines += ["| change | source | path | rows |", "|---|---|---|---|"]
        lines += [f"| added | {e['source']} | {e['path']} | {e.get('rows') or 0} |" for e in changes["added"]]
        lines += [f"| removed | {e['source']} | {e['path']} | {e.get('rows') or 0} |" for e in changes["removed"]]
        lines += [f"| changed | {c['source']} | {c['path']} | {c['old_rows']} -> {c['new_rows']} |"
                  for c in changes["changed"]]
    return "\n".join(lines) + "\n"

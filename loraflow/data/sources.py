"""What a run's data really is, pinned once: moving references resolved to immutable ones, local files by content.

A hub dataset's branch/tag is resolved to a commit sha (loraflow/hub.py: the Hub when reachable, else the sha that
the local hub cache's `refs/<branch>` holds), so a scheduled run on `revision: main` retrains exactly when `main`
moved. A local source (a file, a directory or a glob) is a manifest of (relative path, content sha256), as DVC keys
a directory: a new, changed or removed file changes it, a touched one does not. The pre-flight (tasks/validate.py)
pins every source once into a `PinnedData`; the dataset key (loraflow/data/keys.py), the build and the lineage tags
all read it, so what is keyed is what is loaded. Nothing here imports torch, transformers or datasets.
"""

from __future__ import annotations

import glob
import hashlib
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from loraflow.config.data import DataConfig, DataSource
from loraflow.hashing import sha_of
from loraflow.hub import resolve_revision

FORMATS = {"jsonl": "jsonl", "json": "json", "csv": "csv", "parquet": "parquet"}
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


class PinnedData(BaseModel):
    """A run's data with every moving reference resolved, made once at flow start (`pin_data`): `data` is the
    config with each hub source's `revision` set to the commit it resolved to, `fingerprints` what each source is
    (that commit, or a local source's manifest). Checked on construction, so a key of one commit cannot go with a
    load of another."""

    model_config = ConfigDict(frozen=True)

    data: DataConfig
    fingerprints: list[SourceFingerprint]

    @model_validator(mode="after")
    def _fingerprints_match_sources(self) -> PinnedData:
        if len(self.fingerprints) != len(self.data.sources):
            raise ValueError(f"data.sources: {len(self.data.sources)} source(s) but {len(self.fingerprints)} "
                             "fingerprint(s)")
        for index, (source, fp) in enumerate(zip(self.data.sources, self.fingerprints, strict=True)):
            hub = source.hub_id is not None
            if (fp.kind == "hub") != hub or (hub and source.revision != fp.revision):
                raise ValueError(f"data.sources[{index}].revision: {source.revision!r} is not the pinned "
                                 f"{fp.kind} fingerprint ({fp.revision or fp.manifest_sha})")
        return self


def pin_data(data: DataConfig) -> PinnedData:
    """Fingerprint every source once (hub: resolve its revision; local: hash its files) and pin the config to it."""
    fingerprints = [source_fingerprint(s, i) for i, s in enumerate(data.sources)]
    sources = [s.model_copy(update={"revision": fp.revision}) if fp.kind == "hub" else s
               for s, fp in zip(data.sources, fingerprints, strict=True)]
    return PinnedData(data=data.model_copy(update={"sources": sources}), fingerprints=fingerprints)


def as_pinned(data: DataConfig | PinnedData) -> PinnedData:
    """A flow run passes the `PinnedData` its pre-flight made (nothing is resolved or hashed again); a plain
    config, from a caller outside a flow run (tests, bench), is pinned here, once, on entry."""
    return data if isinstance(data, PinnedData) else pin_data(data)


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

"""The endpoint's table: for each served job (registered model), the base server its adapters live on, the
versioned name its stable name answers with, and its loaded versions. Each job's entry is replaced as a whole by
that job's reconciler, so one job's promotion never touches another's routes. Persisted, so a restarted endpoint
routes at once; in-flight counts per upstream name let a reconciler unload an old version only once it drained."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

from loraflow.serving.names import base_name


class Upstream(NamedTuple):
    server: str  # the base server's id
    name: str  # the model name vLLM knows (a versioned name, or the server's base name)


class JobRoutes(NamedTuple):
    server: str
    stable: str | None  # the versioned name the stable name answers with; None: no champion served yet
    versions: tuple[str, ...]  # versioned names loaded on the server


def parse_job(entry: object) -> JobRoutes:
    """A job entry as a reconciler sends it; ValueError names what is wrong (the endpoint answers 400)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("server"), str) or not entry["server"]:
        raise ValueError('a job entry is {"server": id, "stable": versioned name or null, "versions": [names]}')
    stable, versions = entry.get("stable"), entry.get("versions", [])
    if stable is not None and (not isinstance(stable, str) or not stable):
        raise ValueError("`stable` must be a versioned name or null")
    if not isinstance(versions, list) or not all(isinstance(v, str) and v for v in versions):
        raise ValueError("`versions` must be a list of versioned names")
    if stable is not None and stable not in versions:
        raise ValueError(f"`stable` {stable!r} must be one of the loaded `versions`")
    return JobRoutes(entry["server"], stable, tuple(versions))


class RouteTable:
    def __init__(self, file: Path | None):
        self.file = file
        saved = json.loads(file.read_text()) if file and file.is_file() else {}
        self.jobs: dict[str, JobRoutes] = {model: parse_job(entry) for model, entry in saved.get("jobs", {}).items()}
        self.inflight: Counter[str] = Counter()
        self._index: dict[str, Upstream] = {}
        self._servers: dict[str, str] = {}
        self._reindex()

    def _reindex(self) -> None:
        index: dict[str, Upstream] = {}
        for model, job in self.jobs.items():
            index[base_name(model)] = Upstream(job.server, job.server)
            index.update({name: Upstream(job.server, name) for name in job.versions})
            if job.stable is not None:
                index[model] = Upstream(job.server, job.stable)
        self._index = index
        self._servers = {upstream.name: upstream.server for upstream in index.values()}

    def _persist(self) -> None:
        if self.file is not None:
            tmp = self.file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"jobs": {m: j._asdict() for m, j in self.jobs.items()}}, indent=2))
            os.replace(tmp, self.file)

    def replace_job(self, model: str, job: JobRoutes) -> None:
        """One atomic swap: requests already sent keep their upstream; new ones see the new entry."""
        self._persist_as({**self.jobs, model: job})

    def drop_job(self, model: str) -> None:
        self._persist_as({m: j for m, j in self.jobs.items() if m != model})

    def _persist_as(self, jobs: dict[str, JobRoutes]) -> None:
        previous = self.jobs
        self.jobs = jobs
        try:
            self._persist()
        except OSError:
            self.jobs = previous
            raise
        self._reindex()

    def renames(self) -> dict[str, str]:
        """The names a request's `model` is rewritten from: a stable name -> its versioned name, a job's base name
        -> its server's base name (versioned names pass as they are)."""
        return {name: upstream.name for name, upstream in self._index.items() if name != upstream.name}

    def server_of(self, upstream_name: str) -> str | None:
        """The server an upstream name lives on (versioned names and server base names are unique)."""
        return self._servers.get(upstream_name)

    def stable_names(self) -> dict[str, str]:
        """stable name -> the versioned name it answers with, for every job that has one."""
        return {model: job.stable for model, job in self.jobs.items() if job.stable is not None}

    def snapshot(self) -> dict[str, Any]:
        return {"jobs": {m: j._asdict() for m, j in self.jobs.items()},
                "inflight": {name: count for name, count in self.inflight.items() if count}}

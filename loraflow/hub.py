"""The Hub's moving references: a branch/tag resolved to the commit it points to now, and a commit's snapshot in
the local hub cache. Shared by the base model (loraflow/base/revision.py) and hub datasets
(loraflow/data/sources.py); nothing here imports torch, transformers or datasets, and huggingface_hub only when a
reference actually moves."""

from __future__ import annotations

import re
from pathlib import Path

COMMIT_SHA = re.compile(r"[0-9a-f]{40}")


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

"""A person's alias moves: make a version `champion` (or `challenger`) by hand, or roll `champion` back.

The policy in `promote` only advises: a person may move an alias to any version, including one the gate
rejected; serving still puts it through the canary. Each move is recorded on the version it lands on.
"""

from __future__ import annotations

from datetime import UTC, datetime

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict

from loraflow.errors import LoraflowError
from loraflow.registry.parent import PARENT_TAG
from loraflow.registry.promote import CHAMPION, REJECTED, TAG_DECISION, TAG_REASONS, champion_version

TAG_MOVED = "promotion.moved_by_hand"


class AliasMove(BaseModel):
    model_config = ConfigDict(frozen=True)

    model_name: str
    alias: str
    version: str  # where the alias points now
    previous: str | None  # where it pointed before


def move_alias(client: MlflowClient, model_name: str, version: str | int, alias: str = CHAMPION) -> AliasMove:
    """Point `alias` at an existing version (a person's decision); the move is tagged on that version."""
    try:
        target = client.get_model_version(model_name, str(version))
    except MlflowException as error:
        raise LoraflowError(f"{model_name} v{version}: {error.message}") from None
    number = str(target.version)
    previous = _aliased(client, model_name, alias)
    client.set_registered_model_alias(model_name, alias, number)
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    client.set_model_version_tag(model_name, number, TAG_MOVED,
                                 f"{alias} moved here from v{previous or 'none'} at {stamp}")
    return AliasMove(model_name=model_name, alias=alias, version=number, previous=previous)


def rollback(client: MlflowClient, model_name: str, version: str | int) -> AliasMove:
    """Move `champion` back to an earlier (or any existing) version."""
    return move_alias(client, model_name, version, CHAMPION)


def _aliased(client: MlflowClient, model_name: str, alias: str) -> str | None:
    if alias == CHAMPION:
        found = champion_version(client, model_name)
        return str(found.version) if found is not None else None
    aliases = client.get_registered_model(model_name).aliases
    return str(aliases[alias]) if alias in aliases else None


def describe_versions(client: MlflowClient, model_name: str) -> list[str]:
    """One line per version: aliases, the recorded decision, and the version it started from (a DPO job's)."""
    lines = []
    for found in client.search_model_versions(f"name='{model_name}'"):
        full = client.get_model_version(model_name, found.version)  # search results omit aliases
        aliases = ",".join(full.aliases) or "-"
        line = f"v{full.version}\taliases={aliases}\tdecision={full.tags.get(TAG_DECISION, '-')}"
        if PARENT_TAG in full.tags:
            line += f"\tparent={full.tags[PARENT_TAG]}"
        if full.tags.get(TAG_DECISION) == REJECTED:
            # Why, at a glance: the first requirement it failed (all of them are in the tag and the description).
            failed = [r for r in full.tags.get(TAG_REASONS, "").splitlines() if r.startswith("fail:")]
            line += f"\treason={failed[0].removeprefix('fail:').strip() if failed else 'not recorded'}"
        lines.append(line)
    return sorted(lines, key=lambda line: int(line.split("\t")[0][1:]))

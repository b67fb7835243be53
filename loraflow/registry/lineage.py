"""Which base and data a version saw: its lineage tags (the base's commit, each source's commit or manifest sha),
rows per source, and what is new since the champion's version (by the manifests the dataset step records and
`register` logs as `data/manifest.json`)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow.artifacts
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from loraflow.base.revision import is_hub_model, resolve_model_revision
from loraflow.config.model import ModelConfig
from loraflow.registry.promote import champion_version

MANIFEST_ARTIFACT = "data/manifest.json"
REPORT_FILE = "changes_since_champion.md"


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


def champion_manifest(client: MlflowClient, model_name: str, excluding: str) -> tuple[str, dict[str, Any]] | None:
    """(champion version, its data manifest) — {} when its run logged none; None with no champion, or when the
    champion is the version at hand."""
    champion = champion_version(client, model_name)
    if champion is None or str(champion.version) == excluding or not champion.run_id:
        return None
    try:
        local = mlflow.artifacts.download_artifacts(run_id=champion.run_id, artifact_path=MANIFEST_ARTIFACT,
                                                    tracking_uri=client.tracking_uri)
    except (MlflowException, OSError):
        return str(champion.version), {}
    return str(champion.version), json.loads(Path(local).read_text())


def data_report(client: MlflowClient, model_name: str, version: str, run_id: str, manifest: dict[str, Any],
                created: bool) -> str:
    """Markdown for the Prefect run, also logged on the version's run (`data/changes_since_champion.md`)."""
    found = champion_manifest(client, model_name, excluding=version)
    if not created:
        stays = f"champion v{found[0]} stays" if found else f"v{version} stays as it was"
        return f"### {model_name}: no new data: {stays}\n\nEvery input is unchanged, so no version was registered."
    per_source: dict[str, int] = {}
    for entry in manifest.get("files", []):
        per_source[entry["source"]] = per_source.get(entry["source"], 0) + int(entry.get("rows") or 0)
    lines = [f"### {model_name} v{version}: the data it saw", "", "| source | files | rows |", "|---|---:|---:|",
             *(f"| {source} | {sum(e['source'] == source for e in manifest['files'])} | {rows} |"
               for source, rows in per_source.items()), ""]
    if found is None:
        lines.append("No champion to compare with.")
    elif not found[1]:
        lines.append(f"Champion v{found[0]} recorded no data manifest: nothing to compare with.")
    else:
        lines.append(changes_markdown(data_changes(found[1], manifest), since=f"champion v{found[0]}"))
    report = "\n".join(lines)
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / REPORT_FILE).write_text(report, encoding="utf-8")
        client.log_artifact(run_id, str(Path(scratch) / REPORT_FILE), "data")
    return report

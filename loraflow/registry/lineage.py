"""Which data a version saw: rows per source, and what is new since the champion's version (by the manifests the
dataset step records and `register` logs as `data/manifest.json`)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow.artifacts
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from loraflow.data.sources import changes_markdown, data_changes
from loraflow.registry.promote import champion_version

MANIFEST_ARTIFACT = "data/manifest.json"
REPORT_FILE = "changes_since_champion.md"


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

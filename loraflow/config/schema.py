"""The job config's JSON Schema: what `loraflow schema` prints and configs/schema.json holds (editors validate and
document a job YAML through its `# yaml-language-server: $schema=./schema.json` first line)."""

from __future__ import annotations

import json
from pathlib import Path

from loraflow.config.job import JobConfig

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "configs" / "schema.json"


def job_schema_text() -> str:
    """JobConfig's JSON Schema, with every field's description, as the committed file spells it."""
    return json.dumps(JobConfig.model_json_schema(), indent=2, ensure_ascii=False) + "\n"

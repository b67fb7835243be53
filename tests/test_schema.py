"""The job config documents itself: configs/schema.json is what `loraflow schema` prints now (a new field without
regenerating it fails here), every leaf field has a description, and each shipped job YAML names the schema on its
first line and validates against it the way an editor validates it (jsonschema, as yaml-language-server does)."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from loraflow.cli import main
from loraflow.config.loader import read_yaml
from loraflow.config.schema import SCHEMA_FILE

REGENERATE = "regenerate it: .venv/bin/loraflow schema --output configs/schema.json"
JOB_CONFIGS = sorted(SCHEMA_FILE.parent.glob("*.yaml"))  # configs/accelerate/* are accelerate's, not jobs
MODELINE = "# yaml-language-server: $schema=./schema.json"


def test_committed_schema_is_what_loraflow_schema_prints(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["schema"]) == 0
    printed = capsys.readouterr().out
    assert SCHEMA_FILE.read_text(encoding="utf-8") == printed, f"configs/schema.json is stale; {REGENERATE}"
    assert main(["schema", "--output", str(tmp_path / "schema.json")]) == 0
    assert (tmp_path / "schema.json").read_text(encoding="utf-8") == printed


def _leaf_fields_without_description(schema: dict) -> list[str]:
    """Fields that are not a section (a `$ref`, or a list of them) and have no description."""
    sections = {"JobConfig": schema, **schema["$defs"]}
    return [f"{section}.{name}" for section, spec in sections.items()
            for name, field in spec.get("properties", {}).items()
            if "$ref" not in field and "$ref" not in field.get("items", {}) and not field.get("description")]


def test_every_leaf_field_has_a_description() -> None:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    assert len(schema["$defs"]) >= 15 and "learning_rate" in schema["$defs"]["TrainingConfig"]["properties"]
    assert _leaf_fields_without_description(schema) == []
    # The check itself catches a field without one.
    schema["$defs"]["TrainingConfig"]["properties"]["learning_rate"].pop("description")
    assert _leaf_fields_without_description(schema) == ["TrainingConfig.learning_rate"]


@pytest.mark.parametrize("config", JOB_CONFIGS, ids=lambda path: path.name)
def test_job_configs_name_the_schema_and_validate_against_it(config: Path) -> None:
    assert config.read_text(encoding="utf-8").splitlines()[0] == MODELINE
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    jsonschema.validate(read_yaml(config), schema)


def test_the_schema_rejects_what_the_loader_rejects() -> None:
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    raw = read_yaml(SCHEMA_FILE.parent / "tiny-ko.yaml")
    for path, value in ((("lora", "rank"), 8), (("training", "learning_rate"), 0)):
        bad = yaml.safe_load(yaml.safe_dump(raw, allow_unicode=True))
        bad.setdefault(path[0], {})[path[1]] = value
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)

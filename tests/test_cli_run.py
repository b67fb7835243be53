"""`loraflow run` as a person types it, with no Prefect server configured: loraflow starts Prefect's temporary
server before the run's imports (loraflow/localstack/temporary_server.py), the flow finds every step cached, and
the server ends with the command."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from loraflow.localstack.temporary_server import configured_api_url
from tests.fixtures import TINY_CONFIG, TINY_OVERRIDES


def test_loraflow_run_reuses_the_version_and_its_temporary_server_ends_with_it(finetune_run: dict) -> None:
    sets = [f"--set={field}={json.dumps(value)}" for field, value in TINY_OVERRIDES.items()]
    result = subprocess.run([str(Path(sys.executable).parent / "loraflow"), "run", TINY_CONFIG, *sets],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"version {finetune_run['version']} (unchanged inputs: existing version reused)" in result.stdout
    api_url = re.search(r"Prefect: temporary server at (\S+)", result.stderr)
    assert api_url, result.stderr
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{api_url[1]}/health", timeout=5)


def test_the_api_url_is_read_as_prefect_reads_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("PREFECT_API_URL", "PREFECT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    profiles = tmp_path / "profiles.toml"
    monkeypatch.setenv("PREFECT_PROFILES_PATH", str(profiles))
    assert configured_api_url() is None  # no file: Prefect would start its temporary server
    profiles.write_text('active = "loraflow"\n[profiles.loraflow]\nPREFECT_API_URL = "http://127.0.0.1:4200/api"\n'
                        '[profiles.team]\nPREFECT_API_URL = "https://prefect.example/api"\n[profiles.ephemeral]\n')
    assert configured_api_url() == "http://127.0.0.1:4200/api"
    monkeypatch.setenv("PREFECT_PROFILE", "ephemeral")
    assert configured_api_url() is None
    monkeypatch.setenv("PREFECT_PROFILE", "team")
    assert configured_api_url() == "https://prefect.example/api"
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9999/api")
    assert configured_api_url() == "http://127.0.0.1:9999/api"

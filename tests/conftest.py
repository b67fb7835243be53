"""The test session's environment: one LORAFLOW_HOME per session, no Prefect/MLflow variables of the caller, no
hub downloads, the tiny-ko base shared with the user's state dir. Fixtures and helpers: the tests/fixtures/ package."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SESSION_HOME = Path(tempfile.mkdtemp(prefix="loraflow-test-"))
os.environ["LORAFLOW_HOME"] = str(SESSION_HOME)
for name in (
    "PREFECT_HOME",
    "PREFECT_API_URL",
    "MLFLOW_TRACKING_URI",
    "HF_HOME",
    "PREFECT_RESULTS_LOCAL_STORAGE_PATH",
    "PREFECT_SERVER_MEMO_STORE_PATH",
):
    os.environ.pop(name, None)
os.environ["HF_HUB_OFFLINE"] = "1"  # tests never download
os.chdir(REPO)  # configs name data files relative to the repo root
# A `loraflow up` in a test writes its Prefect profile here, never into the user's ~/.prefect.
os.environ["PREFECT_PROFILES_PATH"] = str(SESSION_HOME / "user-profiles.toml")

from loraflow.env import configure_environment  # noqa: E402

configure_environment()  # before anything imports Prefect

import pytest  # noqa: E402

pytest.register_assert_rewrite("tests.fixtures")
from tests.fixtures import share_built_models  # noqa: E402

share_built_models(SESSION_HOME)

pytest_plugins = ["tests.fixtures"]

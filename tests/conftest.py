"""The test session's environment: one LORAFLOW_HOME per session, no Prefect/MLflow variables of the caller, no
hub downloads, the tiny-ko base shared with the user's state dir. Fixtures and helpers: the tests/fixtures/ package.

Tiers: a test is `slow` when it uses a fixture that starts servers or trains (SLOW_FIXTURES, directly or through
another fixture) or its module says `pytestmark = pytest.mark.slow` (modules that start processes themselves).
`make test-fast` (`-m "not slow"`) runs the rest; in that tier a server start fails the test that made it, so a
test that needs one cannot hide in the fast tier unmarked."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

# Raised by the dependencies about their own code or this machine: nothing in loraflow can act on them. Ignored
# here for the imports below and by pytest_configure for each test (pytest restores its own filters around each).
DEPENDENCY_WARNINGS = (
    (r"`torch\.jit\.script_method` is deprecated", DeprecationWarning),  # torch's own import, 14 times a session
    (r"starlette\.middleware\.wsgi is deprecated", UserWarning),  # mlflow's server imports it
    (r"XDG_RUNTIME_DIR is not set", UserWarning),  # platformdirs falls back to /tmp/runtime-<uid>, as intended
)
for message, category in DEPENDENCY_WARNINGS:
    warnings.filterwarnings("ignore", message, category)

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

# The fixtures that start servers (the local stack, Prefect, PostgreSQL + MLflow) or train (the session's flow run).
SLOW_FIXTURES = frozenset({"local_stack", "prefect_server", "postgres_registry", "finetune_run", "step_results",
                           "trained", "two_process_run"})


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def _refuse_server(server: object, *_: object, **__: object) -> None:
    pytest.fail(f"{type(server).__name__} {getattr(server, 'name', '')} started in the fast tier (-m 'not slow'): "
                "mark the test's module `pytestmark = pytest.mark.slow` or use a fixture of SLOW_FIXTURES "
                "(tests/conftest.py)")


def pytest_configure(config: pytest.Config) -> None:
    """In the fast tier every server start of loraflow (loraflow.process.ManagedProcess: the stack's services, vLLM,
    the endpoint, PostgreSQL) and Prefect's own temporary server (a flow run without a stack) fails instead."""
    for message, category in DEPENDENCY_WARNINGS:
        config.addinivalue_line("filterwarnings", f"ignore:{message}:{category.__name__}")
    if "not slow" not in (config.getoption("markexpr") or ""):
        return
    from prefect.server.api.server import SubprocessASGIServer

    from loraflow.process import ManagedProcess

    ManagedProcess.start = _refuse_server  # type: ignore[method-assign]
    SubprocessASGIServer.start = _refuse_server  # type: ignore[method-assign]

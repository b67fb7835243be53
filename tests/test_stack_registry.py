"""Commands run in this process use the local stack's MLflow server while it runs: its experiments keep their
artifacts behind the server (`mlflow-artifacts:`), which the SQLite file alone cannot reach (`loraflow run` after
`make demo` failed on exactly that). A recorded live process stands in for the server: the switch reads only the
record and the stack's URL, never the server itself."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from loraflow import paths
from loraflow.localstack.lifecycle import stack_registry
from loraflow.localstack.stack import Stack
from loraflow.process import read_record, recorded, write_record


@pytest.fixture
def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Stack:
    monkeypatch.setenv("LORAFLOW_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("LORAFLOW_MLFLOW_PORT", "5999")
    return Stack.from_env()


@pytest.fixture
def recorded_server(stack: Stack) -> Iterator[None]:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_record(stack.record_file("mlflow-server"),
                     {"pid": process.pid, "create_time": psutil.Process(process.pid).create_time()})
        yield
    finally:
        process.kill()
        process.wait()


def test_a_running_stack_server_is_the_registry_for_the_command_only(stack: Stack, recorded_server: None) -> None:
    assert paths.default_tracking_uri().startswith("sqlite:")
    with stack_registry(stack) as uri:
        assert uri == stack.mlflow_url == "http://127.0.0.1:5999"
        assert paths.default_tracking_uri() == stack.mlflow_url
    assert "MLFLOW_TRACKING_URI" not in os.environ  # the caller's environment is given back


def test_without_a_stack_or_with_an_explicit_uri_nothing_changes(stack: Stack, recorded_server: None,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example.internal")
    with stack_registry(stack) as uri:
        assert uri is None and os.environ["MLFLOW_TRACKING_URI"] == "http://mlflow.example.internal"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    stack.record_file("mlflow-server").unlink()
    with stack_registry(stack) as uri:
        assert uri is None and paths.default_tracking_uri().startswith("sqlite:")


def test_a_record_a_second_off_still_names_its_live_process(stack: Stack, recorded_server: None) -> None:
    """psutil's create_time moves by a whole second when the boot time it derives from does (seen on a live MLflow
    server of `make demo`): the record must still name the process, or `loraflow down` leaves it running."""
    record = read_record(stack.record_file("mlflow-server"))
    assert record is not None and recorded(record) is not None
    assert recorded(record | {"create_time": record["create_time"] - 1.0}) is not None
    assert recorded(record | {"create_time": record["create_time"] + 1.0}) is not None
    assert recorded(record | {"create_time": record["create_time"] - 30}) is None  # another process on that PID

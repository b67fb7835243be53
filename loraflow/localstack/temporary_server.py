"""Prefect's temporary server for a `loraflow run` that no Prefect server is configured for, started before the
run's imports so that the two overlap.

Prefect starts this same server itself (the same uvicorn command, UI off, ephemeral mode) at a flow's first API
call: only after the process has imported prefect, mlflow and the flow's tasks, so the server's own start (a
process importing Prefect's server, then opening its database) comes on top of those imports. Started first, as a
separate process, it runs on another core while this one imports; on a cached rerun these two waits are most of
the time (bench/README.md). It stops when the command ends, as Prefect's would.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from loraflow.errors import LoraflowError
from loraflow.process import is_healthy, stop_process

HOST = "127.0.0.1"
PORT_IN_USE = 3  # uvicorn's exit status when the port was taken in between
START_TIMEOUT_S = 120.0  # a busy 2-core machine; Prefect's own default (20 s) is too short there


def configured_api_url() -> str | None:
    """The Prefect API this process would use without us: PREFECT_API_URL, else the active profile's. Read the
    way Prefect reads it (env, then PREFECT_PROFILE or the file's `active`, in PREFECT_PROFILES_PATH or
    $PREFECT_HOME/profiles.toml), without importing Prefect: its settings are fixed once it is imported."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    prefect_home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    file = Path(os.environ.get("PREFECT_PROFILES_PATH") or prefect_home / "profiles.toml").expanduser()
    if not file.is_file():
        return None
    profiles = tomllib.loads(file.read_text(encoding="utf-8"))
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active")
    return profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def _spawn(port: int) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    return subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
                             "--host", HOST, "--port", str(port), "--log-level", "error", "--lifespan", "on"], env=env)


def _wait_healthy(process: subprocess.Popen, port: int) -> tuple[subprocess.Popen, int]:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() == PORT_IN_USE:
            port = _free_port()
            process = _spawn(port)
        elif process.poll() is not None:
            raise LoraflowError(f"Prefect's temporary server exited with status {process.returncode}")
        if is_healthy(f"http://{HOST}:{port}/api/health"):
            return process, port
        time.sleep(0.1)
    stop_process(psutil.Process(process.pid))
    raise LoraflowError(f"Prefect's temporary server did not answer within {START_TIMEOUT_S:.0f} s")


class EarlyPrefectServer:
    """Started at construction unless a Prefect API is configured; `serving()` (entered after the heavy imports,
    around the flow) waits for it and points Prefect at it."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.process = None if configured_api_url() else _spawn(self.port)
        atexit.register(self.stop)  # runs after Prefect's own exit handlers (registered later) have drained

    def stop(self) -> None:
        if self.process is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                stop_process(psutil.Process(self.process.pid))

    @contextmanager
    def serving(self) -> Iterator[str | None]:
        """Yields the temporary server's API URL, or None when Prefect is configured to use another server."""
        from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, temporary_settings

        if self.process is None or PREFECT_API_URL.value():  # Prefect's own word on it (.env, prefect.toml...)
            self.stop()
            yield None
            return
        self.process, self.port = _wait_healthy(self.process, self.port)
        api_url = f"http://{HOST}:{self.port}/api"
        # No UI: an empty UI URL keeps dead links to this server out of the MLflow run's tags.
        with temporary_settings({PREFECT_API_URL: api_url, PREFECT_UI_URL: ""}):
            yield api_url

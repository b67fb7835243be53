"""Child processes with their own log file and process group: started, waited on until healthy, stopped cleanly.
Shared by the local stack (Prefect, MLflow, worker) and the serving stack (vLLM, router)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx


class ProcessFailed(RuntimeError):
    """The process exited or never became healthy; the message ends with its log tail."""


def log_tail(log_file: Path, lines: int = 40) -> str:
    if not log_file.is_file():
        return ""
    return "\n".join(log_file.read_text(errors="replace").splitlines()[-lines:])


class ManagedProcess:
    def __init__(self, name: str, command: list[str], env: dict[str, str], log_file: Path, health_url: str):
        self.name = name
        self.command = command
        self.env = env
        self.log_file = log_file
        self.health_url = health_url
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def start(self) -> ManagedProcess:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            # Own session: stop() signals the whole group (vLLM forks an engine core process).
            self.popen = subprocess.Popen(
                self.command,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        return self

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.popen is not None and self.popen.poll() is not None:
                raise ProcessFailed(f"{self.name} exited with {self.popen.returncode}:\n{log_tail(self.log_file)}")
            if is_healthy(self.health_url):
                return
            time.sleep(0.5)
        self.stop()
        raise ProcessFailed(f"{self.name} not healthy after {timeout_s:.0f}s:\n{log_tail(self.log_file)}")

    def stop(self, grace_s: float = 20) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        stop_group(self.popen.pid, grace_s)
        self.popen.wait()


def is_healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def stop_group(pid: int, grace_s: float = 20) -> None:
    """SIGTERM the process group led by `pid`, SIGKILL what is left after `grace_s`."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if not _group_alive(pid):
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return


def _group_alive(pgid: int) -> bool:
    # Reap the leader if it is our child: a zombie still counts as a group member for killpg.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pgid, os.WNOHANG)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True

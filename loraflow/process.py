"""Child processes with their own log file and process group: started, recorded, waited on until healthy, and
stopped with everything they forked. The one process module of the local stack (Prefect, MLflow, worker) and of
the serving servers (vLLM, router).

A record is a small JSON file holding the PID *and* its start time, so a PID reused after a reboot is never
mistaken for ours and never signalled.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil

from loraflow.errors import LoraflowError

STOP_GRACE_S = 20.0


class ProcessFailed(LoraflowError):
    """The process exited, never became healthy, or could not be stopped; the message says why."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS's pick), for a server started next."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(check: Callable[[], bool], timeout: float) -> float:
    """Poll `check` every second until it holds; the seconds that took. Fails (AssertionError, as a test or a bench
    wants it) when it does not hold within `timeout`."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"not within {timeout} s"
        time.sleep(1)
    return time.monotonic() - started


def log_tail(log_file: Path, lines: int = 40) -> str:
    if not log_file.is_file():
        return ""
    return "\n".join(log_file.read_text(errors="replace").splitlines()[-lines:])


def is_healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def answers_within(url: str, timeout_s: float) -> bool:
    """Whether `url` answers 200 within `timeout_s`: a live server on a loaded machine (its SQLite busy, say) can
    miss one 2-second probe, and one miss must not be taken for a dead server."""
    deadline = time.monotonic() + timeout_s
    while not is_healthy(url):
        if time.monotonic() >= deadline:
            return False
        time.sleep(1)
    return True


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def port_holder(port: int) -> str:
    """Who listens on `port`, as far as this user may see: `pid 123 (python -m vllm...)`, or `an unknown process`."""
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                with contextlib.suppress(psutil.Error):
                    return f"pid {conn.pid} ({' '.join(psutil.Process(conn.pid).cmdline())[:160]})"
                return f"pid {conn.pid}"
    return "an unknown process"


def alive(process: psutil.Process) -> bool:
    # A killed process nobody has reaped yet is a zombie: it holds no resources and counts as gone.
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def record_of(process: psutil.Process, **extra: Any) -> dict[str, Any]:
    return {"pid": process.pid, "create_time": process.create_time(), **extra}


CREATE_TIME_TOLERANCE_S = 2.0


def recorded(record: dict[str, Any] | None) -> psutil.Process | None:
    """The live process a record names; None when it is gone or its PID now belongs to another process."""
    if not record:
        return None
    try:
        process = psutil.Process(int(record["pid"]))
        # psutil derives create_time from the boot time, which /proc/stat gives in whole seconds and which moves
        # by one when the clock is adjusted: a live server read 1.0 s off its record here. PID reuse inside 2 s
        # is not a practical risk.
        same = abs(process.create_time() - float(record["create_time"])) < CREATE_TIME_TOLERANCE_S
    except (psutil.NoSuchProcess, KeyError, ValueError):
        return None
    return process if same and alive(process) else None


def read_record(file: Path) -> dict[str, Any] | None:
    return json.loads(file.read_text()) if file.is_file() else None


def write_record(file: Path, record: dict[str, Any]) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, file)


def _family(leader: psutil.Process) -> list[psutil.Process]:
    """The leader, its descendants, and anything else still in its process group."""
    members = {leader.pid: leader}
    with contextlib.suppress(psutil.NoSuchProcess):
        members.update({child.pid: child for child in leader.children(recursive=True)})
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == leader.pid:
                members.setdefault(process.pid, process)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return list(members.values())


def wait_gone(processes: Iterable[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those of `processes` still alive after at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    left = [p for p in processes if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = [p for p in left if alive(p)]
    return left


def _signal_all(processes: Iterable[psutil.Process], sig: signal.Signals) -> None:
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(sig)


def stop_process(leader: psutil.Process | None, grace_s: float = STOP_GRACE_S) -> list[int]:
    """Stop a leader and its whole family (TERM, then KILL after `grace_s`); returns the PIDs stopped."""
    if leader is None or not alive(leader):
        return []
    # Freeze the leader while its family is collected: a worker must not start a flow-run process between the
    # snapshot and the signal (that child would outlive it, reparented and out of reach).
    with contextlib.suppress(psutil.NoSuchProcess):
        leader.suspend()
    family = _family(leader)
    _signal_all(family, signal.SIGTERM)
    with contextlib.suppress(psutil.NoSuchProcess):
        leader.resume()
    stubborn = wait_gone(family, grace_s)
    _signal_all(stubborn, signal.SIGKILL)
    # Children forked while shutting down join the group late: sweep it once more (the group outlives its leader).
    stragglers = [p for p in _family(leader) if alive(p) and p.pid not in {f.pid for f in family}]
    _signal_all(stragglers, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError, ProcessLookupError):
        os.waitpid(leader.pid, os.WNOHANG)  # reap it if it is our own child
    left = wait_gone(stubborn + stragglers, 5.0)
    if left:
        raise ProcessFailed(f"processes {[p.pid for p in left]} survived SIGKILL")
    return sorted(p.pid for p in family)


def stop_record(record: dict[str, Any] | None, grace_s: float = STOP_GRACE_S) -> list[int]:
    """Stop what a record names: the leader with its family, or, when the leader died alone (SIGKILL, OOM), the
    members of its process group it left behind (vLLM's engine core). Only processes started after the leader are
    touched, so a reused PID or group id is never signalled."""
    if not record:
        return []
    leader = recorded(record)
    if leader is not None:
        return stop_process(leader, grace_s)
    orphans = []
    started = float(record["create_time"]) - CREATE_TIME_TOLERANCE_S
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(process.pid) == int(record["pid"]) and process.create_time() >= started:
                orphans.append(process)
    _signal_all(orphans, signal.SIGKILL)
    if wait_gone(orphans, 5.0):
        raise ProcessFailed(f"processes {[p.pid for p in orphans if alive(p)]} survived SIGKILL")
    return sorted(p.pid for p in orphans)


class ManagedProcess:
    """One server process: its own session (so its whole family can be stopped) and its own log file."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log_file: Path,
                 health_url: str | None, cwd: Path | None = None):
        self.name = name
        self.command = command
        self.env = env
        self.log_file = log_file
        self.health_url = health_url
        self.cwd = cwd
        self.process: psutil.Process | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> ManagedProcess:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            popen = subprocess.Popen(self.command, env=self.env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.process = psutil.Process(popen.pid)
        return self

    def record(self, **extra: Any) -> dict[str, Any]:
        assert self.process is not None, f"{self.name} was not started"
        return record_of(self.process, argv=self.command, log=str(self.log_file), **extra)

    def wait_healthy(self, timeout_s: float, check: Any = None) -> None:
        """Until the health URL (or `check()`) answers while *this* process is alive: an answer from another
        process on the same port while ours died proves nothing."""
        check = check or (lambda: is_healthy(str(self.health_url)))
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process is None or not alive(self.process):
                raise ProcessFailed(f"{self.name} exited during startup; see {self.log_file}:\n"
                                    f"{log_tail(self.log_file)}")
            if check():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise ProcessFailed(f"{self.name} not healthy after {timeout_s:.0f} s; see {self.log_file}:\n"
                                    f"{log_tail(self.log_file)}")
            time.sleep(0.5)

    def stop(self, grace_s: float = STOP_GRACE_S) -> list[int]:
        return stop_process(self.process, grace_s)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock across processes for the body (fcntl): released by the kernel when its holder dies, so a
    killed pass never leaves it taken."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

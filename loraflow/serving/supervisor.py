"""The base servers' watchdog, run inside the endpoint process: the endpoint outlives every vLLM, so the public
port never refuses a connection (it answers 503 + Retry-After for the names of a server that is down). When a
recorded vLLM dies (SIGKILL, OOM), it is started again at once with the command and environment its record holds,
the adapters it had loaded are loaded again from the same directories, and the record names the new process.
A restart a reconciler asks for (the record names a new command and `restart`: a job needs more capacity) drains
first: new requests for the server get 503 + Retry-After, the open ones finish, then vLLM is stopped and started
anew the same way. A server whose record is gone was stopped on purpose.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from loraflow.process import ManagedProcess, ProcessFailed, read_record, recorded, stop_record, write_record
from loraflow.serving.records import SERVER_FILE

log = logging.getLogger("loraflow.serving.supervisor")


class Supervisor:
    """`open_requests(server_id)`: how many requests the endpoint has open on a server (a planned restart waits
    for 0, at most `drain_s`)."""

    def __init__(self, servers_dir: Path, api_key: str | None, open_requests: Callable[[str], int] = lambda _: 0,
                 interval_s: float = 1.0, drain_s: float = 120.0):
        self.servers_dir = servers_dir
        self.api_key = api_key
        self.open_requests = open_requests
        self.interval_s = interval_s
        self.drain_s = drain_s
        self.urls: dict[str, str] = {}  # server id -> vLLM URL, as recorded
        self.restarting: set[str] = set()
        self.restarts: dict[str, int] = {}
        self.adapters: dict[str, dict[str, str]] = {}  # server id -> {LoRA name: directory}, as vLLM last said
        self._stop = threading.Event()
        self._starting: dict[str, ManagedProcess] = {}
        self._thread = threading.Thread(target=self._watch, name="vllm-supervisor", daemon=True)

    def _http(self, url: str) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=url, headers=headers, timeout=30)

    def start(self) -> None:
        self.scan()
        self._thread.start()

    def close(self) -> None:
        """Endpoint shutdown: a vLLM still starting would outlive us unrecorded, so it is stopped."""
        self._stop.set()
        self._thread.join(5)
        for process in list(self._starting.values()):
            process.stop()

    def scan(self) -> dict[str, dict[str, Any]]:
        """The recorded servers now (a reconciler may have just added one); refreshes `urls`."""
        records = {}
        for file in sorted(self.servers_dir.glob(f"*/{SERVER_FILE}")):
            with contextlib.suppress(OSError, ValueError):
                if (record := read_record(file)) is not None:
                    records[record["server_id"]] = record
        self.urls = {server_id: record["url"] for server_id, record in records.items()}
        return records

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                for server_id, record in self.scan().items():
                    if server_id in self.restarting:
                        continue
                    alive = recorded(record["process"]) is not None
                    if alive and not record.get("restart"):
                        self._remember_adapters(server_id, record["url"])
                    else:
                        self.restarting.add(server_id)
                        threading.Thread(target=self._restart, args=(server_id, record), daemon=True,
                                         name=f"restart-{server_id}").start()
            except Exception:  # the watchdog must outlive any one failed pass; the next tick tries again
                log.exception("vLLM supervisor pass failed")

    def _remember_adapters(self, server_id: str, url: str) -> None:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError), self._http(url) as http:
            data = http.get("/v1/models", timeout=5).json()["data"]
            self.adapters[server_id] = {e["id"]: e["root"] for e in data if e.get("parent") and e.get("root")}

    def _restart(self, server_id: str, record: dict[str, Any]) -> None:
        dead = record["process"]
        try:
            if record.get("restart"):
                log.warning("%s: restarting as asked (%s), once its open requests finish", server_id,
                            record["restart"])
                self._drain(server_id)
                # What it holds now, not a second ago: a job may have loaded a version just before the grow.
                self._remember_adapters(server_id, record["url"])
            with contextlib.suppress(ChildProcessError, ProcessLookupError):
                os.waitpid(int(dead["pid"]), os.WNOHANG)  # reap it when it was our child (a previous restart)
            stop_record(dead)  # what it left behind in its group (vLLM's engine core holds the memory)
            key = {"VLLM_API_KEY": self.api_key} if self.api_key else {}
            process = ManagedProcess("vllm", list(dead["argv"]), {**os.environ, **dead.get("env", {}), **key},
                                     Path(dead["log"]), f"{record['url']}/health")
            log.warning("vLLM of %s (pid %s) is gone: starting it again", server_id, dead["pid"])
            self._starting[server_id] = process.start()
            try:
                process.wait_healthy(float(dead.get("startup_timeout_s", 600)))
            except ProcessFailed:
                log.exception("vLLM of %s did not come back; the next pass tries again", server_id)
                return
            self._reload(server_id, record["url"])
            self._replace_record(server_id, dead, process)
            self.restarts[server_id] = self.restarts.get(server_id, 0) + 1
        finally:
            self._starting.pop(server_id, None)
            self.restarting.discard(server_id)

    def _drain(self, server_id: str) -> None:
        deadline = time.monotonic() + self.drain_s
        while self.open_requests(server_id) and time.monotonic() < deadline:
            time.sleep(0.2)

    def _reload(self, server_id: str, url: str) -> None:
        with self._http(url) as http:
            for name, root in sorted(self.adapters.get(server_id, {}).items()):
                reply = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": root}, timeout=300)
                # A refusal leaves the name unloaded: its job's next reconcile pass loads it through the canary.
                log.warning("%s: reloaded %s from %s: %s", server_id, name, root, reply.status_code)

    def _replace_record(self, server_id: str, dead: dict[str, Any], process: ManagedProcess) -> None:
        file = self.servers_dir / server_id / SERVER_FILE
        record = read_record(file)
        if record is None or record["process"].get("pid") != dead["pid"]:
            process.stop()  # stopped on purpose (or replaced) meanwhile: this one must not stay unrecorded
            return
        extra = {k: v for k, v in dead.items() if k in ("env", "startup_timeout_s")}
        record["process"] = process.record(**extra)
        record.pop("restart", None)
        write_record(file, record)

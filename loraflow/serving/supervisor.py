"""vLLM's watchdog, run inside the router process: the router outlives vLLM, so the stable port never refuses a
connection (it answers 503 + Retry-After while vLLM is down). When the vLLM that `stack.json` records dies (SIGKILL,
OOM), it is started again at once with the recorded command and environment, the adapters it had loaded are loaded
again from the same directories, and the record names the new process. No record: stopped on purpose, nothing to do.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path
from typing import Any

import httpx

from loraflow.process import ManagedProcess, ProcessFailed, read_record, recorded, stop_record, write_record

log = logging.getLogger("loraflow.serving.supervisor")


class Supervisor:
    def __init__(self, stack_file: Path, upstream: str, api_key: str | None, interval_s: float = 1.0):
        self.stack_file = stack_file
        self.upstream = upstream.rstrip("/")
        self.api_key = api_key
        self.interval_s = interval_s
        self.restarting = False
        self.restarts = 0
        self.adapters: dict[str, str] = {}  # LoRA name -> directory, as vLLM last reported them
        self._stop = threading.Event()
        self._starting: ManagedProcess | None = None
        self._thread = threading.Thread(target=self._watch, name="vllm-supervisor", daemon=True)

    def _http(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.upstream, headers=headers, timeout=30)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        """Router shutdown: a vLLM still starting would outlive us unrecorded, so it is stopped."""
        self._stop.set()
        self._thread.join(5)
        if self._starting is not None:
            self._starting.stop()

    def _watch(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                record = read_record(self.stack_file)
                vllm = (record or {}).get("processes", {}).get("vllm")
                if vllm is None:
                    continue
                if recorded(vllm) is not None:
                    self._remember_adapters()
                else:
                    self._restart(vllm)
            except Exception:  # the watchdog must outlive any one failed pass; the next tick tries again
                log.exception("vLLM supervisor pass failed")

    def _remember_adapters(self) -> None:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError), self._http() as http:
            data = http.get("/v1/models", timeout=5).json()["data"]
            self.adapters = {e["id"]: e["root"] for e in data if e.get("parent") and e.get("root")}

    def _restart(self, dead: dict[str, Any]) -> None:
        self.restarting = True
        try:
            with contextlib.suppress(ChildProcessError, ProcessLookupError):
                os.waitpid(int(dead["pid"]), os.WNOHANG)  # reap it when it was our child (a previous restart)
            stop_record(dead)  # what it left behind in its group (vLLM's engine core holds the memory)
            key = {"VLLM_API_KEY": self.api_key} if self.api_key else {}
            process = ManagedProcess("vllm", list(dead["argv"]), {**os.environ, **dead.get("env", {}), **key},
                                     Path(dead["log"]), f"{self.upstream}/health")
            log.warning("vLLM (pid %s) is gone: starting it again", dead["pid"])
            self._starting = process.start()
            try:
                process.wait_healthy(float(dead.get("startup_timeout_s", 600)))
            except ProcessFailed:
                log.exception("vLLM did not come back; the next pass tries again")
                return
            self._reload()
            self._replace_record(dead, process)
            self.restarts += 1
        finally:
            self._starting = None
            self.restarting = False

    def _reload(self) -> None:
        with self._http() as http:
            for name, root in sorted(self.adapters.items()):
                reply = http.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": root}, timeout=300)
                # A refusal leaves the name unloaded: the reconciler's next pass loads it through the canary.
                log.warning("reloaded %s from %s: %s", name, root, reply.status_code)

    def _replace_record(self, dead: dict[str, Any], process: ManagedProcess) -> None:
        record = read_record(self.stack_file)
        if record is None or record.get("processes", {}).get("vllm", {}).get("pid") != dead["pid"]:
            process.stop()  # stopped on purpose (or replaced) meanwhile: this one must not stay unrecorded
            return
        extra = {k: v for k, v in dead.items() if k in ("env", "startup_timeout_s")}
        record["processes"]["vllm"] = process.record(**extra)
        write_record(self.stack_file, record)

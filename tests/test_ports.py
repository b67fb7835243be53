"""Two projects (two LORAFLOW_HOMEs) on one machine, the second configured with the first one's endpoint port: its
deploy fails at once, naming the port, the process that holds it and the field to change; it starts nothing and
attaches to nothing (a health check answered by someone else's server proves nothing). And `make clean` with
servers running stops them before it deletes their records."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil
import pytest

from loraflow.config import load_config
from loraflow.localstack.stack import REPO_ROOT
from loraflow.process import ProcessFailed, port_in_use
from loraflow.serving.deploy import endpoint_for
from loraflow.serving.records import read_endpoint, running_endpoint
from tests.fixtures import TINY_CONFIG, free_port


def test_a_port_held_by_another_home_fails_fast_naming_it(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    holder = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # home A's server, say
    try:
        deadline = time.monotonic() + 30
        while not port_in_use("127.0.0.1", port):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        monkeypatch.setenv("LORAFLOW_HOME", str(tmp_path / "home-b"))
        monkeypatch.setenv("LORAFLOW_SERVING_PORT", str(port))
        job = load_config(TINY_CONFIG)
        started = time.monotonic()
        with pytest.raises(ProcessFailed) as refused:
            endpoint_for(job, start=True)
        assert time.monotonic() - started < 10
        message = str(refused.value)
        assert f"port {port} (serving.port, or LORAFLOW_SERVING_PORT" in message and f"pid {holder.pid}" in message
        assert running_endpoint() is None and read_endpoint() is None
    finally:
        holder.kill()
        holder.wait()


def test_make_clean_while_servers_run_leaves_no_process(tmp_path) -> None:
    """`make clean` deletes LORAFLOW_HOME, and with it the records of what runs: it stops them first."""
    home = tmp_path / "home"
    env = {**os.environ, "LORAFLOW_HOME": str(home), "LORAFLOW_SERVING_PORT": str(free_port())}
    script = ("from loraflow.config import load_config\nfrom loraflow.serving.deploy import endpoint_for\n"
              f"print(endpoint_for(load_config({TINY_CONFIG!r}), start=True).process['pid'])\n")
    pid = int(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                             check=True).stdout.split()[-1])
    assert psutil.pid_exists(pid)
    subprocess.run(["make", "clean"], cwd=REPO_ROOT, env=env, capture_output=True, check=True, timeout=120)
    deadline = time.monotonic() + 10
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"endpoint {pid} survived make clean"
        time.sleep(0.2)
    assert not home.exists()

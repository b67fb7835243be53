"""Two projects (two LORAFLOW_HOMEs) on one machine, the second configured with the first one's serving ports: its
deploy fails at once, naming the port, the process that holds it and the field to change; it starts nothing and
attaches to nothing (a health check answered by someone else's server proves nothing)."""

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
from loraflow.serving.records import running_endpoint, state_dir
from loraflow.serving.servers import start_stack
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
        job = load_config(TINY_CONFIG, {"serving.vllm_port": port, "serving.port": free_port()})
        started = time.monotonic()
        with pytest.raises(ProcessFailed) as refused:
            start_stack(job)
        assert time.monotonic() - started < 10
        message = str(refused.value)
        assert f"port {port} (serving.vllm_port)" in message and f"pid {holder.pid}" in message, message
        assert "--set serving.vllm_port=" in message
        assert running_endpoint(job.registry.model_name) is None
        assert not (state_dir(job.registry.model_name) / "stack.json").exists()
    finally:
        holder.kill()
        holder.wait()


def test_make_clean_while_servers_run_leaves_no_process(tmp_path) -> None:
    """`make clean` deletes LORAFLOW_HOME, and with it the records of what runs: it stops them first."""
    home = tmp_path / "home"
    job = load_config(TINY_CONFIG, {"serving.port": free_port(), "serving.vllm_port": free_port()})
    env = {**os.environ, "LORAFLOW_HOME": str(home)}
    script = ("from loraflow.config import load_config\nfrom loraflow.serving import records\n"
              "from loraflow.serving.servers import router_process\nimport sys\n"
              f"job = load_config({TINY_CONFIG!r}, {{'serving.port': {job.serving.port}, "
              f"'serving.vllm_port': {job.serving.vllm_port}}})\n"
              "d = records.state_dir(job.registry.model_name)\nrouter = router_process(job, d).start()\n"
              "records.save(d, records.Endpoint('', '', '', '', 16), {'router': router.record()}, {})\n"
              "print(router.pid)\n")
    pid = int(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                             check=True).stdout.split()[-1])
    assert psutil.pid_exists(pid)
    subprocess.run(["make", "clean"], cwd=REPO_ROOT, env=env, capture_output=True, check=True, timeout=120)
    deadline = time.monotonic() + 10
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, f"router {pid} survived make clean"
        time.sleep(0.2)
    assert not home.exists()

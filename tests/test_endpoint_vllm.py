"""The endpoint in front of a real vLLM: vLLM's own endpoints and lm-eval going through the endpoint on the stable
name answer as vLLM does on the versioned name."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from loraflow.serving.client import EndpointClient
from loraflow.tiny.base import tiny_ko_dir
from loraflow.tiny.kobest import tiny_kobest_dir
from tests.fixtures import ATTENTION, make_adapter, make_registry
from tests.fixtures.serving import ServedJobs


@pytest.mark.slow
def test_real_vllm_answers_the_same_through_the_endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's own endpoints and an lm-eval run (local-completions sends `Authorization: Bearer ` when no key is
    set) give the same answers through the endpoint on the stable name as straight from vLLM on the version."""
    import lm_eval  # only here: importing it costs seconds, the fast tests need none of it
    from lm_eval.tasks import TaskManager

    model, key_env = "tiny-ko-routed", "LORAFLOW_TEST_ENDPOINT_KEY"
    monkeypatch.delenv(key_env, raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # so lm-eval sends the empty `Bearer `
    base_dir = tiny_ko_dir()
    registry = make_registry(tmp_path / "mlflow", model)
    registry.set_alias("champion", registry.register(make_adapter(base_dir, tmp_path / "adapter", r=8,
                                                                  targets=ATTENTION, seed=1)))
    served = ServedJobs(key_env, None)
    try:
        report = served.deploy(registry)
        vllm, routed, versioned = served.server_url(report), served.url, f"{model}-v1"
        assert report.routes == {model: versioned}
        with httpx.Client(timeout=120) as http:
            assert http.get(f"{routed}/version").json() == http.get(f"{vllm}/version").json()
            prompt = {"prompt": "대한민국 헌법 제1조는 무엇입니까?"}
            direct = http.post(f"{vllm}/tokenize", json={"model": versioned, **prompt}).json()
            assert http.post(f"{routed}/tokenize", json={"model": model, **prompt}).json() == direct
            detok = {"tokens": direct["tokens"]}
            assert (http.post(f"{routed}/detokenize", json={"model": model, **detok}).json()
                    == http.post(f"{vllm}/detokenize", json={"model": versioned, **detok}).json())
            # Values move between two scrapes; the exposition (metric names, types, content type) must not.
            metrics = [http.get(f"{url}/metrics") for url in (routed, vllm)]
            assert {m.status_code for m in metrics} == {200} and len({m.headers["content-type"] for m in metrics}) == 1
            names = [{line for line in m.text.splitlines() if line.startswith("# TYPE")} for m in metrics]
            assert names[0] == names[1] and any("vllm:" in line for line in names[0])

        def copa_acc(base_url: str, name: str) -> float:
            args = {"model": name, "base_url": f"{base_url}/v1/completions", "tokenizer": str(base_dir),
                    "tokenizer_backend": "huggingface", "tokenized_requests": True}
            tasks = TaskManager(include_path=str(tiny_kobest_dir()), include_defaults=False)
            results = lm_eval.simple_evaluate(model="local-completions", model_args=args,
                                              tasks=["tiny_kobest_copa"], task_manager=tasks, limit=20)
            return results["results"]["tiny_kobest_copa"]["acc,none"]

        through_endpoint, direct_acc = copa_acc(routed, model), copa_acc(vllm, versioned)
        print(f"tiny_kobest_copa acc: endpoint {through_endpoint}, vLLM {direct_acc}")
        assert through_endpoint == direct_acc
        assert EndpointClient(routed).routes()["inflight"] == {}
    finally:
        served.stop()

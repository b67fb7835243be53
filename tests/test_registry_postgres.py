"""The registry several people share: MLflow's server on a real PostgreSQL (started by the test through the stack's
own code), artifacts served by the tracking server, basic auth in front. Concurrent registrations, alias moves and
what the reconciler reads, a crash of MLflow between train and register, who may move an alias."""

from __future__ import annotations

import multiprocessing
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from mlflow.exceptions import MlflowException
from mlflow.server import get_app_client
from prefect import flow

from loraflow.cli import main
from loraflow.hashing import sha_of
from loraflow.localstack.lifecycle import describe, recorded_process
from loraflow.localstack.mlflow_auth import PASSWORD_ENV, USERNAME_ENV
from loraflow.registry.client import client_at
from loraflow.registry.download import download_version
from loraflow.registry.register import RUN_KEY_TAG, first_version, register_adapter
from loraflow.registry.rollback import move_alias
from loraflow.serving.canary import CanaryVerdict
from loraflow.serving.registry_view import CANARY_TAG, aliased_versions, failed_before, record_canary
from tasks.register import register
from tests.fixtures import ATTENTION, TINY_CONFIG, RegistryFixture, make_adapter
from tests.fixtures.postgres import PostgresRegistry, register_keys, registry_job, step_outputs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def adapter(tiny_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tiny_base_dir, tmp_path_factory.mktemp("adapter") / "a", r=8, targets=ATTENTION, seed=1)


def test_stack_runs_mlflow_on_its_postgres(postgres_registry: PostgresRegistry) -> None:
    print(f"\n[timing] {postgres_registry.timings}")
    stack = postgres_registry.stack
    tables = "SELECT count(*) FROM information_schema.tables WHERE table_name = 'model_versions'"
    assert postgres_registry.sql(tables) == [(1,)]  # MLflow created its schema in PostgreSQL
    postgres = recorded_process(stack, "postgres")
    assert postgres is not None
    listening = {c.laddr.ip for c in postgres.net_connections("inet") if c.status == psutil.CONN_LISTEN}
    assert listening == {"127.0.0.1"}
    # Basic auth in front: no user, no answer; the admin (this process's MLFLOW_TRACKING_USERNAME) gets one.
    search = f"{postgres_registry.url}/api/2.0/mlflow/registered-models/search"
    assert httpx.get(search, timeout=30).status_code == 401
    assert client_at(postgres_registry.url).search_registered_models() == []
    shown = describe(stack)
    assert f"postgresql://loraflow@127.0.0.1:{stack.postgres_port}/mlflow" in shown and "(basic auth)" in shown
    # Secrets never reach a command line, a process record or a log.
    local = stack.local_postgres
    assert local is not None
    secrets = [local.password, postgres_registry.credentials()[PASSWORD_ENV]]
    for name in ("postgres", "mlflow-server"):
        for text in (stack.record_file(name).read_text(), stack.log_file(name).read_text(errors="replace")):
            assert not any(secret in text for secret in secrets), name


def test_concurrent_registrations_get_distinct_versions(postgres_registry: PostgresRegistry, adapter: Path,
                                                        tmp_path: Path) -> None:
    """Two processes register three trainings each, at the same moment, into a model neither has created yet."""
    model = "shared-concurrent"
    batches = [[f"p{p}-{i}" for i in range(3)] for p in range(2)]
    start_at = time.time() + 3  # both forked processes have written their files by then
    # Forked, not spawned: a spawned child would import the whole test package again (~15 s of CPU each).
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        futures = [pool.submit(register_keys, postgres_registry.url, model, str(tmp_path), str(adapter), keys,
                               start_at, postgres_registry.credentials()) for keys in batches]
        registered = {key: version for future in futures for key, version in future.result(timeout=300).items()}
    print(f"\n[timing] 2 x 3 concurrent registrations: {time.time() - start_at:.1f} s")
    assert sorted(int(v) for v in registered.values()) == list(range(1, 7)), registered
    client = client_at(postgres_registry.url)
    for key, version in registered.items():
        # The version registered for each training carries that training's run key, and no other version does.
        run_key = sha_of(f"train-{key}", f"eval-{key}")[:16]
        found = client.search_model_versions(f"name='{model}' and tags.`{RUN_KEY_TAG}`='{run_key}'")
        assert [v.version for v in found] == [version]
    rows = postgres_registry.sql("SELECT version FROM model_versions WHERE name = %s ORDER BY version", model)
    assert [row[0] for row in rows] == list(range(1, 7))


def test_alias_moves_and_what_the_reconciler_reads(postgres_registry: PostgresRegistry, adapter: Path,
                                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Aliases moved by `loraflow promote` and a rollback; what the reconciler reads and writes through the tracking
    server: the aliased versions, their files (through the server's artifact proxy), its canary verdict. (The
    reconciler with a real vLLM, on the SQLite-backed registry: tests/test_serving.py; it only speaks MLflow's API.)"""
    model = "shared-served"
    client = client_at(postgres_registry.url)
    registry = RegistryFixture(tracking_uri=postgres_registry.url, model_name=model,
                               experiment_id=client.create_experiment("served"))
    first, second = registry.register(adapter), registry.register(adapter)
    assert main(["promote", model, first, "--tracking-uri", postgres_registry.url]) == 0
    assert main(["promote", model, second, "--alias", "challenger", "--tracking-uri", postgres_registry.url]) == 0
    assert f"champion v- -> v{first}" in capsys.readouterr().out

    aliased = aliased_versions(client, model, ["champion", "challenger"])
    assert {alias: v.version for alias, v in aliased.items()} == {"champion": first, "challenger": second}
    downloaded = download_version(aliased["champion"], tmp_path / "adapters", postgres_registry.url)
    for file in ("adapter_config.json", "adapter_model.safetensors"):
        assert (downloaded / file).read_bytes() == (adapter / file).read_bytes()
    record_canary(client, aliased["champion"], CanaryVerdict(passed=True, reason="test: answers"))
    record_canary(client, aliased["challenger"], CanaryVerdict(passed=False, reason="test: gibberish"))
    assert registry.tags(first)[CANARY_TAG] == "passed" and registry.tags(second)[CANARY_TAG] == "failed"

    move_alias(client, model, second, "champion")  # a rollback's way
    champion = aliased_versions(client, model, ["champion"])["champion"]
    assert champion.version == second
    assert failed_before(champion)  # a polling pass does not retry it; a newer alias move would


def test_only_edit_on_the_model_moves_its_aliases(postgres_registry: PostgresRegistry, adapter: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    client = client_at(postgres_registry.url)
    registry = RegistryFixture(tracking_uri=postgres_registry.url, model_name="shared-guarded",
                               experiment_id=client.create_experiment("guarded"))
    version = registry.register(adapter)
    admin = get_app_client("basic-auth", tracking_uri=postgres_registry.url)
    for user in ("reader", "editor"):
        admin.create_user(user, f"{user}-password-not-a-secret")
    admin.grant_user_permission("editor", "registered_model", registry.model_name, "EDIT")

    monkeypatch.setenv(USERNAME_ENV, "reader")
    monkeypatch.setenv(PASSWORD_ENV, "reader-password-not-a-secret")
    with pytest.raises(MlflowException, match="Permission denied"):
        move_alias(client_at(postgres_registry.url), registry.model_name, version, "champion")
    assert aliased_versions(client, registry.model_name, ["champion"]) == {}

    monkeypatch.setenv(USERNAME_ENV, "editor")
    monkeypatch.setenv(PASSWORD_ENV, "editor-password-not-a-secret")
    moved = move_alias(client_at(postgres_registry.url), registry.model_name, version, "champion")
    assert moved.version == version


@flow
def register_flow(url: str, root: str, adapter_dir: str, model: str) -> dict[str, str]:
    outputs = step_outputs(Path(root), Path(adapter_dir), "restart")
    return register(registry_job(url, model), TINY_CONFIG, *outputs).model_dump()


def test_register_retries_across_an_mlflow_crash(postgres_registry: PostgresRegistry, adapter: Path,
                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow is killed while the register task runs (after its run exists): the task fails, Prefect retries it,
    and once MLflow is back the adapter is registered exactly once, with all its files."""
    model = "shared-restart"
    run_key = sha_of("train-restart", "eval-restart")[:16]
    # One try per request: Prefect's task retries, not MLflow's request retries, must carry this.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    outcome: dict[str, object] = {}
    runner = threading.Thread(target=lambda: outcome.update(
        register_flow(postgres_registry.url, str(tmp_path), str(adapter), model)))
    runner.start()
    deadline = time.monotonic() + 120
    while not postgres_registry.sql("SELECT run_uuid FROM tags WHERE key = %s AND value = %s", RUN_KEY_TAG, run_key):
        assert time.monotonic() < deadline and runner.is_alive(), "the register task never created its run"
        time.sleep(0.05)
    postgres_registry.kill_mlflow()
    restart_s = postgres_registry.start_mlflow()
    runner.join(timeout=300)
    print(f"\n[timing] mlflow restart: {restart_s:.1f} s; outcome {outcome}")
    assert outcome.get("model_name") == model, "the register flow did not complete"

    client = client_at(postgres_registry.url)
    versions = client.search_model_versions(f"name='{model}'")
    assert [v.version for v in versions] == [outcome["version"]]
    assert versions[0].tags[RUN_KEY_TAG] == run_key
    assert {f.path for f in client.list_artifacts(versions[0].run_id, "adapter")} >= {
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
    assert client.get_run(versions[0].run_id).info.status == "FINISHED"
    # The crashed attempt's run stays (no version points at it); the retry made the one that holds the version.
    runs = postgres_registry.sql("SELECT run_uuid FROM tags WHERE key = %s AND value = %s", RUN_KEY_TAG, run_key)
    assert len(runs) == 2 and versions[0].run_id in {row[0] for row in runs}
    # The same register again (a retried flow run): the version is found, nothing new is registered.
    again = register_flow(postgres_registry.url, str(tmp_path), str(adapter), model)
    assert again["version"] == outcome["version"] and not again["created"]
    assert len(client.search_model_versions(f"name='{model}'")) == 1


def test_a_version_made_twice_by_a_resent_create_is_deleted(postgres_registry: PostgresRegistry, adapter: Path,
                                                            tmp_path: Path) -> None:
    """MLflow's client resends a POST whose answer was lost; the register step keeps the first version."""
    model = "shared-duplicate"
    registered = register_adapter(registry_job(postgres_registry.url, model), TINY_CONFIG,
                                  *step_outputs(tmp_path, adapter, "duplicate"))
    client = client_at(postgres_registry.url)
    original = client.get_model_version(model, registered.version)
    resent = client.create_model_version(model, source=original.source, run_id=original.run_id, tags=original.tags)
    kept = first_version(client, model, original.tags[RUN_KEY_TAG], resent)
    assert kept.version == registered.version
    assert [v.version for v in client.search_model_versions(f"name='{model}'")] == [registered.version]

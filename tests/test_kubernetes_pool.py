"""The Kubernetes work pool (deployments/kubernetes/, docs/kubernetes.md) against a real Prefect server. There is no
cluster here, so: the server validates the pool's template (`prefect work-pool create --type kubernetes`), the
qwen-ko variant deploys to it (`prefect deploy`), and prefect-kubernetes' own code renders the Job manifest a
Kubernetes worker would submit for a real flow run of that deployment."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.responses import DeploymentResponse
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration

from loraflow.localstack.stack import REPO_ROOT
from tests.fixtures import RunningStack

pytestmark = pytest.mark.slow

POOL = "loraflow-k8s"
TEMPLATE_FILE = REPO_ROOT / "deployments" / "kubernetes" / "base-job-template.json"
K8S_PREFECT_FILE = REPO_ROOT / "deployments" / "kubernetes" / "prefect.yaml"
IMAGE = "registry.example.com/ml/loraflow:0.1.0"  # what a user exports as LORAFLOW_IMAGE before deploying
SECRET_KEYS = {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "HF_TOKEN", "LORAFLOW_VLLM_API_KEY"}


def template() -> dict[str, Any]:
    return json.loads(TEMPLATE_FILE.read_text())


def container_of(job_manifest: dict[str, Any]) -> dict[str, Any]:
    return job_manifest["spec"]["template"]["spec"]["containers"][0]


@pytest.fixture(scope="module")
def k8s_pool(prefect_server: RunningStack) -> dict[str, Any]:
    """The pool as the server stored it, created with the CLI exactly as docs/kubernetes.md says."""
    created = prefect_server.prefect("work-pool", "create", POOL, "--type", "kubernetes",
                                     "--base-job-template", str(TEMPLATE_FILE))
    assert f"Created work pool {POOL!r}" in created.stdout, created.stdout
    with prefect_server.client() as client:
        pool = client.read_work_pool(POOL)
    assert pool.type == "kubernetes"
    return pool.base_job_template


def deploy_qwen_ko(server: RunningStack, image: str | None) -> subprocess.CompletedProcess[str]:
    """`prefect deploy` of the variant from the repo root, with LORAFLOW_IMAGE set to `image` (None: unset)."""
    env = {name: value for name, value in server.env.items() if name != "LORAFLOW_IMAGE"}
    return server.cli("prefect", "--no-prompt", "deploy", "--prefect-file",
                      str(K8S_PREFECT_FILE.relative_to(REPO_ROOT)), "--name", "qwen-ko", check=image is not None,
                      env=env | ({"LORAFLOW_IMAGE": image} if image else {}))


@pytest.fixture(scope="module")
def qwen_ko(prefect_server: RunningStack, k8s_pool: dict[str, Any]) -> DeploymentResponse:
    deploy_qwen_ko(prefect_server, IMAGE)
    with prefect_server.client() as client:
        return client.read_deployment_by_name("finetune/qwen-ko")


def test_template_extends_prefect_kubernetes_default() -> None:
    """Every variable and setting of the installed worker's own template is still there (an upgrade of
    prefect-kubernetes that adds one shows up here), and no secret value is written into the file."""
    default, ours = KubernetesWorker.get_default_base_job_template(), template()
    assert set(default["variables"]["properties"]) <= set(ours["variables"]["properties"])
    assert set(default["job_configuration"]) == set(ours["job_configuration"])
    env = container_of(ours["job_configuration"]["job_manifest"])["env"]
    from_secret = {entry["name"]: entry["valueFrom"]["secretKeyRef"] for entry in env if "valueFrom" in entry}
    assert set(from_secret) == SECRET_KEYS
    assert all(ref == {"name": "{{ secret_name }}", "key": name, "optional": True} for name, ref in from_secret.items())
    assert {entry["name"] for entry in env if "value" in entry} == {"MLFLOW_TRACKING_URI", "LORAFLOW_HOME"}


def test_server_accepts_the_template(k8s_pool: dict[str, Any]) -> None:
    assert k8s_pool == template()
    container = container_of(k8s_pool["job_configuration"]["job_manifest"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert {"name": "MLFLOW_TRACKING_URI", "value": "{{ mlflow_tracking_uri }}"} in container["env"]
    assert k8s_pool["variables"]["properties"]["gpu_count"]["default"] == 1


def test_server_rejects_an_undeclared_variable(prefect_server: RunningStack, tmp_path: Path) -> None:
    """The check above can fail: a template that uses a variable it does not declare is refused, by name."""
    bad = template()
    container_of(bad["job_configuration"]["job_manifest"])["resources"]["limits"]["nvidia.com/gpu"] = "{{ gpus }}"
    bad_file = tmp_path / "bad-template.json"
    bad_file.write_text(json.dumps(bad))
    result = prefect_server.prefect("work-pool", "create", "loraflow-k8s-bad", "--type", "kubernetes",
                                    "--base-job-template", str(bad_file), check=False)
    assert result.returncode != 0
    assert "undeclared variable(s): gpus" in result.stdout + result.stderr, result.stdout + result.stderr


def test_deploy_without_an_image_is_refused(prefect_server: RunningStack, k8s_pool: dict[str, Any]) -> None:
    """LORAFLOW_IMAGE unset: the server refuses the empty image at deploy time, naming the field."""
    with prefect_server.client() as client:
        before = len(client.read_deployments())
    result = deploy_qwen_ko(prefect_server, None)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Validation failed for field 'image'" in output, output
    with prefect_server.client() as client:
        assert len(client.read_deployments()) == before


def test_qwen_ko_deploys_to_the_pool(qwen_ko: DeploymentResponse) -> None:
    assert qwen_ko.work_pool_name == POOL
    assert qwen_ko.job_variables == {"gpu_count": 1, "cpu_request": "8", "memory_request": "64Gi", "image": IMAGE}
    assert qwen_ko.entrypoint == "flows/finetune.py:finetune"
    assert qwen_ko.parameters == {"config": "configs/qwen-ko.yaml", "overrides": {"serving.enabled": False}}
    assert qwen_ko.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "/opt/loraflow"}}]
    [weekly] = qwen_ko.schedules
    assert (weekly.schedule.cron, weekly.schedule.timezone, weekly.active) == ("0 3 * * 0", "Asia/Seoul", True)


async def job_configuration_for_run(api_url: str, deployment: DeploymentResponse,
                                    run_job_variables: dict[str, Any]) -> tuple[str, KubernetesWorkerJobConfiguration]:
    """What a Kubernetes worker of the pool builds for a new run of `deployment`: its own resolution, from the
    pool's template, the deployment's and the run's job variables."""
    with temporary_settings({PREFECT_API_URL: api_url}):
        async with get_client() as client:
            run = await client.create_flow_run_from_deployment(deployment.id, job_variables=run_job_variables)
            pool = await client.read_work_pool(POOL)
            configuration = await KubernetesWorkerJobConfiguration.resolve_for_flow_run(
                run, client=client, work_pool=pool, worker_name="test-worker", deployment=deployment)
    return str(run.id), configuration


def test_template_renders_a_gpu_job(prefect_server: RunningStack, qwen_ko: DeploymentResponse) -> None:
    run_id, configuration = asyncio.run(
        job_configuration_for_run(prefect_server.stack.prefect_api_url, qwen_ko, {"gpu_count": 2}))
    job = configuration.job_manifest
    pod = job["spec"]["template"]["spec"]
    container = container_of(job)
    variables = template()["variables"]["properties"]

    assert (job["kind"], job["metadata"]["namespace"]) == ("Job", "loraflow")
    assert container["image"] == IMAGE
    assert container["args"] == ["prefect", "flow-run", "execute"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2  # the run's override of the deployment's 1
    assert container["resources"]["requests"] == {"cpu": "8", "memory": "64Gi"}

    env = {entry["name"]: entry for entry in container["env"]}
    assert env["PREFECT__FLOW_RUN_ID"]["value"] == run_id
    assert env["MLFLOW_TRACKING_URI"]["value"] == variables["mlflow_tracking_uri"]["default"]
    assert env["LORAFLOW_HOME"]["value"] == "/var/lib/loraflow"
    for key in SECRET_KEYS:
        assert env[key] == {"name": key, "valueFrom": {"secretKeyRef": {"name": "loraflow", "key": key,
                                                                        "optional": True}}}

    assert {"name": "loraflow-home", "mountPath": "/var/lib/loraflow"} in container["volumeMounts"]
    assert {"name": "loraflow-home", "persistentVolumeClaim": {"claimName": "loraflow-home"}} in pod["volumes"]
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 0

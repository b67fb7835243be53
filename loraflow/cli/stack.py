"""`loraflow up | deploy | down | status | demo`: the local stack (Prefect server + worker + MLflow server + the
serving reconciler) and the deployments made from the job configs."""

from __future__ import annotations

import os

from loraflow.cli.common import AddCommand, config_arg, local_stack
from loraflow.cli.serving import ask


def up(registry: str | None, auth: str | None) -> int:
    from loraflow.localstack.lifecycle import describe
    from loraflow.localstack.lifecycle import up as start
    from loraflow.localstack.postgres import REGISTRY_ENV
    from loraflow.localstack.stack import AUTH_ENV

    # Remembered by `up` for this LORAFLOW_HOME: later commands need not repeat them (docs/registry.md).
    os.environ.update({name: value for name, value in ((REGISTRY_ENV, registry), (AUTH_ENV, auth)) if value})
    stack = local_stack()
    for name, seconds in start(stack).items():
        print(f"{name}: ready in {seconds:.1f} s")
    print(describe(stack))
    print("\nIn any shell: prefect deployment run finetune/tiny-ko --watch   (profile 'loraflow' is active)")
    return 0


def deploy(configs: list[str]) -> int:
    """Refresh the deployments from the job configs (a file added to configs/, one named here, one removed)."""
    from loraflow.localstack.lifecycle import deploy as deploy_jobs

    print("\n".join(deploy_jobs(local_stack(), configs)))
    return 0


def down() -> int:
    from loraflow.localstack import profile
    from loraflow.localstack.lifecycle import down as stop

    stack = local_stack()
    stopped = stop(stack)
    print(f"stopped {len(stopped)} process(es)" + (f": {stopped}" if stopped else ""))
    print(profile.deactivate(stack))
    return 0


def status() -> int:
    from loraflow.localstack.lifecycle import describe

    print(describe(local_stack()))
    return 0


def demo(config: str) -> int:
    from loraflow.localstack.demo import demo as user_path

    code = user_path(local_stack())
    return code or ask(config, None, 64)


def register(command: AddCommand) -> None:
    sub = command("up", up, "start the local stack (Prefect server, worker, MLflow server) and deploy")
    sub.add_argument("--registry", choices=["sqlite", "postgres"], default=None,
                     help="the MLflow server's store (default: what this LORAFLOW_HOME used before, else sqlite)")
    sub.add_argument("--auth", choices=["none", "basic"], default=None,
                     help="basic: MLflow's basic-auth app; aliases move only with EDIT on the model")
    sub = command("deploy", deploy, "make every job's deployments from its config (configs/*.yaml and the files "
                  "named here); retire those of removed files")
    sub.add_argument("configs", nargs="*", metavar="CONFIG", help="job YAMLs outside configs/ to deploy too "
                     "(remembered by later deploys until the file is gone)")
    command("down", down, "stop everything the local stack and its flows started")
    command("status", status, "what runs, where, and for which LORAFLOW_HOME")
    config_arg(command("demo", demo, "up, run finetune/tiny-ko through Prefect, then ask the champion"))

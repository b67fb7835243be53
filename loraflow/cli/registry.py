"""`loraflow promote | rollback | versions`: a person's decisions on the registry's aliases."""

from __future__ import annotations

from loraflow import paths
from loraflow.cli.common import AddCommand


def promote(model: str, version: str, alias: str, tracking_uri: str | None) -> int:
    """A person's decision: point `alias` (default champion) at a version, whatever the policy said. The registry:
    `--tracking-uri`, else MLFLOW_TRACKING_URI (the running stack's MLflow server: `main`), else the embedded one."""
    from loraflow.registry.client import client_at
    from loraflow.registry.rollback import move_alias

    moved = move_alias(client_at(tracking_uri or paths.default_tracking_uri()), model, version, alias)
    print(f"{moved.model_name}: {moved.alias} v{moved.previous or '-'} -> v{moved.version}")
    return 0


def rollback(model: str, version: str, tracking_uri: str | None) -> int:
    return promote(model, version, "champion", tracking_uri)


def versions(model: str, tracking_uri: str | None) -> int:
    from loraflow.registry.client import client_at
    from loraflow.registry.rollback import describe_versions

    print("\n".join(describe_versions(client_at(tracking_uri or paths.default_tracking_uri()), model)))
    return 0


def register(command: AddCommand) -> None:
    for name, handler, text in (("promote", promote, "point an alias (default champion) at a version"),
                                ("rollback", rollback, "move champion back to a version")):
        sub = command(name, handler, text, registry=True)
        sub.add_argument("model")
        sub.add_argument("version")
        if name == "promote":
            sub.add_argument("--alias", default="champion", choices=["champion", "challenger"])
        sub.add_argument("--tracking-uri", default=None)
    sub = command("versions", versions, "list a model's versions with aliases and promotion decisions",
                  registry=True)
    sub.add_argument("model")
    sub.add_argument("--tracking-uri", default=None)

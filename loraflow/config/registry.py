"""Where runs, metrics and adapter versions are recorded (MLflow tracking + Model Registry)."""

from __future__ import annotations

from loraflow.config.base import Section


class RegistryConfig(Section):
    """`tracking_uri` None means MLFLOW_TRACKING_URI, else the embedded SQLite store under LORAFLOW_HOME."""

    model_name: str
    experiment: str | None = None
    tracking_uri: str | None = None

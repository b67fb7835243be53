"""Where runs, metrics and adapter versions are recorded (MLflow tracking + Model Registry)."""

from __future__ import annotations

from pydantic import Field

from loraflow.config.base import Section


class RegistryConfig(Section):
    """`tracking_uri` None means MLFLOW_TRACKING_URI, else the embedded SQLite store under LORAFLOW_HOME."""

    model_name: str = Field(description="The registered model's name in the MLflow Model Registry (and the "
                            "served stable name).")
    experiment: str | None = Field(default=None, description="The MLflow experiment of the runs (None: the job's "
                                   "name).")
    tracking_uri: str | None = Field(default=None, description="The MLflow tracking URI (None: MLFLOW_TRACKING_URI, "
                                     "else the embedded SQLite store under LORAFLOW_HOME).")

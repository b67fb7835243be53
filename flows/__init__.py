"""Prefect flows. Importing this package first points Prefect, Hugging Face and MLflow state at LORAFLOW_HOME."""

from loraflow.env import configure_environment

configure_environment()

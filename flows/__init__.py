"""Prefect flows, one per module; each configures its process first (loraflow.env), as a deployment's flow run
loads the module by path."""

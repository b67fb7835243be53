"""Prefect flows, one per module. Each configures its process first (loraflow.env): a deployment's flow run loads
the module by path, so this package's __init__ never runs there, and without it our steps' INFO lines (training
progress) would not reach the run's logs."""

"""The local stack: Prefect server, worker and MLflow server on 127.0.0.1 (the only Prefect user in loraflow/)."""

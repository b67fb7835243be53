"""Stage 4: the MLflow Model Registry (register, promote, rollback) and the one place a client is built."""

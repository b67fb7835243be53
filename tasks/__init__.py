"""Prefect tasks: thin wrappers that give each plain loraflow function retries, caching and a place in the UI.

Each task computes its cache key from `loraflow.keys` and imports its implementation only when it has to run:
a fully cached flow run never loads torch, transformers or lm-eval.
"""

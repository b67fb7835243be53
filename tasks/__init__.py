"""Prefect tasks: thin wrappers that give each plain loraflow function retries, caching and a place in the UI."""

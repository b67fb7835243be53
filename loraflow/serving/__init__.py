"""Serving adapters on vLLM: processes, the router that makes the stable name follow `champion`, and the
reconciler that makes what is served match the registry's aliases (docs/serving.md)."""

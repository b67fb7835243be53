"""Process defaults that keep every piece of state under LORAFLOW_HOME. Must run before `prefect` is imported."""

from __future__ import annotations

import logging
import os

from loraflow import paths
from loraflow.logs import quiet_dependencies


def configure_environment() -> None:
    home = paths.home()
    os.environ.setdefault("LORAFLOW_HOME", str(home))
    prefect_home = os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    # Prefect 3.7 derives these from ~/.prefect, not from PREFECT_HOME: name them explicitly.
    os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", os.path.join(prefect_home, "storage"))
    os.environ.setdefault("PREFECT_SERVER_MEMO_STORE_PATH", os.path.join(prefect_home, "memo_store.toml"))
    os.environ.setdefault("HF_HOME", str(home / "cache" / "huggingface"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Prefect shows our plain functions' progress (logging) in the flow run logs; it gives the logger its handlers,
    # not a level, and the root's (WARNING) would drop each step's summary line.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "loraflow")
    logging.getLogger("loraflow").setLevel(logging.INFO)
    # ...and outside a flow run (a base built by `loraflow plan`) they are plain log lines, not a warning each.
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    # Prefect's temporary server (no PREFECT_API_URL) gets 20 s to start by default: too short on a busy 2-core box.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    # No phoning home: these machines (and many clusters) have no internet.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    quiet_dependencies()  # before the libraries are imported: some read their settings once, at import

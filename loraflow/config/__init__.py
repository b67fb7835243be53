"""Config contract: pydantic models split by concern, loaded from one YAML per job."""

from loraflow.config.job import JobConfig
from loraflow.config.loader import ConfigError, load_config

__all__ = ["ConfigError", "JobConfig", "load_config"]

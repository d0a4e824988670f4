"""Job configuration: schema dataclasses (job_config) and the TOML + CLI loader (manager)."""

from hydra_titan.config.job_config import ConfigError, JobConfig, validate_config
from hydra_titan.config.manager import config_to_dict, load_config, parse_or_exit, save_config

__all__ = [
    "ConfigError",
    "JobConfig",
    "config_to_dict",
    "load_config",
    "parse_or_exit",
    "save_config",
    "validate_config",
]

"""The ``[registry]`` configuration section lives in agent/config.py (one config model);
re-exported here for the registry client's callers."""

from agent.config import RegistryConfig

__all__ = ["RegistryConfig"]

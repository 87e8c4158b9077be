"""Proposed ``[registry]`` configuration section (the lead merges it into agent/config.py as
``Config.registry``). Pure: validating it never touches the network or reads a key file.

Example::

    [registry]
    url = "https://models.example.org/registry"
    public_keys = ["/etc/edge-agent/registry.pub"]   # several during a key rotation
    models = ["ct-abdomen-seg", "mr-brain-cls"]
    poll_interval_s = 3600
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator


class RegistryConfig(BaseModel):
    """Where models come from and which keys may sign them."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field("", description="Registry root: http(s):// or file://; empty: no pulling (models.dir only).")
    public_keys: list[Path] = Field(
        default_factory=list,
        description="PEM Ed25519 public keys trusted to sign manifests (edge-deploy keygen); several during rotation.",
    )
    models: list[str] = Field(default_factory=list, description="Model names to pull and keep up to date.")
    poll_interval_s: float = Field(3600, ge=0, description="Check the registry this often (0: only on command).")
    timeout_s: float = Field(30, gt=0, description="Network timeout per request.")
    retries: int = Field(3, ge=1, description="Attempts per file download; each resumes the last.")
    min_free_mb: int = Field(200, ge=0, description="Disk space that must remain free after an install.")
    cafile: Path | None = Field(None, description="CA bundle for an https registry with a private CA.")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if v and not v.startswith(("http://", "https://", "file://")):
            raise ValueError("expected an http://, https:// or file:// URL")
        return v

    @field_validator("public_keys", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        # `public_keys = "/etc/edge-agent/registry.pub"` is the common single-key case
        return [v] if isinstance(v, (str, Path)) else v

    def enabled(self) -> bool:
        """Pulling is configured (a URL and at least one key)."""
        return bool(self.url and self.public_keys)

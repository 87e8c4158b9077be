"""Configuration: one pydantic model, a TOML file, and ``EDGE_AGENT_...`` environment overrides.

Defaults work from a checkout with no file at all (spool under ``./var``, models from ``./models``,
broker on loopback). Environment variables override the file: ``EDGE_AGENT_DEVICE_ID=x``,
``EDGE_AGENT_MQTT__PORT=1884`` (nested keys joined with ``__``; values parsed as TOML scalars or
arrays where they parse, strings otherwise). Validating never touches the network or a model.

Kept whole: the one configuration model, every section and its documentation in one place.
"""

from __future__ import annotations

import os
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from agent.core.errors import ConfigError
from agent.core.export_config import ExportDestination, check_unique_names

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENV_PREFIX = "EDGE_AGENT_"
#: variables with the prefix that are not configuration (test-only fault injection: agent/inference/faults.py)
NOT_CONFIG_ENV = frozenset({"EDGE_AGENT_FAULT", "EDGE_AGENT_FAULT_FILE"})
#: pipeline.worker_memory_mb's default (see its description and docs/security.md)
WORKER_MEMORY_MB_DEFAULT = 8192


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TlsConfig(_Section):
    enabled: bool = Field(False, description="Use TLS.")
    certfile: Path | None = Field(None, description="Our certificate (PEM).")
    keyfile: Path | None = Field(None, description="Our private key (PEM).")
    cafile: Path | None = Field(None, description="CA bundle to verify the peer (PEM).")
    require_client_cert: bool = Field(
        False, description="DICOM server side: demand and verify a client certificate from cafile."
    )


class DicomLimitsConfig(_Section):
    """What a DICOM peer can make the listener spend before and after it is let in (docs/security.md)."""

    association_request_timeout_s: float = Field(
        10, gt=0, description="A connection must deliver its complete A-ASSOCIATE-RQ within this time, or it is closed.")
    max_pending_per_peer: int = Field(
        4, ge=1, description="Connections from one IP address that have not yet delivered their association request.")
    max_pending_total: int = Field(
        16, ge=1, description="Connections from all peers that have not yet delivered their association request.")
    max_request_kb: int = Field(
        64, ge=1, le=1024, description="Largest A-ASSOCIATE-RQ PDU accepted (KiB); larger is closed before it is read.")
    max_instance_mb: int = Field(
        2048, ge=1, description="Largest data set received (MiB); beyond it the transfer is aborted (0xC213).")
    max_decompressed_mb: int = Field(
        2048, ge=1,
        description="Largest inflated size of a Deflated data set and largest declared decoded pixel data "
        "(rows x columns x frames x bits x samples) of an instance (MiB); beyond: refused with 0xC212.")
    max_decompression_ratio: float = Field(
        100, gt=1,
        description="Largest decoded/encoded size ratio of a Deflated data set or of compressed pixel data, "
        "applied above 64 MiB decoded; beyond: refused with 0xC212.")


class DicomConfig(_Section):
    ae_title: str = Field("EDGE_AGENT", description="Our AE title; the called AE must match it.")
    port: int = Field(11112, ge=0, le=65535, description="TCP port of the DICOM listener (0: any free).")
    bind: str = Field("0.0.0.0", description="Address the listener binds to.")
    allowed_callers: list[str] = Field(
        default_factory=list,
        description='Accepted calling AE titles, "AET" or "AET@10.1.2.3"; empty: any (warned).',
    )
    max_associations: int = Field(10, ge=1, description="Concurrent associations accepted.")
    max_pdu: int = Field(
        1048576, ge=0, description="Maximum PDU size we receive, offered to peers (0: unlimited; memory per PDU).")
    acse_timeout_s: float = Field(30, gt=0, description="ACSE timeout (association negotiation).")
    dimse_timeout_s: float = Field(60, gt=0, description="DIMSE timeout (waiting for a message).")
    network_timeout_s: float = Field(60, gt=0, description="Idle network timeout.")
    tls: TlsConfig = Field(default_factory=TlsConfig, description="Optional DICOM TLS.")
    limits: DicomLimitsConfig = Field(default_factory=DicomLimitsConfig, description="Bounds on hostile peers.")

    @field_validator("ae_title")
    @classmethod
    def _aet(cls, v: str) -> str:
        if not v or len(v) > 16 or not v.isascii() or "\\" in v:
            raise ValueError("an AE title is 1-16 ASCII characters without backslash")
        return v

    @field_validator("allowed_callers")
    @classmethod
    def _callers(cls, v: list[str]) -> list[str]:
        for entry in v:
            aet = entry.split("@", 1)[0]
            if not aet or len(aet) > 16:
                raise ValueError(f"{entry!r}: expected 'AET' or 'AET@IP' with a 1-16 character AET")
        return v


class MqttConfig(_Section):
    host: str = Field("127.0.0.1", description="Broker host.")
    port: int = Field(1883, ge=0, le=65535, description="Broker port.")
    topic_prefix: str = Field("edge", description="Topics are {topic_prefix}/{device_id}/...")
    protocol: Literal["5", "3.1.1"] = Field("5", description="MQTT protocol version.")
    client_id: str = Field("", description="Client id; empty: edge-agent-{device_id}.")
    username: str | None = Field(None, description="Broker user name.")
    password: SecretStr | None = Field(
        None, description="Broker password (never printed: masked in `config check --show` and in errors).")
    tls: TlsConfig = Field(default_factory=TlsConfig, description="Optional MQTT TLS.")
    keepalive_s: int = Field(30, ge=5, description="MQTT keep-alive.")
    max_inflight: int = Field(20, ge=1, description="Unacknowledged QoS 1 messages in flight.")
    session_expiry_s: int = Field(86400, ge=0, description="MQTT 5 session expiry interval.")
    reconnect_max_s: float = Field(
        60, gt=0, description="Longest wait between reconnect attempts (exponential backoff from 1 s)."
    )


class StorageConfig(_Section):
    dir: Path = Field(Path("var"), description="State directory: spool, database, quarantine.")
    min_free_mb: int = Field(500, ge=0, description="Refuse instances (0xA700) below this free space.")
    retention_days: float = Field(7, gt=0, description="Keep spooled instances this long after publish.")
    unrouted_retention_h: float = Field(
        24, gt=0, description="Age out series no model wants after this many hours."
    )
    janitor_interval_s: float = Field(
        60, gt=0, description="How often spooled series past their retention are deleted."
    )


class PipelineConfig(_Section):
    stable_age_s: float = Field(10, ge=0, description="A series is complete after this quiet time.")
    job_timeout_s: float = Field(600, gt=0, description="Kill an inference job running longer.")
    max_attempts: int = Field(3, ge=1, description="Attempts per inference job before it fails.")
    worker_memory_mb: int = Field(
        WORKER_MEMORY_MB_DEFAULT, ge=0,
        description="Memory limit of the inference worker in MB (RLIMIT_AS, its address space; 0: none). The CT "
        "model on a 100 x 512 x 512 series peaked at 1.2 GB of address space (0.6 GB resident) with 2 threads and "
        "2.2 GB with 16 (each thread reserves about 70 MB): the default leaves 3.7x over 16 threads. A job that "
        "hits it is refused as too large (series.refused), not blamed on the model. Where a CUDA device is present "
        "(/dev/nvidiactl, Jetson's /dev/nvhost-ctrl) the driver reserves tens of GB of address space, so the limit "
        "applies to the worker's resident memory instead (watched every 0.2 s; docs/gpu.md).",
    )
    threads: int = Field(0, ge=0, description="Inference threads (0: all cores).")
    prefetch: bool = Field(
        True,
        description="Decode a series in the inference worker once it has been quiet for a quarter of "
        "stable_age_s, so its job starts with the volume in memory (unused when an instance arrives after).",
    )


class JobsConfig(_Section):
    """How the job queue stays fair: retries wait behind newer work, and each job's time budget
    follows its size (so a small series is never held up by more than one job's time)."""

    retry_backoff_s: float = Field(
        10, ge=0, description="A failed attempt is retried no sooner than this (doubling per attempt), and only "
        "after every job with fewer attempts.",
    )
    budget_base_s: float = Field(
        120, gt=0, description="Time budget of any job (model loading included), before its size is added.",
    )
    budget_s_per_instance: float = Field(3, ge=0, description="Budget added per instance of the series.")
    budget_s_per_mb: float = Field(
        10, ge=0, description="Budget added per MB of the series on disk; the larger of the two additions counts, "
        "and pipeline.job_timeout_s caps the total.",
    )


class SeriesLimitsConfig(_Section):
    """The largest series the agent analyses; a larger one is refused (series.refused), never retried."""

    max_instances: int = Field(3000, ge=1, description="Instances per series.")
    max_rows: int = Field(4096, ge=1, description="Rows of one frame.")
    max_columns: int = Field(4096, ge=1, description="Columns of one frame.")
    max_frames: int = Field(4000, ge=1, description="Frames per series (all instances, multi-frame counted per frame).")


class SupervisionConfig(_Section):
    """Every loop of the daemon runs supervised: a failure is logged, published (loop.stalled) and
    retried with exponential backoff; a loop failing for longer than give_up_after_s ends the process
    with a non-zero status, so the service manager restarts it."""

    db_busy_timeout_s: float = Field(
        30, gt=0, description="How long a database statement waits for another writer's lock before it fails.",
    )
    retry_initial_s: float = Field(0.5, gt=0, description="First wait after a loop failed; doubles per failure.")
    retry_max_s: float = Field(30, gt=0, description="Longest wait between two tries of a failing loop.")
    give_up_after_s: float = Field(
        600, gt=0, description="A loop failing without a success for this long exits the process (status 3).",
    )


class ModelsConfig(_Section):
    dir: Path = Field(Path("models"), description="Folder of model folders (each with model.toml).")
    enabled: list[str] = Field(default_factory=list, description="Model names to load; empty: all.")


class PrivacyConfig(_Section):
    include_patient_identifiers: bool = Field(
        False, description="Put patient name, ID and birth date into result messages."
    )


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    format: Literal["kv", "json"] = Field("kv", description="One event per line: key=value or JSON.")


class RegistryConfig(_Section):
    """Where models come from and which keys may sign them."""


    url: str = Field("", description="Registry root: http(s):// or file://; empty: no pulling (models.dir only).")
    public_key: list[Path] = Field(
        default_factory=list,
        description="PEM Ed25519 public keys trusted to sign manifests (edge-deploy keygen); several during rotation.",
    )
    models: list[str] = Field(default_factory=list, description="Model names to pull and keep up to date.")
    poll_interval_s: float = Field(3600, ge=0, description="Check the registry this often (0: only on command).")
    timeout_s: float = Field(30, gt=0, description="Network timeout per request.")
    download_deadline_s: float = Field(
        1800, gt=0,
        description="Overall limit for downloading one version's files (all attempts together); a stalled "
        "transfer is abandoned then and the next pull resumes it.",
    )
    retries: int = Field(3, ge=1, description="Attempts per file download; each resumes the last.")
    min_free_mb: int = Field(200, ge=0, description="Disk space that must remain free after an install.")
    cafile: Path | None = Field(None, description="CA bundle for an https registry with a private CA.")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if v and not v.startswith(("http://", "https://", "file://")):
            raise ValueError("expected an http://, https:// or file:// URL")
        return v

    @field_validator("public_key", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        # `public_key = "/etc/edge-agent/registry.pub"` is the common single-key case
        return [v] if isinstance(v, (str, Path)) else v

    def enabled(self) -> bool:
        """Pulling is configured (a URL and at least one key)."""
        return bool(self.url and self.public_key)


class EnginesConfig(_Section):
    """How the agent chooses, guards and falls back between the variants of an installed model."""

    bench_runs: int = Field(
        10, ge=1, description="Timed runs of the self-test input per variant (the fastest counts)."
    )
    trial_rounds: int = Field(
        3, ge=1,
        description="Passes over all variants, round robin; each variant's fastest pass counts, so a burst of "
        "load on a shared CPU slows every variant alike instead of one.",
    )
    trial_timeout_s: float = Field(300, gt=0, description="Limit for loading + self-testing + timing one variant.")
    gate_timeout_s: float = Field(
        900, gt=0,
        description="Limit for one run of the device accuracy gate: one variant (or FP32) over the manifest's "
        "validation set, for variants not proven on this CPU's instruction-set family.",
    )
    prefer_margin: float = Field(
        0.05, ge=0, lt=1,
        description="A variant later in the manifest's priority order is chosen only when it is faster by "
        "more than this fraction (measurement noise must not flip the choice).",
    )
    max_consecutive_failures: int = Field(
        3, ge=1, description="Demote the active variant to FP32 after this many consecutive failed jobs."
    )
    shadow_every: int = Field(20, ge=0, description="Also run FP32 on every Nth job to compare (0: never).")
    shadow_window: int = Field(20, ge=1, description="Shadow comparisons kept for the agreement rate.")
    shadow_min_samples: int = Field(5, ge=1, description="Comparisons needed before agreement can demote.")
    shadow_min_agreement: float = Field(
        0.95, ge=0, le=1, description="Demote the variant to FP32 when the agreement rate falls below this."
    )
    shadow_min_dice: float = Field(
        0.9, ge=0, le=1, description="Segmentation: mean foreground Dice vs FP32 that counts as agreement."
    )
    rollback_after_failures: int = Field(
        3, ge=1,
        description="Roll a newly activated version back when its first this-many jobs all fail.",
    )


class TelemetryConfig(_Section):
    """Device health and pipeline figures on ``{prefix}/{device_id}/telemetry`` (docs/mqtt.md)."""

    interval_s: float = Field(60, gt=0, description="Seconds between telemetry messages (and the window they cover).")
    max_queued: int = Field(
        120, ge=1,
        description="Telemetry messages kept in the outbox while the broker is away; beyond this the oldest "
        "telemetry is dropped (never a result or an event).",
    )


class MetricsConfig(_Section):
    """The telemetry snapshot as Prometheus text (docs/fleet.md)."""

    listen: str = Field(
        "", description="host:port to serve /metrics on, e.g. 127.0.0.1:9108 (empty: off). Loopback unless you "
        "mean to expose it.",
    )

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        if v:
            host, sep, port = v.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
                raise ValueError("listen must be host:port, e.g. 127.0.0.1:9108")
        return v


class DriftConfig(_Section):
    """Drift of live traffic against each model's reference profile (docs/drift.md)."""

    enabled: bool = Field(True, description="Compute drift for models that have a reference profile.")
    window: int = Field(50, ge=2, description="Series per model in the rolling window the signals are computed on.")
    min_series: int = Field(20, ge=1, description="No verdict (phase collecting) before this many series are in the window.")
    hysteresis_series: int = Field(
        5, ge=1, description="Consecutive series at a lower level before a model's state steps down (alert -> warn -> ok)."
    )
    thresholds: Literal["model", "signal"] = Field(
        "model",
        description="Calibrate warn/alert so that a model on unchanged data reaches warn in ~1% of windows "
        "(model: family-wise over all its signals) or so that each signal does (signal: then a model with ~15 "
        "signals sits at warn or worse ~20% of the time; see docs/drift.md).",
    )
    k_anonymity: int = Field(
        5, ge=1, description="Categories seen fewer times than this in the window are published as 'other'."
    )
    bootstrap_windows: int = Field(
        2000, ge=100, description="Windows resampled from the reference to calibrate each signal's thresholds."
    )
    min_publish_interval_s: float = Field(
        60, ge=0, description="At most one drift message per model this often (a state change is always sent)."
    )
    max_queued: int = Field(
        200, ge=1, description="Drift messages kept in the outbox while the broker is away (oldest dropped first)."
    )


class ControlConfig(_Section):
    """Who may command this device over MQTT (docs/mqtt.md "Commands", docs/security.md)."""

    operator_keys: list[Path] = Field(
        default_factory=list,
        description="PEM Ed25519 public keys (edge-deploy keygen --name operator) whose signed commands this "
        "device runs; several during rotation. Empty: every command is refused (unless allow_unsigned).",
    )
    allow_unsigned: bool = Field(
        False, description="Labs only: also run unsigned commands ({\"correlation_id\", \"model\"}). Never on a "
        "device that serves patients: anyone who can publish to the broker could then command it.",
    )
    max_age_s: float = Field(
        300, gt=0, description="A signed command older than this (by its issued_at) is refused as stale.")
    max_clock_skew_s: float = Field(
        30, ge=0, description="How far in the future a command's issued_at may be (the operator's clock ahead).")
    max_pending: int = Field(4, ge=1, description="Commands queued behind the running one; more are refused (busy).")
    max_pending_per_command: int = Field(
        1, ge=1, description="Queued commands of one name (e.g. selftest) behind the running one; more are busy.")
    rejections_per_minute: int = Field(
        20, ge=1,
        description="command.rejected events published per minute at most; beyond that they are counted and "
        "the next event says how many were suppressed (each is still logged).",
    )

    @field_validator("operator_keys", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return [v] if isinstance(v, (str, Path)) else v


class EventsConfig(_Section):
    """Refusal events (association.rejected, connection.refused, dicom.rejected, instance.quarantined)."""

    refusals_per_minute: int = Field(
        20, ge=1, description="Refusal events of one kind published per minute; the rest are counted into one "
        "events.suppressed event per minute (counts per kind and reason).")
    max_queued_refusals: int = Field(
        500, ge=1, description="Refusal events kept in the outbox while the broker is away (oldest dropped first; "
        "results and other events are never dropped).")


class QuarantineConfig(_Section):
    """Bounds of the quarantine folder (malformed instances kept for inspection)."""

    max_files: int = Field(1000, ge=1, description="Quarantined instances kept; the oldest are deleted beyond this.")
    max_mb: int = Field(1024, ge=1, description="Total size of quarantined instances kept (MiB), oldest deleted first.")
    max_age_days: float = Field(30, gt=0, description="Quarantined instances older than this are deleted.")


class ServiceConfig(_Section):
    """The daemon under a service manager: readiness, watchdog, graceful stop (docs/lifecycle.md)."""

    stop_timeout_s: float = Field(
        80, gt=0, description="The whole graceful stop (SIGTERM) ends within this; keep it below the unit's "
        "TimeoutStopSec (90 s in systemd/edge-agent.service). Whatever is unfinished then is kept for the restart.",
    )
    stop_associations_s: float = Field(
        20, ge=0, description="On SIGTERM new associations are rejected (A-ASSOCIATE-RJ, transient) and those open "
        "may finish for this long; then they are aborted (unacknowledged instances: the peer sends them again).",
    )
    stop_job_s: float = Field(
        30, ge=0, description="The running job may finish for this long on SIGTERM; then it is cancelled and "
        "returned to pending without counting as an attempt (it runs again after the restart).",
    )
    stop_flush_s: float = Field(
        10, ge=0, description="On SIGTERM the outbox is still sent for this long while the broker answers.",
    )
    status_interval_s: float = Field(5, gt=0, description="How often STATUS= (systemctl status) is refreshed.")
    watchdog_stall_s: float = Field(
        60, gt=0, description="With WatchdogSec= set, a loop (receiver, jobs, assembly, MQTT) that made no step for "
        "this long (a job within its time budget counts as one) withholds WATCHDOG=1, so systemd restarts the agent.",
    )


class Config(_Section):
    device_id: str = Field("edge-dev", description="Names this device in topics and results.")
    dicom: DicomConfig = Field(default_factory=DicomConfig)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    engines: EnginesConfig = Field(default_factory=EnginesConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    jobs: JobsConfig = Field(default_factory=JobsConfig)
    series_limits: SeriesLimitsConfig = Field(default_factory=SeriesLimitsConfig)
    supervision: SupervisionConfig = Field(default_factory=SupervisionConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)
    events: EventsConfig = Field(default_factory=EventsConfig)
    quarantine: QuarantineConfig = Field(default_factory=QuarantineConfig)
    export: list[ExportDestination] = Field(
        default_factory=list, description="DICOM SEG/SR back to a PACS (docs/export.md); none: off.")
    service: ServiceConfig = Field(default_factory=ServiceConfig)

    @field_validator("device_id")
    @classmethod
    def _device_id(cls, v: str) -> str:
        if not v or any(c in v for c in "/+#") or not v.isprintable():
            raise ValueError("device_id must be non-empty and free of '/', '+', '#'")
        return v

    _export_names = field_validator("export")(check_unique_names)

    @property
    def spool_dir(self) -> Path:
        return self.storage.dir / "spool"

    @property
    def quarantine_dir(self) -> Path:
        return self.storage.dir / "quarantine"

    @property
    def db_path(self) -> Path:
        return self.storage.dir / "state.db"


def _parse_env_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _field_at(path: Sequence[str | int]) -> Any:
    """The pydantic field at ``path`` (names) under Config, or None when there is none."""
    model: Any = Config
    found: Any = None
    for part in path:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        found = model.model_fields[part]
        model = found.annotation
    return found


def _is_text(annotation: Any) -> bool:
    """A str, SecretStr or Path field (possibly optional): its value is text, never a number."""
    args = typing.get_args(annotation)
    if args and typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return all(_is_text(a) or a is type(None) for a in args)
    if typing.get_origin(annotation) is Literal:
        return all(isinstance(a, str) for a in args)
    return annotation in (str, SecretStr, Path)


def _is_secret(path: Sequence[str | int]) -> bool:
    field = _field_at(path)
    ann = field.annotation if field is not None else None
    return ann is SecretStr or SecretStr in typing.get_args(ann)


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``EDGE_AGENT_A__B=v`` -> ``{"a": {"b": v}}``: a text field (str, password, path) takes the
    value exactly as written (``123456`` stays a string); other fields parse it as a TOML value."""
    out: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX) or key in NOT_CONFIG_ENV:
            continue
        path = [p.lower() for p in key[len(ENV_PREFIX):].split("__")]
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        field = _field_at(path)
        node[path[-1]] = raw if field is not None and _is_text(field.annotation) else _parse_env_value(raw)
    return out


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(merged.get(k), dict):
            merged[k] = _merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def load_config(path: Path | str | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Build the configuration from defaults, an optional TOML file and the environment.

    Raises ConfigError whose message names each offending key (``mqtt.port: ...``).
    """
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError as exc:
            raise ConfigError(f"{p}: config file not found") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: not valid TOML: {exc}") from exc
    data = _merge(data, _env_overrides(os.environ if environ is None else environ))
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source=str(path or "defaults"))) from exc


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check spelling; see docs/configuration.md)"
        got = _redacted(tuple(str(p) for p in err["loc"]), err.get("input"))
        lines.append(f"  {key}: {msg} (got {got})")
    return "\n".join(lines)


def _redacted(loc: tuple[str, ...], value: Any) -> str:
    """``repr`` of an offending input, with every secret (a SecretStr field, at ``loc`` or inside a
    section given whole) replaced: a password must never reach a terminal or a log."""
    if _is_secret(loc):
        return "<secret, not shown>"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k!r}: {_redacted((*loc, str(k)), v)}" for k, v in value.items()) + "}"
    return repr(value)


if __name__ == "__main__":  # pragma: no cover
    from agent.core.config_reference import render_reference

    print(render_reference())

"""Domain exceptions of edge-agent.

Every failure that crosses a stage boundary is one of these; third-party errors are translated
where they happen (``raise BackendError(...) from exc``) so the edges (CLI exit codes, DICOM
status codes, MQTT ``events``) can map them without knowing which library raised::

    EdgeAgentError
    ├── ConfigError            invalid configuration (names the offending key)
    ├── ModelSpecError         a model.toml that does not validate
    ├── DicomError             a DICOM object we cannot accept
    │   ├── MalformedDicomError    unreadable / missing required attributes  -> 0xC210
    │   ├── UnsupportedDicomError  SOP class or transfer syntax we cannot decode -> 0xC211
    │   └── LimitExceededError     decodes beyond dicom.limits (size, ratio)   -> 0xC212
    │       └── InstanceTooLargeError  data set beyond dicom.limits.max_instance_mb -> 0xC213
    ├── StorageError           spool / database problems
    │   └── OutOfSpaceError        free space below the floor               -> 0xA700
    ├── VolumeError            instances of a series that do not form one volume
    ├── PreprocessError        a volume the model's input spec cannot take
    ├── BackendError           an inference backend failed to load or run
    │   ├── BackendUnavailableError  its optional package is not installed
    │   └── InferenceTimeoutError    a job ran past its time limit
    ├── PublishError           MQTT publishing problems
    ├── RegistryError          model registry: signature, digest, download, install
    └── ActivationError        no variant of a model version passed its self-test on this device
"""

from __future__ import annotations


class EdgeAgentError(Exception):
    """Base class of every error edge-agent raises on purpose."""


class ConfigError(EdgeAgentError):
    """Configuration is invalid; the message names the key and why."""


class ModelSpecError(EdgeAgentError):
    """A model.toml does not validate."""


#: C-STORE statuses that mean the peer stored the object: Success and the storage warnings of
#: PS3.4 B.2.3 (0xB000 coercion, 0xB006 elements discarded, 0xB007 data set does not match the SOP
#: class). Any other status is a failure (both our SCUs: ``edge-agent send`` and the export).
STORED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


class DicomError(EdgeAgentError):
    """A DICOM object cannot be accepted."""

    #: DIMSE status code the C-STORE handler answers with.
    status: int = 0xC000


class MalformedDicomError(DicomError):
    status = 0xC210


class UnsupportedDicomError(DicomError):
    status = 0xC211


class LimitExceededError(DicomError):
    """Refused before decoding: a Deflated data set or compressed pixel data that would decode
    beyond ``dicom.limits`` (size or ratio): a decompression bomb, or more than this device takes."""

    status = 0xC212


class InstanceTooLargeError(LimitExceededError):
    status = 0xC213


class StorageError(EdgeAgentError):
    status: int = 0xA700 + 0x01  # 0xA701: generic refused, out of resources


class OutOfSpaceError(StorageError):
    status = 0xA700


class VolumeError(EdgeAgentError):
    """Instances of one series do not form a consistent volume."""


class PreprocessError(EdgeAgentError):
    """A volume cannot be turned into the model's input."""


class BackendError(EdgeAgentError):
    """An inference backend failed to load or run."""


class BackendUnavailableError(BackendError):
    """The backend's optional package is missing on this device."""


class InferenceTimeoutError(BackendError):
    """A job ran past its time limit and was killed."""


class PublishError(EdgeAgentError):
    """MQTT publishing failed."""


class RegistryError(EdgeAgentError):
    """Model registry: bad signature, digest mismatch, failed download or install."""


class ActivationError(EdgeAgentError):
    """A model version cannot be activated here: its FP32 fallback (or every variant) failed the
    self-test, or its files are missing. The running model is left as it was."""

"""MQTT topic names of one device.

Every topic lives under ``{topic_prefix}/{device_id}/``::

    {prefix}/{device_id}/results   result messages (QoS 1, not retained)
    {prefix}/{device_id}/events    operator events (QoS 1, not retained)
    {prefix}/{device_id}/status    birth / offline (QoS 1, retained; also the Last Will)
    {prefix}/{device_id}/telemetry device health and pipeline figures (QoS 1, not retained)
    {prefix}/{device_id}/drift     per-model drift against the reference (QoS 1, not retained)
    {prefix}/{device_id}/cmd/#     commands to the device (subscribed when a handler is given)
"""

from __future__ import annotations

from dataclasses import dataclass

_WILDCARDS = ("+", "#")


@dataclass(frozen=True)
class Topics:
    """Topic names for ``device_id`` under ``prefix``.

    ``device_id`` may be ``"+"`` to build subscription filters for every device (``results
    --follow``); publishing topics must name one device.
    """

    prefix: str
    device_id: str

    def __post_init__(self) -> None:
        # A wildcard or empty level in the prefix would make every topic a filter (or invalid);
        # catch it here with a clear message instead of at paho's publish().
        prefix_levels = self.prefix.split("/")
        if not self.prefix or any(not lvl or lvl in _WILDCARDS or "+" in lvl or "#" in lvl
                                  for lvl in prefix_levels):
            raise ValueError(f"topic prefix {self.prefix!r}: non-empty levels without '+' or '#'")
        if not self.device_id or "/" in self.device_id or "#" in self.device_id or (
            "+" in self.device_id and self.device_id != "+"
        ):
            raise ValueError(f"device id {self.device_id!r}: no '/', '#', '+' (except a lone '+')")

    @property
    def base(self) -> str:
        """``{prefix}/{device_id}``."""
        return f"{self.prefix}/{self.device_id}"

    @property
    def results(self) -> str:
        return f"{self.base}/results"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def events(self) -> str:
        return f"{self.base}/events"

    @property
    def telemetry(self) -> str:
        return f"{self.base}/telemetry"

    @property
    def drift(self) -> str:
        return f"{self.base}/drift"

    @property
    def cmd(self) -> str:
        """Subscription filter for commands addressed to this device."""
        return f"{self.base}/cmd/#"

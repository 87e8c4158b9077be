"""Which objects of which model's results go to which ``[[export]]`` destination."""

from __future__ import annotations

from collections.abc import Sequence

from agent.core.export_config import ExportDestination


class ExportPlan:
    """``[[export]]`` read for the job thread: ``targets(model, task)`` -> (destination, object)
    pairs for one result. A classification has no SEG; a destination's empty ``models`` means all."""

    def __init__(self, destinations: Sequence[ExportDestination]) -> None:
        self.destinations = {d.name: d for d in destinations}

    @property
    def enabled(self) -> bool:
        return bool(self.destinations)

    def targets(self, model: str, task: str) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for d in self.destinations.values():
            if d.models and model not in d.models:
                continue
            out += [(d.name, kind) for kind in d.objects if kind == "sr" or task == "segmentation"]
        return out

    def wants_label_map(self, model: str) -> bool:
        """Whether a segmentation of ``model`` is exported at all (its SR references its SEG, so
        either object needs the label map)."""
        return bool(self.targets(model, "segmentation"))

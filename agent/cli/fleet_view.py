"""The fleet as a terminal table (rich): ``render(view, now, max_rows)`` takes a
``agent.cli.fleet_state.FleetView`` and returns a rich renderable: a summary line, the group verdicts
that matter, then one row per device, problems first. ``max_rows`` caps the device rows (the rest is
counted on a last line) so hundreds of devices fit a screen; ``rows_that_fit(height, view)`` is the
cap for a terminal of that height. Imported only by the table mode: ``--json`` needs no rich.
"""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from agent.cli.fleet_state import DeviceRow, FleetView, format_age

#: local verdict lines shown before they are summed up in one line
MAX_LOCAL_VERDICTS = 3
#: lines around the device rows: summary, header, box rules, the "more" line, a blank
_CHROME_LINES = 7

_LEVEL_STYLE = {3: "bold red", 2: "yellow", 1: "cyan", 0: ""}
_DRIFT_STYLE = {"alert": "bold red", "warn": "yellow", "ok": "green"}
_SEVERITY_STYLE = {"error": "red", "warning": "yellow", "info": "dim"}


def _num(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value:.0f}{unit}" if abs(value) >= 10 or value == int(value) else f"{value:.1f}{unit}"


def _state(row: DeviceRow, now: float) -> Text:
    if row.state == "offline":
        text = Text("offline" if row.reason != "shutdown" else "stopped",
                    style="bold red" if row.reason != "shutdown" else "dim")
    elif row.state == "online":
        text = Text("online", style="green")
    else:
        text = Text("?", style="dim")
    if row.stale:
        age = "never" if row.telemetry_at is None else format_age(now - row.telemetry_at)
        text.append(f" STALE {age}", style="yellow")
    return text


def _models(row: DeviceRow) -> str:
    if not row.models:
        return "-"
    first = row.models[0]
    more = f" +{len(row.models) - 1}" if len(row.models) > 1 else ""
    return f"{first.name} {first.variant}{more}"


def _outbox(row: DeviceRow) -> str:
    if row.outbox_pending is None:
        return "-"
    age = f" ({format_age(row.outbox_oldest_age_s)})" if row.outbox_oldest_age_s else ""
    return f"{_num(row.outbox_pending)}{age}"


def _drift(row: DeviceRow) -> Text:
    if row.drift_state is None:
        return Text("-", style="dim")
    text = Text(row.drift_state, style=_DRIFT_STYLE.get(row.drift_state, "dim"))
    if row.drift_signals:
        more = f" +{len(row.drift_signals) - 1}" if len(row.drift_signals) > 1 else ""
        text.append(f" {row.drift_signals[0]}{more}")
        if row.drift_scope is not None:
            text.append(f" [{row.drift_scope}]", style="bold" if row.drift_scope != "local" else "dim")
    return text


def _event(row: DeviceRow, now: float) -> Text:
    if row.event_kind is None:
        return Text("-", style="dim")
    age = "" if row.event_at is None else f" {format_age(now - row.event_at)}"
    return Text(f"{row.event_kind}{age}", style=_SEVERITY_STYLE.get(row.event_severity or "", ""))


def _line(text: str, style: str = "") -> Text:
    """One screen line whatever the width (cut with an ellipsis), so the row budget holds."""
    return Text(text, style=style, no_wrap=True, overflow="ellipsis")


def summary_line(view: FleetView) -> Text:
    s = view.summary
    text = _line(f"{s.devices} devices: {s.online} online, ", style="bold")
    text.append(f"{s.offline} offline", style="red" if s.offline else "")
    text.append(f", {s.stale} stale", style="yellow" if s.stale else "")
    text.append(f"; drift {s.drift_alert} alert", style="red" if s.drift_alert else "")
    text.append(f", {s.drift_warn} warn", style="yellow" if s.drift_warn else "")
    text.append(f"; {s.problems} with problems")
    if s.unknown:
        text.append(f"; {s.unknown} without status")
    if s.malformed:
        text.append(f"; {s.malformed} malformed message(s) skipped", style="magenta")
    return text


def verdict_lines(view: FleetView) -> list[Text]:
    """Every group-wide verdict; device-local ones up to ``MAX_LOCAL_VERDICTS``, then a count."""
    lines = []
    local = [v for v in view.groups if not v.wide]
    for v in view.groups:
        if v.wide:
            lines.append(_line(v.line(), style="bold red" if v.alerts else "yellow"))
    for v in local[:MAX_LOCAL_VERDICTS]:
        lines.append(_line(v.line(), style="dim"))
    if len(local) > MAX_LOCAL_VERDICTS:
        lines.append(_line(f"... {len(local) - MAX_LOCAL_VERDICTS} more device-local drift line(s)", style="dim"))
    return lines


def rows_that_fit(height: int, view: FleetView) -> int:
    """Device rows a terminal of ``height`` lines can show beside the summary and verdicts."""
    return max(1, height - _CHROME_LINES - len(verdict_lines(view)))


def device_table(rows: tuple[DeviceRow, ...] | list[DeviceRow], now: float) -> Table:
    """One line per device, always (the row budget of ``rows_that_fit`` counts lines): the short
    columns keep their full width, model, drift and last event give way with an ellipsis."""
    cells = [(Text(r.device_id, style=_LEVEL_STYLE[min(r.level, 3)]), _state(r, now), Text(_models(r)),
              Text(_num(r.p95_ms, " ms")), Text(_num(r.queue_depth)), Text(_outbox(r)), _drift(r), _event(r, now))
             for r in rows]
    table = Table(expand=True, pad_edge=False, show_edge=False)
    names = ("device", "state", "model", "p95", "queue", "outbox", "drift", "last event")
    for i, name in enumerate(names):
        whole = name in ("device", "state", "p95", "queue", "outbox")
        width = max([len(name), *(c[i].cell_len for c in cells)]) if whole else None
        table.add_column(name, overflow="ellipsis", no_wrap=True, min_width=width,
                         justify="right" if name in ("p95", "queue", "outbox") else "left")
    for c in cells:
        table.add_row(*c)
    return table


def render(view: FleetView, now: float, max_rows: int | None = None) -> RenderableType:
    """Summary, verdicts, then the first ``max_rows`` device rows (all when None) and what was left out."""
    shown = view.rows if max_rows is None else view.rows[:max_rows]
    parts: list[RenderableType] = [summary_line(view), *verdict_lines(view), device_table(shown, now)]
    hidden = view.rows[len(shown):]
    if hidden:
        troubled = sum(r.level >= 2 for r in hidden)
        parts.append(_line(f"... {len(hidden)} more device(s) not shown ({troubled} with problems); "
                          "use a taller terminal or --json", style="dim"))
    return Group(*parts)

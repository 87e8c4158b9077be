"""Commands from the fleet (agent/control/commands.py): what a handler returns (``CommandResult``;
the outcomes of ``cmd/update`` and ``cmd/rollback``; ``cmd/selftest``'s are
``agent.core.status.SelfTestReport``) and the accepted/rejected/completed/failed events.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from agent.core.events.base import OMIT_NONE, DataclassInstance, TypedEvent

# --------------------------------------------------------------------------------------------
# command results (the ``result`` of command.completed / command.failed)

UpdateAction = Literal["installed", "up-to-date", "skipped", "failed"]


@dataclass(frozen=True)
class UpdateOutcome:
    """What one update of one model did (``cmd/update`` answers a list of these).

    ``version``: the version current afterwards (None: nothing installed); ``target``: the version
    the registry offered; ``stage`` names where a failure happened (``index``, ``downgrade``,
    ``manifest``, ``download``, ``activate``, ``switch``); ``variant``/``reason``: what activation
    chose and why.
    """

    model: str
    ok: bool
    action: UpdateAction
    version: str | None
    target: str | None = None
    previous: str | None = None
    variant: str | None = None
    reason: str = ""
    stage: str = ""
    error: str = ""
    downloaded_bytes: int = 0


@dataclass(frozen=True)
class RollbackOutcome:
    """A successful rollback (``cmd/rollback``): ``version`` is current now, ``from_version`` was."""

    model: str
    version: str
    from_version: str | None
    variant: str | None
    ok: bool = True


#: one item of a handler's result: a dataclass (an outcome above, or any other) or a mapping.
#: An item whose ``ok`` or ``passed`` is false makes the command fail (``command.failed``).
ResultItem: TypeAlias = "DataclassInstance | Mapping[str, object]"
#: what a command handler returns: one item, a sequence of them, or None (nothing to report)
CommandResult: TypeAlias = "ResultItem | Sequence[ResultItem] | None"


# --------------------------------------------------------------------------------------------
# commands (agent/control/commands.py)


@dataclass(frozen=True, kw_only=True)
class CommandAccepted(TypedEvent):
    """A command was queued (commands run one at a time, in arrival order)."""

    KIND = "command.accepted"
    SEVERITY = "info"

    command: str
    correlation_id: str
    model: str | None

    def message(self) -> str:
        return f"{self.command} accepted"


@dataclass(frozen=True, kw_only=True)
class CommandRejected(TypedEvent):
    """A command that is not run. ``code`` says why (agent/control/message.py: unsigned,
    bad_signature, unknown_key, stale, replay, not_for_device, model_not_followed, duplicate, busy,
    malformed, unknown_command, not_configured); ``correlation_id`` is null when the payload had no
    usable one; ``suppressed``: rejections not published since the last one (rate limit)."""

    KIND = "command.rejected"
    SEVERITY = "warning"

    command: str
    topic: str
    correlation_id: str | None
    code: str
    reason: str
    suppressed: int = 0

    def message(self) -> str:
        return f"command rejected: {self.reason}"


@dataclass(frozen=True, kw_only=True)
class CommandCompleted(TypedEvent):
    """A command's handler finished and every item of its result succeeded."""

    KIND = "command.completed"
    SEVERITY = "info"

    command: str
    correlation_id: str
    model: str | None
    duration_s: float
    result: CommandResult = field(default=None, metadata=OMIT_NONE)

    def message(self) -> str:
        return f"{self.command} completed"


@dataclass(frozen=True, kw_only=True)
class CommandFailed(TypedEvent):
    """A command's handler raised, an item of its result failed, or it was not run (shutdown)."""

    KIND = "command.failed"
    SEVERITY = "error"

    command: str
    correlation_id: str
    model: str | None
    duration_s: float
    result: CommandResult = field(default=None, metadata=OMIT_NONE)
    error: str

    def message(self) -> str:
        return f"{self.command} failed: {self.error}"

"""The running agent: wiring only. Builds the stages, runs the loops that connect them, starts
them in order and stops them in reverse.

``service``        Service: construct, start, stop, the birth message, the command handlers
``stages``         Stages: the stage objects one agent is made of, built from the configuration
``event_sink``     EventSink: events from any thread, written to the outbox by one thread
``assembly_loop``  instances -> series -> jobs; events -> outbox; prefetch offers; the janitor's tick
``job_loop``       jobs -> the active variant in the inference worker -> result in the outbox
``janitor``        spool retention: unrouted and finished series age out

No SQL here: every query belongs to the stage that owns the table.
"""

from __future__ import annotations

from agent.service.service import Service, sop_classes_for
from agent.service.stages import Stages, build_stages

__all__ = ["Service", "Stages", "build_stages", "sop_classes_for"]

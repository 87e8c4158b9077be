"""Series assembly: quiescence timer, routing to models, and the job table."""

from agent.assembly.assembler import SeriesAssembler, SeriesState
from agent.assembly.jobs import Job, JobStore

__all__ = ["Job", "JobStore", "SeriesAssembler", "SeriesState"]

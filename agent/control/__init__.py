"""Inbound commands from the fleet (``{prefix}/{device_id}/cmd/#``): parse, authorise, dispatch,
report; the handlers themselves (update, rollback, self-test) are wired in by the service."""

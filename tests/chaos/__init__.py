"""Fault injection: real pgsched processes, real faults, and an offline checker of what happened (issue 19)."""

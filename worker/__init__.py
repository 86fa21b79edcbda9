"""The worker runtime (``pgsched worker``): claim loop, heartbeats, execution, shutdown.

Importable as ``pgsched.worker``. It depends on the ``pgsched`` core, never the
other way round (an import-linter contract in pyproject.toml keeps it so).
"""

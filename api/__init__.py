"""The Litestar REST API and web dashboard (``pgsched api``).

Importable as ``pgsched.api``. It depends on the ``pgsched`` core, never the
other way round (an import-linter contract in pyproject.toml keeps it so).
"""

from .app import create_app

__all__ = ["create_app"]

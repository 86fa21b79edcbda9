"""The optional parts of pgsched, installed as extras, imported only where they are used.

A worker host installs the core alone: the embedded PostgreSQL (``embedded``) and the web
stack (``api``) are imported lazily, through ``require``, which turns their absence into one
line that says what to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import ConfigError


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module`` of the extra ``extra``; ConfigError naming the extra when it is not installed."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] != module.split(".")[0]:
            raise  # the extra is there but broken: show that, not advice to install it
        raise ConfigError(f"{purpose} needs the {extra!r} extra: pip install 'pgsched[{extra}]'") from None

"""Loading the user's ``App`` from ``--app`` / ``PGSCHED_APP`` (or the pytest plugin's ini option).

The spec is ``module:attribute`` (``myproject.tasks:app``) or a file path with an optional
attribute (``./tasks.py:app``); the attribute defaults to ``app``. An error is a ConfigError
that says where the spec came from; an exception raised by the user's own code while it is
imported shows that code's frames only (pgsched's and importlib's are noise to the reader).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import traceback
from pathlib import Path
from types import ModuleType

from .client import App
from .errors import ConfigError

FORM = "module:attribute (myproject.tasks:app) or a file path (./tasks.py:app)"
# Frames that are not the user's: importlib's (frozen and on disk) and pgsched's own.
_NOT_THE_USERS = ("<frozen importlib", str(Path(importlib.__file__).parent), str(Path(__file__).resolve().parent))


def import_app(spec: str, option: str) -> App:
    """The ``App`` that ``spec`` names; a ConfigError naming ``option`` if it cannot be loaded."""
    target, _, attribute = spec.rpartition(":") if spec.count(":") else (spec, "", "")
    if not target:
        raise ConfigError(f"{option}: {spec!r} names no module; expected {FORM}")
    try:
        module = _load_file(target, option) if _is_path(target) else _load_module(target, option)
    except ConfigError:
        raise
    except BaseException as exc:
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise ConfigError(f"{option}: importing {spec!r} failed:\n{_user_traceback(exc)}") from None
    attribute = attribute or "app"
    if not hasattr(module, attribute):
        raise ConfigError(f"{option}: {target!r} has no attribute {attribute!r}; expected {FORM}")
    app = getattr(module, attribute)
    if not isinstance(app, App):
        raise ConfigError(f"{option}: {spec!r} is a {type(app).__name__}, not a pgsched.App; expected {FORM}")
    return app


def _is_path(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def _load_module(name: str, option: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        # Only when the named module itself (or a package above it) is missing: an import the
        # module makes that fails is the user's error, shown with its file and line.
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise ConfigError(
                f"{option}: no module named {exc.name!r} (searched the current directory and sys.path); expected {FORM}"
            ) from None
        raise


def _load_file(target: str, option: str) -> ModuleType:
    path = Path(target).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"{option}: no file {target!r}; expected {FORM}")
    # As `python path/to/tasks.py` would: the file's directory is importable (for its siblings).
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    loaded = sys.modules.get(path.stem)
    if loaded is not None and getattr(loaded, "__file__", None) == str(path):
        return loaded
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{option}: {target!r} is not a Python file; expected {FORM}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # so that pickling, dataclasses and the like find it
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[path.stem]
        raise
    return module


def _user_traceback(exc: BaseException) -> str:
    """``exc`` as a traceback of the user's frames only (none of importlib's or pgsched's)."""
    frames = [
        frame for frame in traceback.extract_tb(exc.__traceback__) if not frame.filename.startswith(_NOT_THE_USERS)
    ]
    lines = traceback.format_list(frames) + traceback.format_exception_only(exc)
    return "".join(lines).rstrip("\n")

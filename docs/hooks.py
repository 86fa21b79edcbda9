"""MkDocs hooks: the parts of the site generated from the code, so they cannot drift from it.

A page asks for one with a marker line: ``<!-- generated: cli -->`` (the ``--help`` of every
command) or ``<!-- generated: settings -->`` (the table of every option of ``pgsched.Settings``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import click
import msgspec

from pgsched.cli import main
from pgsched.config import OPTION_NAMES, Settings, env_names, flag_name, option_help

HELP_WIDTH = 100


def commands(command: click.Command, ctx: click.Context) -> Iterator[tuple[click.Command, click.Context]]:
    """Every visible command under ``command``, depth first, each with its context."""
    yield command, ctx
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                sub_ctx = click.Context(sub, info_name=name, parent=ctx, **sub.context_settings)
                yield from commands(sub, sub_ctx)


def root_context() -> click.Context:
    # As the command line builds it (its -h, --help), but as wide as the page, whatever the terminal.
    settings = {**main.context_settings, "terminal_width": HELP_WIDTH, "max_content_width": HELP_WIDTH}
    return click.Context(main, info_name="pgsched", **settings)


def cli_reference() -> str:
    sections = []
    for command, ctx in commands(main, root_context()):
        sections.append(f"## `{ctx.command_path}`\n\n```text\n{command.get_help(ctx)}\n```\n")
    return "\n".join(sections)


def commands_taking(flag: str) -> str:
    """The commands whose options include ``flag``, as the table shows them."""
    taking, leaving = [], []
    for command, ctx in commands(main, root_context()):
        path = f"`{ctx.command_path.removeprefix('pgsched ')}`"
        if any(flag in param.opts for param in command.params if isinstance(param, click.Option)):
            taking.append(path)
        elif not isinstance(command, click.Group):
            leaving.append(path)
    if len(taking) > 2 * len(leaving):
        return "every command but " + ", ".join(leaving)
    return ", ".join(taking) or "no command"


def _bounds(option: str) -> str:
    info = msgspec.inspect.type_info(Settings)
    assert isinstance(info, msgspec.inspect.StructType)
    t = next(f for f in info.fields if f.name == option).type
    if isinstance(t, msgspec.inspect.Metadata):
        t = t.type
    if isinstance(t, (msgspec.inspect.IntType, msgspec.inspect.FloatType)):
        low = t.ge if t.ge is not None else t.gt
        high = t.le if t.le is not None else t.lt
        if low is not None and high is not None:
            return f"{low:,}–{high:,}"
        if t.gt is not None:
            return f"> {t.gt:g}"
        if t.ge is not None:
            return f"≥ {t.ge:g}"
    return ""


def _default(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float):
        return f"{value:g}"
    return f"`{value}`" if isinstance(value, str) else str(value)


def settings_table() -> str:
    defaults = Settings()
    rows = ["| option | variable | flag (commands) | range | default |", "| --- | --- | --- | --- | --- |"]
    for name in OPTION_NAMES:
        variables = ", else ".join(f"`{v}`" for v in env_names(name).split(", else "))
        flag = f"`{flag_name(name)}` ({commands_taking(flag_name(name))})"
        rows.append(
            f"| `{name}` — {option_help(name)} | {variables} | {flag} "
            f"| {_bounds(name)} | {_default(getattr(defaults, name))} |"
        )
    return "\n".join(rows) + "\n"


GENERATED = {"<!-- generated: cli -->": cli_reference, "<!-- generated: settings -->": settings_table}


def on_page_markdown(markdown: str, **_: Any) -> str:
    for marker, render in GENERATED.items():
        if marker in markdown:
            markdown = markdown.replace(marker, render())
    return markdown

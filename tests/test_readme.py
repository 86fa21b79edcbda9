"""The examples of README.md and of every page of the docs site, executed, so the docs cannot drift
from the code (STYLE habit 10).

Two documents run, each against its own fresh database: README.md alone, and the site's pages
(``docs/*.md``) one after the other in the order of the ``nav`` of mkdocs.yml, as one document:
a page may use what an earlier page created. Every page must be in the nav.

Conventions for the fenced blocks (docs/development.md states them too):

- ```` ```python ````: executed in document order in one namespace, with
  ``PGSCHED_DSN`` set to this test's fresh database, so ``App()`` uses it.
- ```` ```sql ````: executed through the ``psql`` of the embedded wheel
  against the same database, one session per block, ``ON_ERROR_STOP=1``.
- ```` ```console ````: every line starting with ``$ `` must be a
  ``$ pgsched ...`` command, ``$ NAME=$(pgsched ...)`` (its output is kept, for
  ``$NAME`` in later lines), or ``$ curl ...`` against ``http://127.0.0.1:8000``
  (the test starts a real ``pgsched api`` at the first such line, with the
  ``pgsched_api_login`` role that docs/api.md creates, and points the URL at it);
  it runs as a subprocess (``PGSCHED_DSN`` set) and must exit 0. The lines after it, up to the next ``$`` line, are its expected
  output: ``...`` matches any text (across lines), a run of spaces matches any
  whitespace. A command followed by no lines has its output unchecked.
- ```` ```<lang> no-run ````: not executed (``make`` targets, long-running
  ``pgsched up``, commands that need the embedded server or another machine).
- ```` ```text ```` and ```` ```toml ````: never executed (diagrams, configuration files).

Any other fence is an error, so a typo cannot silently turn an example off.
Blocks of all kinds run in one pass in document order: a block may rely on
what an earlier one created (job ids are deterministic in a fresh database).
Errors name the file and the line of the block or command that failed.

Roles are global to the server, unlike the per-test database: the login roles
the examples create must not exist beforehand (the test refuses to drop a role
it did not create) and are dropped afterwards.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from psycopg import sql
from psycopg.conninfo import make_conninfo

import pgsched
from pgsched import embedded
from pgsched.config import OPTION_NAMES, env_name, flag_name

from .conftest import wait_until

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MKDOCS = ROOT / "mkdocs.yml"
PGSCHED = Path(sys.executable).parent / "pgsched"
RUNNABLE = frozenset({"python", "sql", "console"})
NEVER_RUN = frozenset({"text", "toml"})

_FENCE = re.compile(r"^```(?P<lang>[\w-]*)(?P<info>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown file."""

    lang: str
    flags: frozenset[str]
    body: str
    line: int  # line number of the first line of the body
    path: Path = README

    @property
    def runs(self) -> bool:
        return self.lang in RUNNABLE and "no-run" not in self.flags

    def at(self, offset: int = 0) -> str:
        """``file:line`` of the body's line ``offset``."""
        return f"{self.path.relative_to(ROOT)}:{self.line + offset}"

    def where(self) -> str:
        return f"{self.at()} ({self.lang} block)"


def readme_blocks(text: str, path: Path = README) -> list[Block]:
    blocks = []
    for match in _FENCE.finditer(text):
        line = text.count("\n", 0, match.start("body")) + 1
        blocks.append(Block(match["lang"], frozenset(match["info"].split()), match["body"], line, path))
    return blocks


def nav_pages() -> list[Path]:
    """The pages of mkdocs.yml's nav, in order."""

    def pages(entry: Any) -> Iterator[str]:  # a page, a list of entries, or {title: entry}
        if isinstance(entry, str):
            yield entry
        for value in entry.values() if isinstance(entry, dict) else entry if isinstance(entry, list) else []:
            yield from pages(value)

    return [DOCS / page for page in pages(yaml.safe_load(MKDOCS.read_text(encoding="utf-8"))["nav"])]


def file_blocks(paths: list[Path]) -> list[Block]:
    return [block for path in paths for block in readme_blocks(path.read_text(encoding="utf-8"), path)]


# The documents whose examples run, each on its own database.
DOCUMENTS = {"readme": lambda: [README], "docs": nav_pages}


@dataclass(frozen=True)
class Command:
    """A ``$ pgsched ...`` or ``$ curl ...`` line of a console block and the output shown after it."""

    argv: list[str]
    expected: str
    where: str  # file:line
    into: str | None = None  # NAME of ``NAME=$(pgsched ...)``: its output is kept as $NAME


_CAPTURE = re.compile(r"^(?P<name>[A-Z_]+)=\$\((?P<command>pgsched [^)]*)\)$")


def console_commands(block: Block) -> list[Command]:
    commands: list[Command] = []
    for offset, text in enumerate(block.body.splitlines()):
        if text.startswith("$ "):
            capture = _CAPTURE.match(text[2:])
            argv = shlex.split(capture["command"] if capture else text[2:], comments=True)
            assert argv and argv[0] in ("pgsched", "curl"), (
                f"{block.at(offset)}: only `$ pgsched ...` and `$ curl ...` lines can run; "
                "fence the block as ```console no-run to show other commands"
            )
            commands.append(Command(argv, "", block.at(offset), capture["name"] if capture else None))
        elif commands:
            last = commands[-1]
            commands[-1] = Command(last.argv, last.expected + text + "\n", last.where, last.into)
        elif text.strip():
            raise AssertionError(f"{block.at(offset)}: output before any `$ ` command")
    return commands


def output_pattern(expected: str) -> re.Pattern[str]:
    """``expected`` as a regex: ``...`` matches any text, a run of whitespace any whitespace."""
    parts = []
    for piece in expected.strip().split("..."):
        parts.append(r"\s+".join(re.escape(word) for word in re.split(r"\s+", piece)))
    return re.compile(".*?".join(parts), re.S)


def normalized(output: str) -> str:
    return "\n".join(line.rstrip() for line in output.strip().splitlines())


def created_roles(blocks: list[Block]) -> list[str]:
    names: list[str] = []
    for block in blocks:
        if block.lang == "sql" and block.runs:
            names += re.findall(r"CREATE\s+ROLE\s+(\w+)", block.body, re.I)
    return names


# -- runners -----------------------------------------------------------------------------------------


def run_python(block: Block, namespace: dict[str, Any]) -> None:
    # Pad with blank lines so tracebacks point at the Markdown file's own line numbers.
    code = compile("\n" * (block.line - 1) + block.body, str(block.path), "exec")
    exec(code, namespace)


def run_sql(block: Block, dsn: str) -> None:
    psql = embedded.bin_dir() / "psql"
    done = subprocess.run(
        [str(psql), "-X", "-v", "ON_ERROR_STOP=1", "-d", dsn],
        input=block.body,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{block.where()} failed in psql:\n{done.stderr}\n--- stdout:\n{done.stdout}"


class Shell:
    """What the console blocks of one document share: the variables ``NAME=$(pgsched ...)`` set,
    and the ``pgsched api`` process that ``curl`` lines call (started at the first of them).

    docs/api.md's curl walk-through creates a token, a job and a schedule, and watches the live
    event stream (api/events.py) for two seconds."""

    DOCS_URL = "http://127.0.0.1:8000"  # where the docs show the API

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.variables: dict[str, str] = {}
        self.api: subprocess.Popen[bytes] | None = None
        self.url = ""

    def argv(self, command: Command) -> list[str]:
        argv = [re.sub(r"\$([A-Z_]+)", lambda m: self.variables[m[1]], arg) for arg in command.argv]
        if argv[0] == "pgsched":
            return [str(PGSCHED), *argv[1:]]
        return [arg.replace(self.DOCS_URL, self.api_url()) for arg in argv]

    def api_url(self) -> str:
        """Start ``pgsched api`` as docs/api.md does: its own login, subject to row-level security."""
        if self.api is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            login = make_conninfo(self.env["PGSCHED_DSN"], user="pgsched_api_login", password="change-me")
            self.api = subprocess.Popen(
                [str(PGSCHED), "api", "--port", str(port)],
                env={**self.env, "PGSCHED_API_DSN": login},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self.url = f"http://127.0.0.1:{port}"

            def healthy() -> bool:
                assert self.api is not None and self.api.poll() is None, "pgsched api exited"
                try:
                    with urllib.request.urlopen(f"{self.url}/healthz", timeout=1) as response:
                        return bool(response.status == 200)
                except OSError:
                    return False

            wait_until(healthy, timeout=60, message="pgsched api answers /healthz")
        return self.url

    def close(self) -> None:
        if self.api is not None:
            self.api.terminate()
            self.api.wait(timeout=30)


def run_console(block: Block, shell: Shell) -> None:
    for command in console_commands(block):
        argv = shell.argv(command)
        done = subprocess.run(argv, env=shell.env, capture_output=True, text=True, timeout=120)
        shown = shlex.join(command.argv)
        assert done.returncode == 0, f"{command.where}: `{shown}` exited {done.returncode}:\n{done.stderr}{done.stdout}"
        if command.expected.strip():
            actual = normalized(done.stdout)
            assert output_pattern(command.expected).fullmatch(actual), (
                f"{command.where}: `{shown}` printed\n{actual}\n--- but the docs show\n{command.expected}"
            )
        if command.into is not None:
            shell.variables[command.into] = done.stdout.strip()


# -- tests ---------------------------------------------------------------------------------------


@pytest.fixture(params=sorted(DOCUMENTS))
def blocks(request: pytest.FixtureRequest) -> list[Block]:
    return file_blocks(DOCUMENTS[request.param]())


@pytest.fixture
def readme_roles(blocks: list[Block], dsn: str) -> Iterator[list[str]]:
    """The login roles the examples create: absent before the examples run, dropped after."""
    names = created_roles(blocks)
    with psycopg.connect(dsn, autocommit=True) as admin:
        existing = [n for n in names if admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (n,)).fetchone()]
        assert not existing, (
            f"roles {existing} already exist on the test server; the docs' examples create them. "
            "Drop them (DROP ROLE ...) or use another server."
        )
        try:
            yield names
        finally:
            for name in names:
                admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.mark.unit
def test_readme_opens_with_the_two_setup_commands() -> None:
    first, second = readme_blocks(README.read_text(encoding="utf-8"))[:2]
    assert (first.body.strip(), second.body.strip()) == ("$ make up", "$ make test")
    text = README.read_text(encoding="utf-8")
    assert text.index("```") < text.index("\n## "), "the set-up commands come before any section"


@pytest.mark.unit
def test_every_docs_page_is_in_the_nav_and_every_block_is_known() -> None:
    pages = nav_pages()
    missing = sorted(p.name for p in DOCS.glob("**/*.md") if p not in pages)
    assert not missing, f"mkdocs.yml: pages not in the nav (their examples would not run): {missing}"
    assert all(p.is_file() for p in pages), f"mkdocs.yml names pages that do not exist: {pages}"
    every = file_blocks([README, *pages])
    for block in every:
        assert block.lang in RUNNABLE | NEVER_RUN, f"{block.where()}: unknown fence language {block.lang!r}"
        assert block.flags <= {"no-run"}, f"{block.where()}: unknown fence flags {sorted(block.flags)}"
    for name, document in DOCUMENTS.items():
        langs = {b.lang for b in file_blocks(document()) if b.runs}
        assert langs == RUNNABLE, f"{name}: should show runnable examples of each kind, found {sorted(langs)}"


@pytest.mark.unit
def test_the_configuration_page_shows_every_option() -> None:
    """The option table of docs/configuration.md is generated by docs/hooks.py: a row per field of
    ``pgsched.Settings``, with its variable, its flag and the commands that take it."""
    assert "<!-- generated: settings -->" in (DOCS / "configuration.md").read_text(encoding="utf-8")
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    assert spec and spec.loader
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    rows = hooks.settings_table().splitlines()[2:]
    assert [row.split("`")[1] for row in rows] == list(OPTION_NAMES)
    for name, row in zip(OPTION_NAMES, rows, strict=True):
        assert f"`{env_name(name)}`" in row and f"`{flag_name(name)}` (" in row, row
    assert "`PGSCHED_DSN`, else `DATABASE_URL`" in rows[0]
    assert "`--concurrency` (`up`, `worker`)" in rows[OPTION_NAMES.index("concurrency")]
    assert "every command but `keys generate`, `schedules preview`" in rows[0]


@pytest.mark.db
def test_examples_run(
    blocks: list[Block], dsn: str, cli_env: dict[str, str], readme_roles: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("PGSCHED_") or name == "DATABASE_URL":
            monkeypatch.delenv(name)
    monkeypatch.setenv("PGSCHED_DSN", dsn)
    namespace: dict[str, Any] = {"__name__": "readme"}
    shell = Shell(cli_env)
    try:
        for block in blocks:
            if not block.runs:
                continue
            if block.lang == "python":
                run_python(block, namespace)
            elif block.lang == "sql":
                run_sql(block, dsn)
            else:
                run_console(block, shell)
    finally:
        shell.close()
        for value in namespace.values():
            if isinstance(value, pgsched.App):
                value.close()

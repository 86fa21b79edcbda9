"""Settings: every option of pgsched, declared once.

Each field of ``Settings`` is an option. Its ``PGSCHED_<NAME>`` environment
variable and its ``--name`` CLI flag are derived from the field, so an option
cannot exist in one place and not the other. Precedence: CLI flag, then
environment, then the default. ``PGSCHED_DSN`` falls back to ``DATABASE_URL``.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import warnings
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import msgspec
from psycopg.conninfo import conninfo_to_dict

from .crypto import Keyring
from .errors import ConfigError

ENV_PREFIX = "PGSCHED_"
# The roles of API users (pgsched.accounts.ROLES, which imports this module).
ROLE_NAMES = ("admin", "operator", "member", "viewer")

# Variables read by pgsched's own tests and benchmarks, not options of the
# program: known, so they draw no "unknown variable" warning.
OTHER_KNOWN_VARIABLES = frozenset({"PGSCHED_TEST_DSN", "PGSCHED_BENCH_DSN"})


def default_data_dir() -> Path:
    """Where the embedded PostgreSQL keeps its data when PGSCHED_DATA_DIR is not set.

    The embedded server, when started by root, runs as its own system user and
    opens group/other traversal on every parent directory of its data
    directory. For root we therefore use /var/lib/pgsched (already traversable)
    rather than a directory under /root; other users get their XDG data home.
    """
    if os.geteuid() == 0:
        return Path("/var/lib/pgsched/pg18")
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "pgsched" / "pg18"


LogLevel = Annotated[str, msgspec.Meta(pattern=r"^(?i:debug|info|warning|error|critical)$")]
_QUEUE = r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}"
QUEUE_LIST = rf"^\s*{_QUEUE}\s*(,\s*{_QUEUE}\s*)*$"


class Settings(msgspec.Struct, kw_only=True, frozen=True):
    """Every option of pgsched. See the module docstring for how each is set."""

    dsn: Annotated[
        str | None,
        msgspec.Meta(description="PostgreSQL connection string; unset: the embedded server"),
    ] = None
    api_dsn: Annotated[
        str | None,
        msgspec.Meta(
            description="Connection string of the REST API's database login, a member of pgsched_api (subject "
            "to row-level security); unset: the dsn, which then must be such a login unless pgsched api --dev"
        ),
    ] = None
    data_dir: Annotated[
        str | None,
        msgspec.Meta(
            description="Data directory of the embedded PostgreSQL; unset: /var/lib/pgsched/pg18 for root, "
            "else $XDG_DATA_HOME/pgsched/pg18 (~/.local/share/pgsched/pg18)"
        ),
    ] = None
    app: Annotated[
        str | None,
        msgspec.Meta(
            description="Your tasks: module:attribute of a pgsched.App (myproject.tasks:app), or a file (./tasks.py)"
        ),
    ] = None
    encryption_keys: Annotated[
        str | None,
        msgspec.Meta(
            description="Keys of encrypted payloads, kid:base64-32-bytes, comma-separated; the first encrypts"
        ),
    ] = None
    log_level: Annotated[LogLevel, msgspec.Meta(description="Log level: debug, info, warning, error, critical")] = (
        "info"
    )
    # Worker
    queues: Annotated[
        str, msgspec.Meta(pattern=QUEUE_LIST, description="Queues the worker claims from, comma-separated")
    ] = "default"
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=10_000, description="Jobs one worker process runs at once")] = 10
    processes: Annotated[int, msgspec.Meta(ge=1, le=256, description="Worker processes under one supervisor")] = 1
    prefetch: Annotated[
        int, msgspec.Meta(ge=0, le=100_000, description="Extra jobs a worker claims ahead into its local queue")
    ] = 0
    lease_seconds: Annotated[
        float,
        msgspec.Meta(
            gt=0,
            description="How long a claim holds without a heartbeat "
            "(and how long a scheduler waits after it connects before rescuing)",
        ),
    ] = 30.0
    heartbeat_seconds: Annotated[
        float,
        msgspec.Meta(gt=0, description="Interval of the heartbeat that extends the leases; shorter than the lease"),
    ] = 5.0
    poll_seconds: Annotated[
        float, msgspec.Meta(gt=0, description="Claim poll interval when no notification arrives (jittered)")
    ] = 2.0
    grace_seconds: Annotated[
        float, msgspec.Meta(ge=0, description="On shutdown, how long running jobs may finish before they are put back")
    ] = 10.0
    allow_shell: Annotated[bool, msgspec.Meta(description="Run shell jobs on this worker")] = False
    allow_private_http: Annotated[
        bool, msgspec.Meta(description="Let http jobs reach private, loopback and link-local addresses")
    ] = False
    burst: Annotated[bool, msgspec.Meta(description="Exit when the queues are empty")] = False
    scheduler: Annotated[
        bool,
        msgspec.Meta(description="Also run the maintenance services (promote, rescue, prune, schedules)"),
    ] = True
    wait_for_db: Annotated[
        float,
        msgspec.Meta(
            ge=0, le=86_400, description="At start-up, how long to retry a database that cannot be reached (seconds)"
        ),
    ] = 30.0
    # REST API sign-in (docs/api.md, "Signing in" and "OIDC")
    session_idle_seconds: Annotated[
        float,
        msgspec.Meta(gt=0, le=31_536_000, description="A signed-in session ends after this long without a request"),
    ] = 43_200.0
    session_lifetime_seconds: Annotated[
        float,
        msgspec.Meta(
            gt=0, le=31_536_000, description="A signed-in session ends this long after sign-in, however active"
        ),
    ] = 604_800.0
    oidc_discovery_url: Annotated[
        str | None,
        msgspec.Meta(
            description="OpenID provider's discovery document (https://.../.well-known/openid-configuration); "
            "unset: no OIDC sign-in"
        ),
    ] = None
    oidc_client_id: Annotated[str | None, msgspec.Meta(description="This API's client id at the OpenID provider")] = (
        None
    )
    oidc_client_secret: Annotated[
        str | None,
        msgspec.Meta(
            description="This API's client secret at the OpenID provider (a variable only: a flag would show it to ps)"
        ),
    ] = None
    oidc_redirect_url: Annotated[
        str | None,
        msgspec.Meta(description="The callback registered at the OpenID provider: https://HOST/api/v1/oidc/callback"),
    ] = None
    oidc_scopes: Annotated[str, msgspec.Meta(description="Scopes asked of the OpenID provider, space-separated")] = (
        "openid profile email"
    )
    oidc_username_claim: Annotated[
        str, msgspec.Meta(description="ID token claim that names a user created at its first OIDC sign-in")
    ] = "preferred_username"
    oidc_role_claim: Annotated[
        str | None,
        msgspec.Meta(description="ID token claim whose value decides the role (such as groups); unset: the default"),
    ] = None
    oidc_roles: Annotated[
        str | None,
        msgspec.Meta(
            description="Claim values and their roles, value:role comma-separated (admins:admin,sre:operator)"
        ),
    ] = None
    oidc_default_role: Annotated[
        str,
        msgspec.Meta(
            pattern=r"^(admin|operator|member|viewer)$",
            description="Role of an OIDC user whose claim maps to no role",
        ),
    ] = "viewer"
    oidc_landing_path: Annotated[
        str,
        msgspec.Meta(pattern=r"^/(?![/\\])\S*$", description="Where a browser goes after its OIDC sign-in (a path)"),
    ] = "/"

    def __repr__(self) -> str:
        # Settings end up in tracebacks and debug output: never show the key material nor a password.
        fields = msgspec.structs.asdict(self)
        for name in ("encryption_keys", "oidc_client_secret"):
            if fields[name]:
                fields[name] = "<hidden>"
        for name in ("dsn", "api_dsn"):
            if fields[name]:
                fields[name] = masked_dsn(fields[name])
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in fields.items()) + ")"

    def check_worker(self) -> None:
        """The checks that concern a worker only (ConfigError)."""
        if self.heartbeat_seconds >= self.lease_seconds:
            raise ConfigError(
                f"--heartbeat-seconds / PGSCHED_HEARTBEAT_SECONDS: {self.heartbeat_seconds:g} must be shorter "
                f"than --lease-seconds ({self.lease_seconds:g}), or every lease would lapse between heartbeats"
            )

    @property
    def oidc_role_map(self) -> dict[str, str]:
        """``oidc_roles`` as claim value -> role (ConfigError for a malformed pair)."""
        mapping = {}
        for pair in (self.oidc_roles or "").split(","):
            value, _, role = pair.strip().rpartition(":")
            if not value or role not in ROLE_NAMES:
                raise ConfigError(
                    f"--oidc-roles / PGSCHED_OIDC_ROLES: expected value:role pairs separated by commas, each role "
                    f"one of {', '.join(ROLE_NAMES)} (got {pair.strip()!r})"
                )
            mapping[value] = role
        return mapping

    @property
    def queue_list(self) -> tuple[str, ...]:
        """``queues`` as a tuple of names."""
        return tuple(dict.fromkeys(q.strip() for q in self.queues.split(",") if q.strip()))

    @property
    def embedded_data_dir(self) -> Path:
        """The embedded server's data directory: the option, or the per-user default."""
        return Path(self.data_dir).expanduser() if self.data_dir else default_data_dir()


OPTION_NAMES: tuple[str, ...] = Settings.__struct_fields__

# A password in a DSN: URI userinfo (postgresql://user:PASSWORD@...), a URI parameter (?password=...)
# and a key=value pair (password=... or password='...').
_URI_PASSWORD = re.compile(r"^(\w+://[^:@/?#]*:)([^/?#]+)(@)")
_PARAMETER_PASSWORD = re.compile(r"([?&]password=)([^&#]+)")
_KEYWORD_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s']+)")


def masked_dsn(dsn: str) -> str:
    """``dsn`` with its password, if any, replaced by ``***`` (for printing and logging)."""
    if "://" in dsn:
        return _PARAMETER_PASSWORD.sub(r"\1***", _URI_PASSWORD.sub(r"\1***\3", dsn))
    return _KEYWORD_PASSWORD.sub(r"\1***", dsn)


def env_name(option: str) -> str:
    """The environment variable of an option: ``data_dir`` -> ``PGSCHED_DATA_DIR``."""
    return ENV_PREFIX + option.upper()


def env_names(option: str) -> str:
    """The variables an option is read from, in order, as --help and the docs show them."""
    return f"{env_name(option)}, else DATABASE_URL" if option == "dsn" else env_name(option)


def flag_name(option: str) -> str:
    """The CLI flag of an option: ``data_dir`` -> ``--data-dir``."""
    return "--" + option.replace("_", "-")


@functools.cache
def _descriptions() -> dict[str, str]:
    info = msgspec.inspect.type_info(Settings)
    assert isinstance(info, msgspec.inspect.StructType)
    return {field.name: _description(field.type) for field in info.fields}


def option_help(option: str) -> str:
    """The description declared on the option's field."""
    return _descriptions()[option]


def _description(type_info: Any) -> str:
    if isinstance(type_info, msgspec.inspect.Metadata):
        return (type_info.extra_json_schema or {}).get("description", "") or _description(type_info.type)
    if isinstance(type_info, msgspec.inspect.UnionType):
        return next((d for t in type_info.types if (d := _description(t))), "")
    return ""


def warn_unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """Warn about PGSCHED_* variables that are not options, suggesting the nearest valid name."""
    valid = [env_name(name) for name in OPTION_NAMES]
    unknown = sorted(
        k for k in environ if k.startswith(ENV_PREFIX) and k not in valid and k not in OTHER_KNOWN_VARIABLES
    )
    for name in unknown:
        # Compare without the shared prefix, which would make every name look close.
        near = difflib.get_close_matches(name.removeprefix(ENV_PREFIX).lower(), OPTION_NAMES, n=1, cutoff=0.6)
        hint = f"; did you mean {env_name(near[0])}?" if near else ""
        warnings.warn(f"unknown environment variable {name} is ignored{hint}", stacklevel=2)
    return unknown


def load_settings(overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from the environment and explicit overrides (CLI flags); None values are ignored.

    Raises ConfigError naming the option (flag and variable) for a bad value.
    """
    environ = os.environ if environ is None else environ
    warn_unknown_variables(environ)
    raw: dict[str, Any] = {}
    for name in OPTION_NAMES:
        value = environ.get(env_name(name))
        if value is not None and value != "":
            raw[name] = value
    if "dsn" not in raw and environ.get("DATABASE_URL"):
        raw["dsn"] = environ["DATABASE_URL"]
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return _convert(raw)


def replace_settings(settings: Settings, **changes: Any) -> Settings:
    """``settings`` with some options changed, validated like any other input (ConfigError).

    The values are Python's: ``queues`` may be a list of names, a duration a ``timedelta``
    (the command line and the environment give strings, which ``load_settings`` parses)."""
    unknown = set(changes) - set(OPTION_NAMES)
    if unknown:
        raise ConfigError(f"unknown option {sorted(unknown)[0]!r}; options: {', '.join(OPTION_NAMES)}")
    return _convert({**msgspec.structs.asdict(settings), **{k: _from_python(k, v) for k, v in changes.items()}})


def _from_python(name: str, value: Any) -> Any:
    """A value given from Python in the form its field holds."""
    if name == "queues" and isinstance(value, (list, tuple)):
        if not all(isinstance(queue, str) for queue in value):
            raise ConfigError(f"queues: expected queue names (str), got {value!r}")
        return ",".join(value)
    if isinstance(value, timedelta) and (name.endswith("_seconds") or name == "wait_for_db"):
        return value.total_seconds()
    return value


def _convert(raw: dict[str, Any]) -> Settings:
    for name in _BOOLEANS:
        if isinstance(raw.get(name), str):
            raw[name] = _BOOLEAN_WORDS.get(raw[name].strip().lower(), raw[name])
    try:
        settings = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        match = re.search(r"at `\$\.(\w+)`", str(exc))
        if not match:
            raise ConfigError(str(exc)) from None
        name = match.group(1)
        shown = "" if name in ("encryption_keys", "oidc_client_secret") else f" (got {raw.get(name)!r})"
        raise ConfigError(f"{flag_name(name)} / {env_name(name)}: {_expected(name, raw.get(name))}{shown}") from None
    if settings.dsn:
        check_dsn(settings.dsn)
    if settings.encryption_keys is not None:
        Keyring.parse(settings.encryption_keys)  # a malformed value fails here, at start-up
    if settings.oidc_roles is not None:
        _ = settings.oidc_role_map  # likewise
    return settings


def check_dsn(dsn: str) -> None:
    """ConfigError unless libpq can parse ``dsn`` (a URI or key=value pairs). Checked with the other
    settings, so a typo is one line, not a traceback from the first connection attempt. libpq's
    own message would repeat the text, password included: it is not shown."""
    try:
        conninfo_to_dict(dsn)
    except Exception:
        raise ConfigError(
            f"--dsn / PGSCHED_DSN: {masked_dsn(dsn)!r} is not a PostgreSQL connection string; expected a URI "
            "such as postgresql://user:password@host:5432/dbname, or key=value pairs such as 'host=db dbname=app'"
        ) from None


# Words a boolean setting accepts (any case), as most tools' environment variables do.
_BOOLEAN_WORDS = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
}
_BOOLEANS = tuple(name for name in OPTION_NAMES if isinstance(getattr(Settings(), name), bool))


def _expected(name: str, value: Any) -> str:
    """What option ``name`` accepts, in words (for a value msgspec refused)."""
    if name in _BOOLEANS:
        return "expected true or false (accepted: 1, true, yes, on / 0, false, no, off)"
    if name == "log_level":
        return "expected one of: debug, info, warning, error, critical"
    if name == "oidc_default_role":
        return f"expected one of: {', '.join(ROLE_NAMES)}"
    if name == "oidc_landing_path":
        return "expected a path of this server, starting with one /"
    if name == "queues":
        return "expected queue names separated by commas" + _bad_queue(value)
    info = msgspec.inspect.type_info(Settings)
    assert isinstance(info, msgspec.inspect.StructType)
    kind = next(f.type for f in info.fields if f.name == name)
    kind = kind.type if isinstance(kind, msgspec.inspect.Metadata) else kind
    if isinstance(kind, (msgspec.inspect.IntType, msgspec.inspect.FloatType)):
        what = "a whole number" if isinstance(kind, msgspec.inspect.IntType) else "a number"
        if kind.gt is not None:
            what += f" greater than {kind.gt}"
        if kind.ge is not None and kind.le is not None:
            return f"expected {what} from {kind.ge} to {kind.le}"
        if kind.ge is not None:
            what += f" of at least {kind.ge}"
        if kind.le is not None:
            what += f" of at most {kind.le}"
        return f"expected {what}"
    return "expected text"


def _bad_queue(value: Any) -> str:
    if not isinstance(value, str):
        return ""
    for item in value.split(","):
        if not item.strip():
            return "; one of them is empty (a stray comma?)"
        if not re.fullmatch(_QUEUE, item.strip()):
            return (
                f"; {item.strip()!r} is not a queue name (1-100 letters, digits, '_', '.', ':' or '-', "
                "starting with a letter or digit)"
            )
    return ""

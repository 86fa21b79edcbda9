"""Settings: one declaration, variables and flags derived from it, clear errors."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import click
import pytest
from click.testing import CliRunner

from pgsched import ConfigError, Settings, load_settings
from pgsched.cli import main
from pgsched.config import OPTION_NAMES, default_data_dir, env_name, flag_name

pytestmark = pytest.mark.unit


def test_every_option_has_a_variable_and_a_flag() -> None:
    assert env_name("data_dir") == "PGSCHED_DATA_DIR"
    assert flag_name("data_dir") == "--data-dir"
    help_text = CliRunner().invoke(main, ["migrate", "--help"]).output
    for name in ("dsn", "data_dir", "log_level"):
        assert flag_name(name) in help_text
        assert env_name(name) in help_text
    assert "--app" in CliRunner().invoke(main, ["up", "--help"]).output
    assert set(OPTION_NAMES) == set(Settings.__struct_fields__)


def test_environment_then_flags() -> None:
    env = {"PGSCHED_DSN": "postgresql://env/db", "PGSCHED_LOG_LEVEL": "debug"}
    assert load_settings(environ=env).dsn == "postgresql://env/db"
    assert load_settings({"dsn": "postgresql://flag/db"}, environ=env).dsn == "postgresql://flag/db"
    assert load_settings({"dsn": None}, environ=env).dsn == "postgresql://env/db"
    assert load_settings(environ=env).log_level == "debug"


def test_database_url_is_the_fallback() -> None:
    assert load_settings(environ={"DATABASE_URL": "postgresql://fallback/db"}).dsn == "postgresql://fallback/db"
    both = {"DATABASE_URL": "postgresql://fallback/db", "PGSCHED_DSN": "postgresql://main/db"}
    assert load_settings(environ=both).dsn == "postgresql://main/db"
    assert load_settings(environ={}).dsn is None


def test_unknown_variable_warns_with_the_nearest_name() -> None:
    with pytest.warns(UserWarning, match="PGSCHED_DSM.*did you mean PGSCHED_DSN"):
        load_settings(environ={"PGSCHED_DSM": "x"})
    with pytest.warns(UserWarning, match="PGSCHED_LOGLEVEL.*did you mean PGSCHED_LOG_LEVEL"):
        load_settings(environ={"PGSCHED_LOGLEVEL": "x"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_settings(environ={"PGSCHED_TEST_DSN": "x", "PGSCHED_DSN": "dbname=y"})


def test_bad_value_names_the_option() -> None:
    with pytest.raises(ConfigError, match=r"--log-level / PGSCHED_LOG_LEVEL.*'loud'"):
        load_settings(environ={"PGSCHED_LOG_LEVEL": "loud"})


def test_data_dir_default_and_override() -> None:
    assert load_settings(environ={"PGSCHED_DATA_DIR": "/tmp/x/pg"}).embedded_data_dir.as_posix() == "/tmp/x/pg"
    assert load_settings(environ={}).embedded_data_dir == default_data_dir()
    assert default_data_dir().name == "pg18"


@pytest.mark.parametrize(
    ("dsn", "shown"),
    [
        ("postgresql://bob:s3cret@db.example:5432/app", "postgresql://bob:***@db.example:5432/app"),
        ("postgres://bob:s3@cret@db/app?sslmode=require", "postgres://bob:***@db/app?sslmode=require"),
        (
            "postgresql://db/app?user=bob&password=s3cret&sslmode=require",
            "postgresql://db/app?user=bob&password=***&sslmode=require",
        ),
        ("host=db user=bob password=s3cret dbname=app", "host=db user=bob password=*** dbname=app"),
        ("host=db password = 's3 \\' cret' dbname=app", "host=db password = *** dbname=app"),
        # Nothing to hide: left as it is (the embedded server's DSN has an empty password).
        (
            "postgresql://postgres:@/postgres?host=/var/lib/pgsched",
            "postgresql://postgres:@/postgres?host=/var/lib/pgsched",
        ),
        ("postgresql://bob@db:5432/app", "postgresql://bob@db:5432/app"),
    ],
)
def test_settings_repr_never_shows_a_dsn_password(dsn: str, shown: str) -> None:
    settings = load_settings(environ={"PGSCHED_DSN": dsn})
    assert settings.dsn == dsn  # the value itself is intact
    assert f"dsn={shown!r}" in repr(settings)
    shown_all = repr(settings).replace("oidc_client_secret=", "")  # a field's name, not a value
    assert "s3" not in shown_all and "cret" not in shown_all


def all_commands(command: click.Command, path: str = "pgsched") -> Iterator[tuple[str, click.Command]]:
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            yield from all_commands(sub, f"{path} {name}")


def test_help_types_the_numbers_and_shows_only_real_defaults() -> None:
    defaults = Settings()
    for path, command in all_commands(main):
        help_text = CliRunner().invoke(main, [*path.split()[1:], "--help"], terminal_width=200).output
        assert "default: None" not in help_text, f"{path} --help shows an unset default"
        for param in command.params:
            name = param.name or ""
            if name in OPTION_NAMES and type(getattr(defaults, name)) in (int, float):
                expected = "integer" if type(getattr(defaults, name)) is int else "float"
                assert param.type.name == expected, f"{path} {flag_name(name)} is {param.type.name}, not {expected}"
    worker_help = CliRunner().invoke(main, ["worker", "--help"], terminal_width=200).output
    assert "--concurrency INTEGER" in worker_help and "--lease-seconds FLOAT" in worker_help
    assert "[env: PGSCHED_DSN, else DATABASE_URL]" in worker_help
    assert "/var/lib/pgsched/pg18 for root" in worker_help  # where root's embedded data goes


def test_a_number_flag_refuses_words() -> None:
    result = CliRunner().invoke(main, ["worker", "--concurrency", "ten"])
    assert result.exit_code == 2 and "'ten' is not a valid integer" in result.output


def test_shell_completion_prints_a_script_and_completes_commands() -> None:
    script = CliRunner().invoke(main, [], prog_name="pgsched", env={"_PGSCHED_COMPLETE": "bash_source"})
    assert script.exit_code == 0 and "_pgsched_completion" in script.output
    env = {"_PGSCHED_COMPLETE": "bash_complete", "COMP_WORDS": "pgsched wor", "COMP_CWORD": "1"}
    completed = CliRunner().invoke(main, [], prog_name="pgsched", env=env)
    assert completed.output.splitlines() == ["plain,worker", "plain,workers"]


def test_python_callers_give_python_values() -> None:
    from datetime import timedelta

    from pgsched.config import replace_settings

    settings = replace_settings(
        Settings(), queues=["a", "b"], concurrency=4, lease_seconds=timedelta(minutes=1), wait_for_db=timedelta(0)
    )
    assert (settings.queues, settings.queue_list, settings.concurrency) == ("a,b", ("a", "b"), 4)
    assert (settings.lease_seconds, settings.wait_for_db) == (60.0, 0.0)
    assert replace_settings(Settings(), queues="a, b").queue_list == ("a", "b")  # a string still works
    with pytest.raises(ConfigError, match=r"queues: expected queue names \(str\), got \['a', 1\]"):
        replace_settings(Settings(), queues=["a", 1])
    with pytest.raises(ConfigError, match="--concurrency / PGSCHED_CONCURRENCY"):
        replace_settings(Settings(), concurrency=0)


def test_the_scheduler_is_on_unless_turned_off() -> None:
    assert Settings().scheduler is True
    assert load_settings(environ={"PGSCHED_SCHEDULER": "false"}).scheduler is False
    assert load_settings({"scheduler": False}, environ={}).scheduler is False
    help_text = CliRunner().invoke(main, ["worker", "--help"]).output
    assert "--no-scheduler" in help_text and "--wait-for-db" in help_text
    assert "--with-scheduler" not in help_text  # still accepted (a no-op), no longer offered

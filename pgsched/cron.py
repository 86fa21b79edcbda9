"""When a schedule fires: cron expressions in an IANA time zone, and fixed intervals.

The materializer, the API's preview and ``pgsched schedules preview`` all call
``next_fire_times``, so a preview shows exactly the slots that will be written.
Everything here is a pure function of its arguments (no clock, no I/O).

Cron syntax: 5 fields (minute hour day-of-month month day-of-week), or 6 with a
leading seconds field, or an alias (@yearly, @annually, @monthly, @weekly,
@daily, @midnight, @hourly). Fields take numbers, ``*``, ranges, lists, steps,
month and weekday names, ``?``, ``L`` (last day of the month) and ``#`` (nth
weekday). As in standard cron, when both day-of-month and day-of-week are
restricted a day matching either fires. Hashed and random values (``H``, ``R``)
and ``W`` are refused: a schedule must mean the same thing everywhere.

Daylight saving: cron fields describe wall-clock times in the schedule's zone;
``next_fire_times`` maps each matching wall time to one UTC instant:

- a wall time that does not exist (skipped by a spring-forward gap, e.g. 02:30
  on 2026-03-08 in America/New_York) fires once at the first valid instant
  after it, the transition itself (03:00 EDT = 07:00 UTC); several matches in
  one gap collapse into that single slot;
- a wall time that occurs twice (01:30 on 2026-11-01 in New York) fires once,
  at its first occurrence (01:30 EDT = 05:30 UTC), when the hour field names
  hours ("30 1 * * *", "0 1-3 * * *"): a job of a fixed hour runs once a day;
- but when the hour field is a wildcard (it starts with ``*``: "*/30 * * * *",
  "0 * * * *", "@hourly", "0 */2 * * *"), it fires at both occurrences
  (05:30 and 06:30 UTC): such an expression means "every so often", and
  skipping the second pass would leave a gap of two hours in an hourly job.
  This is Vixie cron's rule for the hour field; unlike Vixie cron, a wildcard
  minute with a fixed hour ("*/20 1 * * *") still fires once per wall time.

croniter's own handling of aware datetimes at transitions is not this rule (it
can skip or repeat), so croniter only generates naive wall times here and the
mapping to instants is ours. Only UTC offsets matter, so 30-minute shifts
(Australia/Lord_Howe), negative DST (Europe/Dublin) and transitions at midnight
(America/Santiago, America/Havana) need no special case.

Time-zone data comes from the PyPI ``tzdata`` package, not the host: it is the
same on every host and container image, and newer than the distribution's copy
(they disagree for real zones in late 2026, e.g. America/Havana).
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib.resources
import math
import re
import zoneinfo
from datetime import UTC, datetime, timedelta
from typing import NamedTuple

from croniter import CroniterError, croniter

from .errors import ValidationError
from .validation import LATEST_RUN_AT_AHEAD, check_int

MIN_INTERVAL = timedelta(seconds=1)
MAX_INTERVAL = LATEST_RUN_AT_AHEAD
MAX_FIRE_TIMES = 1000
CRON_MAX_LENGTH = 200

ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

# (name, allowed values) of the five standard fields, in order.
_FIELDS = (
    ("minute", "0-59"),
    ("hour", "0-23"),
    ("day-of-month", "1-31 or L"),
    ("month", "1-12 or jan-dec"),
    ("day-of-week", "0-7 or sun-sat (0 and 7 are Sunday)"),
)
_SECOND_FIELD = ("second", "0-59")
_DAYS_IN_MONTH = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # February as in a leap year
# croniter splits on ASCII whitespace only; a no-break space stays inside a field and is refused there.
_FIELD_SPLIT = re.compile(r"\S+", re.ASCII)
_HASHED = re.compile(r"^[hr](\(|/|$)", re.IGNORECASE)
_NEAREST_WEEKDAY = re.compile(r"^(\d+w|w\d+)$", re.IGNORECASE)
# IANA names are letters, digits and _ + - separated by "/": no dot, so no "..", no file suffix.
_ZONE_NAME = re.compile(r"[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*")


class CronSpec(NamedTuple):
    """A validated cron expression: ``fields`` is what croniter evaluates."""

    fields: str
    seconds: bool  # a leading seconds field


def parse_cron(expr: object) -> CronSpec:
    """Validate a cron expression; ValidationError("cron", ...) names the bad field and value."""
    if not isinstance(expr, str):
        raise ValidationError("cron", f"must be text, not {type(expr).__name__}")
    if len(expr) > CRON_MAX_LENGTH:
        raise ValidationError("cron", f"must be at most {CRON_MAX_LENGTH} characters")
    return _parse_cron(expr)


@functools.lru_cache(maxsize=256)  # the materializer asks about the same few crons on every pass
def _parse_cron(expr: str) -> CronSpec:
    text = expr.strip()
    if text.startswith("@"):
        if text.lower() not in ALIASES:
            raise ValidationError("cron", f"unknown alias {text!r}; known: {', '.join(ALIASES)}")
        text = ALIASES[text.lower()]
    parts = _FIELD_SPLIT.findall(text)
    if len(parts) not in (5, 6):
        raise ValidationError(
            "cron",
            f"has {len(parts)} field(s); expected 5 (minute hour day-of-month month day-of-week)"
            " or 6 with a leading second field",
        )
    seconds = len(parts) == 6
    names = ((_SECOND_FIELD,) if seconds else ()) + _FIELDS
    for (name, _), value in zip(names, parts, strict=True):
        for item in value.split(","):
            if _HASHED.match(item):
                raise ValidationError(
                    "cron", f"{name} field {value!r}: hashed or random values (H, R) are not supported"
                )
            if _NEAREST_WEEKDAY.match(item):
                raise ValidationError("cron", f"{name} field {value!r}: W (nearest weekday) is not supported")
    fields = " ".join(parts)
    try:
        expanded, _ = croniter.expand(fields, second_at_beginning=seconds)
    except CroniterError:
        raise ValidationError("cron", _bad_field(parts, names)) from None
    _check_fires(expanded, text)
    return CronSpec(fields, seconds)


def _bad_field(parts: list[str], names: tuple[tuple[str, str], ...]) -> str:
    """Say which field croniter refused, by expanding each field alone (only on the error path)."""
    for i, (name, allowed) in enumerate(names):
        alone = " ".join(value if j == i else "*" for j, value in enumerate(parts))
        try:
            croniter.expand(alone, second_at_beginning=len(parts) == 6)
        except CroniterError:
            if re.search(r"/0+(?![0-9])", parts[i]):
                return f"{name} field {parts[i]!r}: a step must be at least 1"
            return f"{name} field {parts[i]!r} is not valid; it takes {allowed}, with * , - /"
    return f"{' '.join(parts)!r} is not a valid cron expression"


def _check_fires(expanded: list[list[int | str]], text: str) -> None:
    """Refuse a cron that never fires, decided from its fields rather than by searching.

    Only a restricted day-of-month with an unrestricted day-of-week can be
    impossible: every weekday occurs in every month (and a restricted weekday
    with a restricted day fires on either), and "L" exists in every month. So
    the cron never fires exactly when its smallest day is beyond the longest
    month it allows, counting February as 29 days (``30 2``, ``31 4``).
    """
    days, months, weekdays = expanded[2], expanded[3], expanded[4]
    if weekdays != ["*"] or days == ["*"] or "l" in days:
        return
    allowed = range(1, 13) if months == ["*"] else [int(m) for m in months]
    longest = max(_DAYS_IN_MONTH[m - 1] for m in allowed)
    first = min(int(d) for d in days)
    if first > longest:
        raise ValidationError("cron", f"{text!r} never fires: no month it allows has a day {first} or later")


def load_zone(name: object) -> zoneinfo.ZoneInfo:
    """The IANA zone ``name``, read from the ``tzdata`` package (see the module docstring for why).

    The host's zone files are used only for a name the package lacks. Zones
    are cached, so one name gives one object. They come from ``from_file``, so
    keep them out of pickles: store instants in UTC and the zone by name.
    """
    if not isinstance(name, str) or not name:
        raise ValidationError("timezone", "must be an IANA time zone name such as 'Europe/Paris'")
    if len(name) > 255 or not _ZONE_NAME.fullmatch(name):
        raise ValidationError("timezone", f"{name!r} is not an IANA time zone name such as 'Europe/Paris'")
    return _load_zone(name)


@functools.lru_cache(maxsize=1024)  # failures are not cached, so this holds real zones only
def _load_zone(name: str) -> zoneinfo.ZoneInfo:
    try:
        node = importlib.resources.files("tzdata.zoneinfo")
        for part in name.split("/"):
            node = node / part
        if node.is_file():
            with node.open("rb") as data:
                return zoneinfo.ZoneInfo.from_file(data, key=name)
    except ModuleNotFoundError:
        pass
    except ValueError:  # a data file of the package that is not a zone, such as "leapseconds"
        raise ValidationError("timezone", f"{name!r} is not a time zone") from None
    if _civil(name):
        try:
            return zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
            pass
    raise ValidationError("timezone", f"unknown time zone {name!r}{_suggest(name)}")


def _civil(name: str) -> bool:
    """False for host files that are no civil zone: "localtime" is this host's setting, "right/" counts leap seconds."""
    return name != "localtime" and not name.startswith("right/")


def _suggest(name: str) -> str:
    known = _known_zones()
    exact = {zone.lower(): zone for zone in known}.get(name.lower())
    close = [exact] if exact else difflib.get_close_matches(name, known, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


@functools.cache
def _known_zones() -> list[str]:
    return sorted(zone for zone in zoneinfo.available_timezones() if _civil(zone))


def next_fire_times(cron: str, timezone: str, after: datetime, n: int = 1) -> list[datetime]:
    """The first ``n`` slots of ``cron`` in ``timezone`` strictly after ``after``, as aware UTC datetimes.

    Slots strictly increase; the daylight-saving rule is in the module docstring.
    """
    after = _check_aware(after, "after")
    if not isinstance(cron, str) or not isinstance(timezone, str) or type(n) is not int:
        parse_cron(cron)  # raises ValidationError for cron, then the others for their fields
        load_zone(timezone)
        check_int(n, "n", 1, MAX_FIRE_TIMES)
    return list(_next_fire_times(cron, timezone, after, n))


# A pure function, and many schedules share a timetable and a due slot (thousands due in the
# same minute): remembering recent answers spares most of croniter's slow walk.
@functools.lru_cache(maxsize=4096)
def _next_fire_times(cron: str, timezone: str, after: datetime, n: int) -> tuple[datetime, ...]:
    return tuple(_compute_fire_times(cron, timezone, after, n))


def _compute_fire_times(cron: str, timezone: str, after: datetime, n: int) -> list[datetime]:
    spec = parse_cron(cron)
    zone = load_zone(timezone)
    after = _check_aware(after, "after")
    check_int(n, "n", 1, MAX_FIRE_TIMES)
    slots = _first_occurrences(spec, zone, after, n)
    if _wildcard_hour(spec):
        # The second passes of repeated hours come on top; the first n of both are the answer.
        slots = sorted({*slots, *_second_occurrences(spec, zone, after, slots[-1])})[:n]
    return slots


def _wildcard_hour(spec: CronSpec) -> bool:
    return spec.fields.split()[2 if spec.seconds else 1].startswith("*")


def _second_occurrences(spec: CronSpec, zone: zoneinfo.ZoneInfo, after: datetime, until: datetime) -> list[datetime]:
    """The second occurrence of every matching wall time of a repeated hour, in (after, until]."""
    found: list[datetime] = []
    # From a day before: `after` may lie in the second pass of a repeated hour. Offsets change at
    # most a few times a year and never twice within a day: a daily probe finds every fall-back
    # (its offset drops) with one bisection each.
    day = after - timedelta(days=1)
    offset = _offset(day.astimezone(zone))
    while day < until:
        following = min(day + timedelta(days=1), until)
        new = _offset(following.astimezone(zone))
        if new < offset:
            change = _transition(zone, day, following)
            first_wall = (change + new).replace(tzinfo=None)  # the repeated walls: [first_wall, + repeat)
            # Only the walls whose second occurrence lies in (after, until]: get_next is strictly after.
            walls = _walker(spec, max(first_wall - timedelta(seconds=1), (after + new).replace(tzinfo=None)))
            while (wall := walls.get_next(datetime)) < first_wall + (offset - new):
                slot = (wall - new).replace(tzinfo=UTC)
                if slot > until:
                    break
                found.append(slot)
        day, offset = following, new
    return found


def _first_occurrences(spec: CronSpec, zone: zoneinfo.ZoneInfo, after: datetime, n: int) -> list[datetime]:
    walls = _walker(spec, _first_wall(after, zone))
    slots: list[datetime] = []
    last = after
    # Every candidate yields a new slot (gaps are jumped over, a repeated hour is
    # skipped before the loop), so this bound is a guard, never a limit reached.
    for _ in range(2 * n + 8):
        try:
            wall = walls.get_next(datetime)
        except (CroniterError, OverflowError, ValueError):
            raise ValidationError("after", "the schedule has no slot left before the year 9999") from None
        slot, resume = _instant(wall, zone)
        if slot > last:
            slots.append(slot)
            last = slot
            if len(slots) == n:
                return slots
        if resume is not None:
            walls.set_current(resume, force=True)
    raise AssertionError(f"next_fire_times did not converge for {spec.fields!r} in {zone.key} after {after}")


@functools.lru_cache(maxsize=1024)
def _template(spec: CronSpec) -> croniter:
    return croniter(spec.fields, datetime(2000, 1, 1), ret_type=datetime, second_at_beginning=spec.seconds)


def _walker(spec: CronSpec, start: datetime) -> croniter:
    """A croniter at ``start``: a copy of a cached one, because building one expands every field
    again (most of the materializer's time with thousands of schedules)."""
    walker = copy.copy(_template(spec))
    walker.set_current(start, force=True)
    return walker


def _first_wall(after: datetime, zone: zoneinfo.ZoneInfo) -> datetime:
    """The naive wall time from which to search: later matches map to instants after ``after``.

    When ``after`` lies in the second pass of a repeated hour, the wall times
    still to come in that hour already fired in the first pass: start at the
    end of the repeated hour instead.
    """
    local = after.astimezone(zone)
    wall = local.replace(tzinfo=None, microsecond=0)
    if local.fold:
        repeat = _offset(local.replace(fold=0)) - _offset(local)
        change = _transition(zone, after - repeat, after)
        wall = (change + repeat).astimezone(zone).replace(tzinfo=None) - timedelta(seconds=1)
    return wall


def _instant(wall: datetime, zone: zoneinfo.ZoneInfo) -> tuple[datetime, datetime | None]:
    """Map a naive wall time to its slot, and the wall time to resume from after a gap (else None)."""
    before = _offset(wall.replace(tzinfo=zone))  # fold=0: the offset before a transition
    after = _offset(wall.replace(tzinfo=zone, fold=1))
    if before >= after:  # an ordinary time, or a repeated one: its first occurrence
        return (wall - before).replace(tzinfo=UTC), None
    # In a gap: the transition instant. Every wall time up to its new local time maps there too.
    change = _transition(zone, (wall - after).replace(tzinfo=UTC), (wall - before).replace(tzinfo=UTC))
    return change, change.astimezone(zone).replace(tzinfo=None)


def _transition(zone: zoneinfo.ZoneInfo, low: datetime, high: datetime) -> datetime:
    """The first whole second in (low, high] whose UTC offset differs from low's (bisection)."""
    lo, hi = math.floor(low.timestamp()), math.ceil(high.timestamp())
    old = _offset(datetime.fromtimestamp(lo, zone))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _offset(datetime.fromtimestamp(mid, zone)) == old:
            lo = mid
        else:
            hi = mid
    return datetime.fromtimestamp(hi, UTC)


def _offset(moment: datetime) -> timedelta:
    offset = moment.utcoffset()
    assert offset is not None, "a ZoneInfo always has an offset"
    return offset


def every_slots(every: timedelta, anchor: datetime, after: datetime, n: int = 1) -> list[datetime]:
    """The first ``n`` slots ``anchor + k * every`` (k >= 0) strictly after ``after``, as aware UTC datetimes.

    Intervals are elapsed time, so daylight saving does not move them.
    """
    if not isinstance(every, timedelta):
        raise ValidationError("every", f"must be a timedelta, not {type(every).__name__}")
    if not MIN_INTERVAL <= every <= MAX_INTERVAL:
        raise ValidationError("every", f"must be between {MIN_INTERVAL} and {MAX_INTERVAL.days} days, got {every}")
    anchor = _check_aware(anchor, "anchor")
    after = _check_aware(after, "after")
    check_int(n, "n", 1, MAX_FIRE_TIMES)
    first = max(0, (after - anchor) // every + 1)
    try:
        return [anchor + (first + k) * every for k in range(n)]
    except OverflowError:
        raise ValidationError("after", "the schedule has no slot left before the year 9999") from None


def _check_aware(value: object, field: str) -> datetime:
    if not isinstance(value, datetime):
        raise ValidationError(field, f"must be a datetime, not {type(value).__name__}")
    if value.utcoffset() is None:
        raise ValidationError(field, "must be timezone-aware (a naive datetime is ambiguous)")
    return value.astimezone(UTC)

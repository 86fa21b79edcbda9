"""Cron and interval schedules: parsing, time zones and the daylight-saving rule (pure functions)."""

from __future__ import annotations

import importlib.resources
import zoneinfo
from datetime import UTC, date, datetime, timedelta

import pytest
from croniter import croniter
from hypothesis import given, settings
from hypothesis import strategies as st

from pgsched.cron import ALIASES, MIN_INTERVAL, every_slots, load_zone, next_fire_times, parse_cron
from pgsched.errors import ValidationError

pytestmark = pytest.mark.unit

NEW_YORK = "America/New_York"
DST_ZONES = [
    NEW_YORK,
    "Europe/Paris",
    "Europe/London",
    "Australia/Sydney",
    "Australia/Lord_Howe",
    "Europe/Dublin",
    "America/Santiago",
    "America/Havana",
]
STEADY_ZONES = ["Asia/Kolkata", "Asia/Tokyo", "Asia/Kathmandu", "UTC", "Etc/GMT+5"]


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=UTC)


# The two cases of the issue, exactly.


def test_a_time_skipped_by_spring_forward_fires_once_at_the_transition() -> None:
    # 02:30 does not exist on 2026-03-08 in New York: clocks go from 02:00 EST to 03:00 EDT (07:00 UTC).
    assert next_fire_times("30 2 * * *", NEW_YORK, after=utc(2026, 3, 7, 12), n=3) == [
        utc(2026, 3, 8, 7, 0),
        utc(2026, 3, 9, 6, 30),
        utc(2026, 3, 10, 6, 30),
    ]


def test_a_time_repeated_by_fall_back_fires_once_at_its_first_occurrence() -> None:
    # 01:30 happens twice on 2026-11-01: 01:30 EDT (05:30 UTC), then 01:30 EST (06:30 UTC).
    slots = next_fire_times("30 1 * * *", NEW_YORK, after=utc(2026, 10, 31, 12), n=3)
    assert slots == [utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30), utc(2026, 11, 3, 6, 30)]
    assert utc(2026, 11, 1, 6, 30) not in slots
    # Asked from between the two occurrences, or from inside the second one, it does not fire again.
    for after in (utc(2026, 11, 1, 5, 30), utc(2026, 11, 1, 6), utc(2026, 11, 1, 6, 29, 59, 999999)):
        assert next_fire_times("30 1 * * *", NEW_YORK, after=after) == [utc(2026, 11, 2, 6, 30)]


@pytest.mark.parametrize(
    ("cron", "zone", "after", "expected"),
    [
        # Dublin's "negative DST": summer (IST, +1) is standard time in the source data.
        ("30 1 * * *", "Europe/Dublin", utc(2026, 3, 29), utc(2026, 3, 29, 1, 0)),
        ("30 1 * * *", "Europe/Dublin", utc(2026, 10, 25), utc(2026, 10, 25, 0, 30)),
        # Lord Howe moves its clocks by 30 minutes: 02:00 -> 02:30, and 02:00 -> 01:30.
        ("15 2 * * *", "Australia/Lord_Howe", utc(2026, 10, 3, 12), utc(2026, 10, 3, 15, 30)),
        ("45 1 * * *", "Australia/Lord_Howe", utc(2026, 4, 4, 12), utc(2026, 4, 4, 14, 45)),
        # Santiago and Havana change at midnight: midnight itself does not exist that day.
        ("0 0 * * *", "America/Santiago", utc(2026, 9, 5, 12), utc(2026, 9, 6, 4, 0)),
        ("30 23 * * *", "America/Santiago", utc(2026, 4, 4, 12), utc(2026, 4, 5, 2, 30)),
        ("0 0 * * *", "America/Havana", utc(2026, 3, 7, 12), utc(2026, 3, 8, 5, 0)),
        # Seconds: every wall second of the skipped hour collapses into one slot.
        ("* * 2 * * *", NEW_YORK, utc(2026, 3, 8, 6, 59, 59), utc(2026, 3, 8, 7, 0)),
    ],
)
def test_transitions_in_other_zones(cron: str, zone: str, after: datetime, expected: datetime) -> None:
    assert next_fire_times(cron, zone, after=after) == [expected]


def test_seconds_in_a_skipped_hour_fire_once_then_resume_after_it() -> None:
    slots = next_fire_times("*/20 * 2-3 * * *", NEW_YORK, after=utc(2026, 3, 8, 6, 59, 59), n=3)
    assert slots == [utc(2026, 3, 8, 7, 0, 0), utc(2026, 3, 8, 7, 0, 20), utc(2026, 3, 8, 7, 0, 40)]


def test_a_wildcard_hour_fires_in_both_passes_of_the_repeated_autumn_hour() -> None:
    """Vixie cron's rule for the hour field: on 2026-10-25 Paris repeats 02:00-03:00 (CEST, then CET)."""
    after = utc(2026, 10, 24, 23, 45)  # 01:45 CEST
    assert next_fire_times("*/30 * * * *", "Europe/Paris", after, n=6) == [
        utc(2026, 10, 25, 0, 0),  # 02:00 CEST
        utc(2026, 10, 25, 0, 30),  # 02:30 CEST
        utc(2026, 10, 25, 1, 0),  # 02:00 CET
        utc(2026, 10, 25, 1, 30),  # 02:30 CET
        utc(2026, 10, 25, 2, 0),  # 03:00 CET
        utc(2026, 10, 25, 2, 30),
    ]
    hourly = [utc(2026, 10, 25, h) for h in (0, 1, 2, 3)]  # no two-hour gap
    assert next_fire_times("0 * * * *", "Europe/Paris", after, n=4) == hourly
    assert next_fire_times("@hourly", "Europe/Paris", after, n=4) == hourly
    # A fixed hour runs once a day: at the first pass.
    assert next_fire_times("30 2 * * *", "Europe/Paris", after, n=2) == [
        utc(2026, 10, 25, 0, 30),
        utc(2026, 10, 26, 1, 30),
    ]
    assert next_fire_times("*/30 2 * * *", "Europe/Paris", after, n=3) == [
        utc(2026, 10, 25, 0, 0),
        utc(2026, 10, 25, 0, 30),
        utc(2026, 10, 26, 1, 0),
    ]
    # Asked from inside the second pass, a wildcard hour goes on with it.
    assert next_fire_times("*/30 * * * *", "Europe/Paris", utc(2026, 10, 25, 1, 10)) == [utc(2026, 10, 25, 1, 30)]


def test_seconds_asked_from_inside_a_repeated_hour_resume_after_it() -> None:
    # 06:30 UTC is 01:30 EST, the second pass of 01:00-02:00: with a fixed hour those wall seconds
    # already fired in the first pass; with a wildcard hour they fire again.
    assert next_fire_times("* * 1,2 * * *", NEW_YORK, after=utc(2026, 11, 1, 6, 30), n=2) == [
        utc(2026, 11, 1, 7, 0, 0),
        utc(2026, 11, 1, 7, 0, 1),
    ]
    assert next_fire_times("* * * * * *", NEW_YORK, after=utc(2026, 11, 1, 6, 30), n=2) == [
        utc(2026, 11, 1, 6, 30, 1),
        utc(2026, 11, 1, 6, 30, 2),
    ]


# Every slot around every transition of 2026-2027, checked against a minute-by-minute scan of UTC.

SCANNED_CRONS = [
    *("0 * * * *", "*/15 * * * *", "0 */2 * * *", "*/20 1 * * *"),
    *("30 2 * * *", "30 1 * * *", "0 0 * * *", "45 23 * * *"),
]


def _transitions(zone: zoneinfo.ZoneInfo) -> list[datetime]:
    """Instants of 2026-2027 where the zone's UTC offset changes (all at whole minutes)."""
    found = []
    hour = utc(2026, 1, 1)
    while hour < utc(2028, 1, 1):
        if hour.astimezone(zone).utcoffset() != (hour + timedelta(hours=1)).astimezone(zone).utcoffset():
            minute = hour
            while minute.astimezone(zone).utcoffset() == hour.astimezone(zone).utcoffset():
                minute += timedelta(minutes=1)
            found.append(minute)
        hour += timedelta(hours=1)
    return found


def _scan(
    zone: zoneinfo.ZoneInfo, start: datetime, end: datetime
) -> list[tuple[datetime, datetime, bool, list[datetime]]]:
    """Each UTC minute of [start, end] with its wall time, whether that is the wall time's second
    occurrence, and the wall times skipped by a gap that ends at it."""
    minutes = []
    moment = start
    while moment <= end:
        local = moment.astimezone(zone)
        skipped = local.utcoffset() - (moment - timedelta(minutes=1)).astimezone(zone).utcoffset()  # type: ignore[operator]
        wall = local.replace(tzinfo=None)
        gap = [wall - skipped + timedelta(minutes=i) for i in range(int(skipped / timedelta(minutes=1)))]
        minutes.append((moment, wall, bool(local.fold), gap))
        moment += timedelta(minutes=1)
    return minutes


def _expected(cron: str, scan: list[tuple[datetime, datetime, bool, list[datetime]]]) -> list[datetime]:
    """The rule, stated over instants: a minute fires if its wall time matches on its first occurrence
    (on its second too when the hour field is a wildcard), or if it ends a gap in which some skipped
    wall time matches."""
    minutes, hours = (set(values) for values in croniter.expand(cron)[0][:2])
    wildcard_hour = cron.split()[1].startswith("*")

    def matches(wall: datetime) -> bool:
        return ("*" in minutes or wall.minute in minutes) and ("*" in hours or wall.hour in hours)

    return [
        moment
        for moment, wall, second, gap in scan
        if (matches(wall) and (wildcard_hour or not second)) or any(map(matches, gap))
    ]


@pytest.mark.parametrize("zone_name", [*DST_ZONES, "Asia/Kolkata"])
def test_every_slot_around_every_transition(zone_name: str) -> None:
    zone = load_zone(zone_name)
    transitions = _transitions(zone)
    if zone_name == "Asia/Kolkata":
        assert transitions == []
    else:
        assert len(transitions) >= 2, "the scan must meet real transitions"
    centers = transitions or [utc(2026, 3, 29, 1), utc(2026, 10, 25, 1)]
    for center in centers:
        start, end = center - timedelta(hours=26), center + timedelta(hours=26)
        scan = _scan(zone, start, end)
        for cron in SCANNED_CRONS:
            expected = _expected(cron, scan)
            slots = next_fire_times(cron, zone_name, after=start - timedelta(microseconds=1), n=len(expected) + 1)
            assert slots[:-1] == expected, (cron, center)
            assert slots[-1] > end
            # Starting anywhere near the transition, including inside a repeated hour, continues the same series.
            for minutes in range(-150, 150, 10):
                after = center + timedelta(minutes=minutes, seconds=1)
                rest = [slot for slot in expected if slot > after][:4]
                assert next_fire_times(cron, zone_name, after=after, n=len(rest) or 1)[: len(rest)] == rest


def test_lord_howe_shift_is_half_an_hour() -> None:
    zone = load_zone("Australia/Lord_Howe")
    shifts = {
        abs(moment.astimezone(zone).utcoffset() - (moment - timedelta(minutes=1)).astimezone(zone).utcoffset())  # type: ignore[operator]
        for moment in _transitions(zone)
    }
    assert shifts == {timedelta(minutes=30)}


# A property over many crons, zones and start instants.

PROPERTY_CRONS = [
    "0 * * * *",
    "*/15 * * * *",
    "30 2 * * *",
    "30 1 * * *",
    "0 0 * * *",
    "*/7 1-3 * * *",
    "0 9 * * mon-fri",
    "15,45 0-3 * * 0",
    "0 0 1 * *",
    "0 12 L * *",
    "0 0 29 2 *",
    "0 30 2 * * *",
    "*/30 * 1-2 * * *",
    "@hourly",
]


def _is_match(cron: str, wall: datetime) -> bool:
    spec = parse_cron(cron)
    found = croniter(spec.fields, wall - timedelta(seconds=1), second_at_beginning=spec.seconds).get_next(datetime)
    return bool(found == wall)


def _gap_ends_at(slot: datetime, zone: zoneinfo.ZoneInfo, cron: str) -> bool:
    """True if clocks jump forward at ``slot`` and a wall time of the cron lies in the skipped span."""
    before = (slot - timedelta(seconds=1)).astimezone(zone)
    after = slot.astimezone(zone)
    if not before.utcoffset() < after.utcoffset():  # type: ignore[operator]
        return False
    gap_start = (slot.replace(tzinfo=None) + before.utcoffset()) - timedelta(seconds=1)  # type: ignore[operator]
    spec = parse_cron(cron)
    first = croniter(spec.fields, gap_start, second_at_beginning=spec.seconds).get_next(datetime)
    return bool(first < after.replace(tzinfo=None))


@settings(max_examples=300, deadline=None)
@given(
    cron=st.sampled_from(PROPERTY_CRONS),
    zone_name=st.sampled_from(DST_ZONES + STEADY_ZONES),
    after=st.datetimes(min_value=datetime(2026, 1, 1), max_value=datetime(2028, 12, 31), timezones=st.just(UTC)),
    n=st.integers(min_value=1, max_value=12),
)
def test_slots_are_matches_or_gap_ends(cron: str, zone_name: str, after: datetime, n: int) -> None:
    zone = load_zone(zone_name)
    slots = next_fire_times(cron, zone_name, after=after, n=n)
    assert len(slots) == n
    assert all(slot.tzinfo is UTC for slot in slots)
    assert all(earlier < later for earlier, later in zip([after, *slots], slots, strict=False))
    for slot in slots:
        local = slot.astimezone(zone)
        on_first_occurrence = local.fold == 0 and _is_match(cron, local.replace(tzinfo=None))
        assert on_first_occurrence or _gap_ends_at(slot, zone, cron), (slot, local)
    if zone_name in STEADY_ZONES:
        spec = parse_cron(cron)
        plain = croniter(spec.fields, after.astimezone(zone), second_at_beginning=spec.seconds)
        assert slots == [plain.get_next(datetime).astimezone(UTC) for _ in range(n)]


# Parsing: aliases, seconds, refusals.


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_aliases_mean_their_expansion(alias: str) -> None:
    after = utc(2026, 5, 17, 10, 11)
    assert next_fire_times(alias.upper(), "Europe/Paris", after, n=3) == next_fire_times(
        ALIASES[alias], "Europe/Paris", after, n=3
    )


def test_aliases_fire_where_expected() -> None:
    after = utc(2026, 5, 17, 10, 11)  # a Sunday, 12:11 in Paris
    assert next_fire_times("@hourly", "UTC", after) == [utc(2026, 5, 17, 11)]
    assert next_fire_times("@daily", "Europe/Paris", after) == [utc(2026, 5, 17, 22)]
    assert next_fire_times("@weekly", "UTC", after) == [utc(2026, 5, 24)]
    assert next_fire_times("@monthly", "UTC", after) == [utc(2026, 6, 1)]
    assert next_fire_times("@yearly", "UTC", after) == [utc(2027, 1, 1)]


def test_a_sixth_field_is_a_leading_seconds_field() -> None:
    assert parse_cron("30 0 9 * * *").seconds
    assert next_fire_times("30 0 9 * * *", "Asia/Tokyo", utc(2026, 1, 1)) == [utc(2026, 1, 1, 0, 0, 30)]
    assert next_fire_times("*/10 * * * * *", "UTC", utc(2026, 1, 1, 0, 0, 5), n=3) == [
        utc(2026, 1, 1, 0, 0, 10),
        utc(2026, 1, 1, 0, 0, 20),
        utc(2026, 1, 1, 0, 0, 30),
    ]


@pytest.mark.parametrize(
    "cron",
    ["0 0 30 2 1", "0 0 29 2 *", "0 0 L 2 *", "0 0 31 1-3 *", "0 0 31 * *", "0 9 * 2 1#5", "0 0 30 2 0-6"],
)
def test_rare_crons_are_accepted(cron: str) -> None:
    # Restricted day and weekday fire on either (standard cron), so "30 Feb or a Monday" fires.
    parse_cron(cron)
    assert len(next_fire_times(cron, "UTC", utc(2026, 1, 1), n=3)) == 3


@pytest.mark.parametrize(
    ("cron", "words"),
    [
        ("61 * * * *", "minute field '61'"),
        ("0 24 * * *", "hour field '24'"),
        ("0 0 0 * *", "day-of-month field '0'"),
        ("0 0 * 13 *", "month field '13'"),
        ("0 0 * * 8", "day-of-week field '8'"),
        ("61 0 0 * * *", "second field '61'"),
        ("*/0 * * * *", "step must be at least 1"),
        ("0 */00 * * *", "step must be at least 1"),
        ("* * *", "has 3 field(s)"),
        ("1 2 3 4 5 6 7", "has 7 field(s)"),
        ("", "has 0 field(s)"),
        ("   ", "has 0 field(s)"),
        ("garbage", "has 1 field(s)"),
        ("a b c d e", "minute field 'a'"),
        ("0\u00a00 * * * *", "minute field"),
        ("0 0 30 2 *", "never fires"),
        ("0 0 31 4 *", "never fires"),
        ("0 0 30,31 2 *", "never fires"),
        ("0 0 0 31 2,4,6 *", "never fires"),
        ("@reboot", "unknown alias"),
        ("@often", "unknown alias"),
        ("H * * * *", "hashed or random"),
        ("R 0 * * *", "hashed or random"),
        ("0 0 15W * *", "W (nearest weekday)"),
        ("0 0 " + ",".join(["1"] * 200) + " * *", "at most 200 characters"),
    ],
)
def test_bad_cron_is_refused_naming_the_field(cron: str, words: str) -> None:
    with pytest.raises(ValidationError) as caught:
        next_fire_times(cron, "UTC", utc(2026, 1, 1))
    assert caught.value.field == "cron"
    assert words in caught.value.message


def test_cron_must_be_text() -> None:
    with pytest.raises(ValidationError) as caught:
        parse_cron(5)
    assert caught.value.field == "cron"


# Time zones.


@pytest.mark.parametrize(
    "name",
    [
        "",
        "Mars/Olympus_Mons",
        "../../etc/passwd",
        "America/../Europe/Paris",
        "/usr/share/zoneinfo/UTC",
        "Europe/Paris/",
        "America",
        "leapseconds",
        "zone.tab",
        "localtime",
        "right/UTC",
        "Europe\\Paris",
        "x" * 300,
        None,
        3,
    ],
)
def test_unknown_time_zones_are_refused(name: object) -> None:
    with pytest.raises(ValidationError) as caught:
        load_zone(name)
    assert caught.value.field == "timezone"
    with pytest.raises(ValidationError) as caught:
        next_fire_times("0 * * * *", name, utc(2026, 1, 1))  # type: ignore[arg-type]
    assert caught.value.field == "timezone"


def test_a_wrong_case_zone_name_gets_a_suggestion() -> None:
    with pytest.raises(ValidationError, match="did you mean 'America/New_York'"):
        load_zone("america/new_york")


def test_zones_come_from_the_tzdata_package_and_are_cached() -> None:
    zone = load_zone("America/Havana")
    assert zone is load_zone("America/Havana")
    assert str(zone) == "America/Havana"
    with (importlib.resources.files("tzdata.zoneinfo") / "America" / "Havana").open("rb") as data:
        packaged = zoneinfo.ZoneInfo.from_file(data)
    # Cuba's late-2026 rules differ between tzdata releases (2025b on Debian 12, 2026f in the package).
    for moment in (utc(2026, 6, 1), utc(2026, 11, 15), utc(2027, 1, 15)):
        assert moment.astimezone(zone).utcoffset() == moment.astimezone(packaged).utcoffset()


def test_link_names_are_zones_too() -> None:
    assert next_fire_times("0 9 * * *", "US/Eastern", utc(2026, 7, 1)) == [utc(2026, 7, 1, 13)]


# Other arguments.


@pytest.mark.parametrize(
    ("after", "n", "field"),
    [
        (datetime(2026, 1, 1), 1, "after"),
        (date(2026, 1, 1), 1, "after"),
        ("2026-01-01T00:00:00Z", 1, "after"),
        (utc(2026, 1, 1), 0, "n"),
        (utc(2026, 1, 1), 1001, "n"),
        (utc(2026, 1, 1), True, "n"),
        (utc(2026, 1, 1), 2.0, "n"),
    ],
)
def test_bad_after_and_n_are_refused(after: object, n: object, field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        next_fire_times("0 * * * *", "UTC", after, n)  # type: ignore[arg-type]
    assert caught.value.field == field


def test_after_may_be_in_any_zone_and_n_up_to_1000() -> None:
    paris = datetime(2026, 1, 1, 1, 0, tzinfo=load_zone("Europe/Paris"))
    assert next_fire_times("0 * * * *", "UTC", paris) == [utc(2026, 1, 1, 1)]
    slots = next_fire_times("* * * * * *", NEW_YORK, utc(2026, 11, 1, 5, 50), n=1000)
    assert len(set(slots)) == 1000
    assert slots[-1] == utc(2026, 11, 1, 6, 6, 40)  # 01:50:01-01:59:59 EDT, then 01:00:00 EST on (wildcard hour)


def test_no_slot_before_the_end_of_the_calendar_is_a_clear_error() -> None:
    for cron in ("0 0 29 2 *", "* * * * *"):
        with pytest.raises(ValidationError) as caught:
            next_fire_times(cron, "UTC", utc(9999, 12, 31, 23, 59), n=5)
        assert caught.value.field == "after"


# Interval schedules.


def test_every_slots_follow_the_anchor() -> None:
    anchor = utc(2026, 1, 1, 12)
    every = timedelta(seconds=30)
    assert every_slots(every, anchor, after=utc(2026, 1, 1, 12, 1, 10), n=3) == [
        utc(2026, 1, 1, 12, 1, 30),
        utc(2026, 1, 1, 12, 2),
        utc(2026, 1, 1, 12, 2, 30),
    ]
    # Strictly after: a slot equal to ``after`` is not returned; before the anchor, the anchor comes first.
    assert every_slots(every, anchor, after=utc(2026, 1, 1, 12, 1)) == [utc(2026, 1, 1, 12, 1, 30)]
    assert every_slots(every, anchor, after=utc(2025, 6, 1)) == [anchor]


def test_every_slots_are_elapsed_time_across_daylight_saving() -> None:
    anchor = datetime(2026, 11, 1, 0, 0, tzinfo=load_zone(NEW_YORK))
    slots = every_slots(timedelta(hours=1), anchor, after=anchor, n=4)
    assert slots == [utc(2026, 11, 1, 5), utc(2026, 11, 1, 6), utc(2026, 11, 1, 7), utc(2026, 11, 1, 8)]
    assert all(slot.tzinfo is UTC for slot in slots)


@pytest.mark.parametrize(
    ("every", "anchor", "after", "n", "field"),
    [
        (timedelta(0), utc(2026, 1, 1), utc(2026, 1, 1), 1, "every"),
        (MIN_INTERVAL - timedelta(microseconds=1), utc(2026, 1, 1), utc(2026, 1, 1), 1, "every"),
        (timedelta(seconds=-5), utc(2026, 1, 1), utc(2026, 1, 1), 1, "every"),
        (timedelta(days=366 * 101), utc(2026, 1, 1), utc(2026, 1, 1), 1, "every"),
        (30, utc(2026, 1, 1), utc(2026, 1, 1), 1, "every"),
        (timedelta(seconds=1), datetime(2026, 1, 1), utc(2026, 1, 1), 1, "anchor"),
        (timedelta(seconds=1), utc(2026, 1, 1), datetime(2026, 1, 1), 1, "after"),
        (timedelta(seconds=1), utc(2026, 1, 1), utc(2026, 1, 1), 0, "n"),
        (timedelta(days=1), utc(9999, 12, 30), utc(9999, 12, 30), 5, "after"),
    ],
)
def test_bad_intervals_are_refused(every: object, anchor: object, after: object, n: int, field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        every_slots(every, anchor, after, n)  # type: ignore[arg-type]
    assert caught.value.field == field


def test_the_minimum_interval_is_allowed() -> None:
    assert every_slots(MIN_INTERVAL, utc(2026, 1, 1), utc(2026, 1, 1), n=2) == [
        utc(2026, 1, 1, 0, 0, 1),
        utc(2026, 1, 1, 0, 0, 2),
    ]

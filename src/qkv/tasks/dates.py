"""``dates``: a date as people write it in many locales -> ISO 8601 (``"2026-11-28"``).

Every source string is rendered by Babel from the Unicode CLDR date formats: the ``short``,
``medium``, ``long`` and ``full`` format of each locale (``"11/28/26"``, ``"28 nov. 2026"``,
``"28. listopadu 2026"``, ``"2026年11月28日土曜日"``). Training and validation use the *seen*
locales; a set of *held-out* locales is rendered for a harder test of generalisation.

The mapping is a function. Dates run over ``years`` consecutive years (default 1950-2049),
so a two-digit year stands for one year. Day/month order still collides across locales:
``"1/2/26"`` is 2 January 2026 in ``en_US`` (``M/d/yy``) and 1 February 2026 in ``id_ID``
(``d/M/yy``). No model can know which is meant, so :class:`DatesTask` enumerates every
string of every locale, format and date of the range (seen and held-out locales together)
and drops each string that stands for two or more dates, in every locale that produces it.
What remains maps each input to exactly one ISO date; ``tests/test_tasks.py`` re-checks this
by enumeration.

Rendering: ``babel.dates.format_date`` costs ~8 µs a call, and the enumeration needs
millions of strings. A CLDR pattern is literal text and fields (``d``, ``MMMM``, ``yy``,
``EEEE``...), and Babel renders each field from one component of the date (day, month,
year, weekday). :class:`Renderer` asks Babel for each field's text once per value of its
component and joins them with the pattern's literals: the same strings as ``format_date``
(checked against it on construction and, over many dates, by the tests), about 100x faster.

Splits are by date: a date is in the validation split when a stable hash of its ISO form
falls in the lowest ``valid_percent`` buckets, so no validation date - in any locale or
format - is ever seen in training. Held-out locales are sampled on validation dates.
"""

from __future__ import annotations

import calendar
import datetime as _dt
import re
from functools import lru_cache

import numpy as np

from .base import Example, Task, bucket

__all__ = ["FORMATS", "HELDOUT_LOCALES", "SEEN_LOCALES", "DatesTask", "Renderer"]

FORMATS = ("short", "medium", "long", "full")

SEEN_LOCALES = (
    "en_US", "en_GB", "fr_FR", "de_DE", "es_ES", "it_IT", "pt_BR", "nl_NL", "sv_SE", "da_DK",
    "pl_PL", "cs_CZ", "ro_RO", "hu_HU", "fi_FI", "tr_TR", "id_ID", "vi_VN", "ru_RU", "uk_UA",
    "el_GR", "ja_JP", "zh_CN", "ko_KR",
)
#: Regional variants and close relatives of seen languages, in formats never trained on.
HELDOUT_LOCALES = ("en_AU", "en_CA", "fr_CA", "de_AT", "es_MX", "pt_PT", "nl_BE", "nb_NO")

_FIELD = re.compile(r"%\((\w+)\)s")
# Which component of the date each CLDR pattern letter reads.
_COMPONENT = {"d": "day", "M": "month", "L": "month", "y": "year", "G": "year",
              "E": "weekday", "c": "weekday", "e": "weekday"}


class Renderer:
    """Renders dates in one locale and one CLDR format, exactly as ``format_date`` does.

    ``render(date)`` for one date; ``render_ordinals(ordinals)`` for many at once (an object
    array of strings). Raises ValueError for a pattern field that depends on more than one
    component of the date (week of year, day of year...), which this scheme cannot render.
    """

    def __init__(self, locale: str, fmt: str, *, first_year: int = 1950,
                 last_year: int = 2049) -> None:
        from babel import Locale, UnknownLocaleError
        from babel.dates import DateTimeFormat, get_date_format

        if fmt not in FORMATS:
            raise ValueError(f"date format must be one of {FORMATS}; got {fmt!r}")
        try:
            self.locale = Locale.parse(locale)
        except (UnknownLocaleError, ValueError, TypeError) as e:
            raise ValueError(f"unknown locale {locale!r} ({e}); use a CLDR locale id such as "
                             "'fr_FR'") from None
        self.name, self.fmt = str(locale), fmt
        self.first_year, self.last_year = first_year, last_year
        pattern = get_date_format(fmt, locale=self.locale)
        self.pattern = pattern.pattern
        parts = _FIELD.split(pattern.format)  # [literal, field, literal, field, ..., literal]
        self.literals = [p.replace("%%", "%") for p in parts[0::2]]
        self.fields = parts[1::2]
        self.tables: list[np.ndarray] = []  # per field: object array indexed by component
        self.components: list[str] = []
        for field in self.fields:
            comp = _COMPONENT.get(field[0])
            if comp is None:
                raise ValueError(f"locale {locale} format {fmt} uses the field {field!r} "
                                 f"(pattern {self.pattern!r}), which depends on more than one "
                                 "part of the date; this renderer supports d, M/L, y, G, E/c/e")
            reps = _representatives(comp, first_year, last_year)
            table = np.empty(max(reps) + 1, dtype=object)  # None outside the year range
            for value, date in reps.items():
                table[value] = DateTimeFormat(date, self.locale)[field]
            self.tables.append(table)
            self.components.append(comp)
        leap = next((y for y in range(first_year, last_year + 1) if calendar.isleap(y)),
                    first_year)
        checks = (_dt.date(first_year, 1, 1), _dt.date(leap, 2, 28 + calendar.isleap(leap)),
                  _dt.date(last_year, 12, 31))
        for date in checks:
            got, want = self.render(date), _babel(date, fmt, self.locale)
            if got != want:
                raise RuntimeError(f"Renderer({locale}, {fmt}) gave {got!r} for {date}, Babel "
                                   f"gives {want!r}; the pattern {self.pattern!r} has a field "
                                   "whose text depends on more than its own component")

    def __repr__(self) -> str:
        return f"Renderer({self.name!r}, {self.fmt!r}: {self.pattern!r})"

    def render(self, date: _dt.date) -> str:
        if not self.first_year <= date.year <= self.last_year:
            raise ValueError(f"{date} is outside the years {self.first_year}..{self.last_year} "
                             "of this renderer")
        comps = {"day": date.day, "month": date.month, "year": date.year,
                 "weekday": date.weekday()}
        out = [self.literals[0]]
        for table, comp, lit in zip(self.tables, self.components, self.literals[1:],
                                    strict=True):
            out.append(table[comps[comp]])
            out.append(lit)
        return "".join(out)

    def render_ordinals(self, ordinals: np.ndarray) -> np.ndarray:
        """Object array of the strings of the dates with these proleptic ordinals."""
        comps = _components(tuple(int(o) for o in ordinals[[0, -1]]), len(ordinals)) \
            if _is_range(ordinals) else _components_of(ordinals)
        out = np.full(len(ordinals), self.literals[0], dtype=object)  # (N,)
        for table, comp, lit in zip(self.tables, self.components, self.literals[1:],
                                    strict=True):
            out = out + table[comps[comp]]  # (N,) elementwise str concatenation
            if lit:
                out = out + lit
        return out


def _babel(date: _dt.date, fmt: str, locale) -> str:
    from babel.dates import format_date

    return format_date(date, fmt, locale=locale)


def _representatives(comp: str, first_year: int, last_year: int) -> dict[int, _dt.date]:
    """One date for each value of a component (index = value), all other parts fixed."""
    if comp == "day":
        return {d: _dt.date(2001, 1, d) for d in range(1, 32)}
    if comp == "month":
        return {m: _dt.date(2001, m, 1) for m in range(1, 13)}
    if comp == "year":
        return {y: _dt.date(y, 1, 1) for y in range(first_year, last_year + 1)}
    base = _dt.date(2001, 1, 1)  # a Monday: weekday() == 0
    return {w: base + _dt.timedelta(days=w) for w in range(7)}


def _is_range(ordinals: np.ndarray) -> bool:
    return len(ordinals) > 1 and int(ordinals[-1]) - int(ordinals[0]) == len(ordinals) - 1 \
        and bool((np.diff(ordinals) == 1).all())


@lru_cache(maxsize=8)
def _components(first_last: tuple[int, int], n: int) -> dict[str, np.ndarray]:
    return _components_of(np.arange(first_last[0], first_last[1] + 1))


def _components_of(ordinals: np.ndarray) -> dict[str, np.ndarray]:
    dates = [_dt.date.fromordinal(int(o)) for o in ordinals]
    return {
        "day": np.fromiter((d.day for d in dates), dtype=np.int64, count=len(dates)),
        "month": np.fromiter((d.month for d in dates), dtype=np.int64, count=len(dates)),
        "year": np.fromiter((d.year for d in dates), dtype=np.int64, count=len(dates)),
        "weekday": np.fromiter((d.weekday() for d in dates), dtype=np.int64, count=len(dates)),
    }


@lru_cache(maxsize=4)
def _enumerate(locales: tuple[str, ...], first_year: int, last_year: int
               ) -> tuple[list[Renderer], frozenset[str]]:
    """Renderers of every (locale, format) and the strings that stand for >= 2 dates."""
    renderers = [Renderer(loc, fmt, first_year=first_year, last_year=last_year)
                 for loc in locales for fmt in FORMATS]
    ordinals = np.arange(_dt.date(first_year, 1, 1).toordinal(),
                         _dt.date(last_year, 12, 31).toordinal() + 1)  # (N,)
    first_date: dict[str, int] = {}
    ambiguous: set[str] = set()
    seen_patterns: set[tuple] = set()
    for r in renderers:
        key = (tuple(r.literals), tuple(r.fields), tuple(tuple(t) for t in r.tables))
        if key in seen_patterns:  # identical strings for identical dates: nothing new
            continue
        seen_patterns.add(key)
        for s, o in zip(r.render_ordinals(ordinals).tolist(), ordinals.tolist(), strict=True):
            prev = first_date.setdefault(s, o)
            if prev != o:
                ambiguous.add(s)
    return renderers, frozenset(ambiguous)


@lru_cache(maxsize=4)
def _format_patterns(locales: tuple[str, ...], first_year: int, last_year: int
                     ) -> tuple[tuple[re.Pattern, tuple[frozenset[str], ...]], ...]:
    """One regular expression per distinct (locale, format) of ``locales``, with the texts
    each of its number fields may take. Names (months, weekdays, eras) are spelled out in
    the expression; a number field is a group of digits whose text is checked against its
    set after a match (a regex alternation of 100 years is slow to compile). Whitespace
    matches any whitespace (CLDR uses no-break spaces that nobody types)."""
    def literal(text: str) -> str:
        return "".join(r"\s" if c.isspace() else re.escape(c) for c in text)

    patterns: dict[tuple[str, tuple[frozenset[str], ...]], None] = {}
    for loc in locales:
        for fmt in FORMATS:
            r = Renderer(loc, fmt, first_year=first_year, last_year=last_year)
            parts, numbers = [literal(r.literals[0])], []
            for table, lit in zip(r.tables, r.literals[1:], strict=True):
                texts = sorted({t for t in table.tolist() if t is not None}, key=len,
                               reverse=True)
                if all(t.isdigit() and t.isascii() for t in texts):
                    parts.append(rf"(\d{{{len(texts[-1])},{len(texts[0])}}})")
                    numbers.append(frozenset(texts))
                else:
                    parts.append("(?:" + "|".join(literal(t) for t in texts) + ")")
                parts.append(literal(lit))
            patterns.setdefault(("".join(parts), tuple(numbers)))  # d/M/y and M/d/y differ
    compiled = {p: re.compile(p) for p, _ in patterns}
    return tuple((compiled[p], numbers) for p, numbers in patterns)


def _is_rendering(text: str, patterns) -> bool:
    for pattern, numbers in patterns:
        m = pattern.fullmatch(text)
        if m and all(g in allowed for g, allowed in zip(m.groups(), numbers, strict=True)):
            return True
    return False


class DatesTask(Task):
    """Dates in CLDR formats of many locales -> ISO 8601. See the module docstring.

    Args:
        locales: the seen locales (train and valid splits); at least one.
        heldout: locales never trained on (the ``heldout`` split, on validation dates).
        first_year: the first year of the range.
        years: how many consecutive years (at most 100, so two-digit years are unique).
        valid_percent: the share of dates (by a stable hash) kept for validation.
    """

    name = "dates"
    splits = ("train", "valid", "heldout")

    def __init__(self, *, locales: tuple[str, ...] | list[str] = SEEN_LOCALES,
                 heldout: tuple[str, ...] | list[str] = HELDOUT_LOCALES,
                 first_year: int = 1950, years: int = 100, valid_percent: int = 5) -> None:
        locales, heldout = tuple(locales), tuple(heldout)
        if not locales:
            raise ValueError("dates needs at least one seen locale")
        both = set(locales) & set(heldout)
        if both:
            raise ValueError(f"locales {sorted(both)} are both seen and held out; a held-out "
                             "locale must never be trained on")
        if isinstance(years, bool) or not isinstance(years, int) or not 1 <= years <= 100:
            raise ValueError(f"years must be an int in 1..100 (two-digit years must stand for "
                             f"one year); got {years!r}")
        if isinstance(first_year, bool) or not isinstance(first_year, int) or not (
            1 <= first_year <= 9999 - years + 1
        ):
            raise ValueError(f"first_year must be an int in 1..{9999 - years + 1}; got "
                             f"{first_year!r}")
        if isinstance(valid_percent, bool) or not isinstance(valid_percent, int) or not (
            0 < valid_percent < 100
        ):
            raise ValueError(f"valid_percent must be an int in 1..99; got {valid_percent!r}")
        self.locales, self.heldout = locales, heldout
        self.first_year, self.years, self.valid_percent = first_year, years, valid_percent
        self.first = _dt.date(first_year, 1, 1).toordinal()
        self.last = _dt.date(first_year + years - 1, 12, 31).toordinal()
        renderers, self.ambiguous = _enumerate(locales + heldout, first_year,
                                               first_year + years - 1)
        self.seen_renderers = renderers[: 4 * len(locales)]
        self.heldout_renderers = renderers[4 * len(locales) :]
        ords = np.arange(self.first, self.last + 1)
        is_valid = np.array([self._date_split(o) == "valid" for o in ords.tolist()])
        self.train_ordinals, self.valid_ordinals = ords[~is_valid], ords[is_valid]

    def options(self) -> dict:
        return {"locales": list(self.locales), "heldout": list(self.heldout),
                "first_year": self.first_year, "years": self.years,
                "valid_percent": self.valid_percent}

    @property
    def renderers(self) -> list[Renderer]:
        return self.seen_renderers + self.heldout_renderers

    @property
    def max_target_len(self) -> int:
        return 10  # YYYY-MM-DD

    def alphabet(self) -> set[str]:
        chars = set("0123456789-")
        for r in self.renderers:
            for lit in r.literals:
                chars.update(lit)
            for table in r.tables:
                for text in table:
                    if text is not None:
                        chars.update(text)
        return chars

    @classmethod
    def input_problem(cls, text: str, *, locales=SEEN_LOCALES, heldout=HELDOUT_LOCALES,
                      first_year: int = 1950, years: int = 100, **_options) -> str | None:
        every = tuple(locales) + tuple(heldout)
        last_year = first_year + years - 1
        patterns = _format_patterns(every, first_year, last_year)
        if _is_rendering(text.strip(), patterns):
            return None
        return (f"it is not written like any date of the task (the CLDR short, medium, long "
                f"and full formats of {len(every)} locales, years {first_year}-{last_year}, "
                "e.g. '28 novembre 2026', 'Nov 28, 2026', '28.11.26')")

    def _date_split(self, ordinal: int) -> str:
        iso = _dt.date.fromordinal(ordinal).isoformat()
        return "valid" if bucket(iso) < self.valid_percent else "train"

    def split_of_date(self, date: _dt.date) -> str:
        """``"valid"`` or ``"train"``: the split of every string that renders ``date``."""
        return self._date_split(date.toordinal())

    def sample(self, rng: np.random.Generator, n: int, *, split: str = "train") -> list[Example]:
        self._check_split(split)
        renderers = self.heldout_renderers if split == "heldout" else self.seen_renderers
        if not renderers:
            raise ValueError(f"task {self.name!r} has no {split} locales")
        ordinals = self.train_ordinals if split == "train" else self.valid_ordinals
        out: list[Example] = []
        while len(out) < n:
            k = n - len(out)
            ri = rng.integers(0, len(renderers), size=k)  # (k,)
            di = rng.integers(0, len(ordinals), size=k)  # (k,)
            for r, d in zip(ri.tolist(), di.tolist(), strict=True):
                date = _dt.date.fromordinal(int(ordinals[d]))
                src = renderers[r].render(date)
                if src not in self.ambiguous:
                    out.append((src, date.isoformat()))
        return out

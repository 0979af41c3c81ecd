"""Tasks: Babel-rendered dates are a function over the whole range, splits never overlap,
generators are deterministic, the tokenizer round-trips every string of a task."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
from babel.dates import format_date

from qkv.tasks import BOS, EOS, PAD, CharTokenizer, get_task
from qkv.tasks.dates import FORMATS, HELDOUT_LOCALES, SEEN_LOCALES, DatesTask, Renderer


@pytest.fixture(scope="module")
def dates() -> DatesTask:
    return get_task("dates")


def test_dates_task_has_20_seen_locales_all_formats_and_heldout(dates):
    assert len(set(dates.locales)) >= 20
    assert set(dates.locales) == set(SEEN_LOCALES)
    assert set(dates.heldout) == set(HELDOUT_LOCALES) and len(dates.heldout) >= 5
    assert not set(dates.locales) & set(dates.heldout)
    assert {(r.name, r.fmt) for r in dates.seen_renderers} == {
        (loc, f) for loc in dates.locales for f in FORMATS}


def test_renderer_equals_babel_format_date(dates):
    """The fast renderer gives exactly ``babel.dates.format_date``'s string."""
    rng = np.random.default_rng(0)
    ords = rng.integers(dates.first, dates.last + 1, size=60)
    edge = [dt.date(1950, 1, 1), dt.date(1999, 12, 31), dt.date(2000, 1, 1),
            dt.date(2000, 2, 29), dt.date(2049, 12, 31), dt.date(2026, 11, 28)]
    days = edge + [dt.date.fromordinal(int(o)) for o in ords]
    for r in dates.renderers:
        bulk = r.render_ordinals(np.array([d.toordinal() for d in days]))
        for d, s in zip(days, bulk, strict=True):
            want = format_date(d, r.fmt, locale=r.locale)
            assert r.render(d) == want == s, (r, d)


def test_dates_mapping_is_a_function_over_the_whole_range(dates):
    """Enumerate every (locale, format, date) of the range: the strings that stand for two
    dates are exactly those the task drops, and every other string stands for one date."""
    ordinals = np.arange(dates.first, dates.last + 1)
    assert len(ordinals) == (dt.date(2050, 1, 1) - dt.date(1950, 1, 1)).days  # 100 years
    owner: dict[str, int] = {}
    clashes: set[str] = set()
    chars: set[str] = set()
    for r in dates.renderers:  # every renderer, no shortcut for identical ones
        strings = r.render_ordinals(ordinals).tolist()
        chars.update("".join(strings))
        for s, o in zip(strings, ordinals.tolist(), strict=True):
            if owner.setdefault(s, o) != o:
                clashes.add(s)
    assert clashes == set(dates.ambiguous)
    assert "1/2/26" in clashes  # en_US: 2 January; id_ID/es_ES: 1 February
    # what the task emits is never ambiguous and its target is the one date of the string
    for split in dates.splits:
        for src, tgt in dates.sample(np.random.default_rng(1), 3000, split=split):
            assert src not in clashes
            assert dt.date.fromordinal(owner[src]).isoformat() == tgt
    # the tokenizer covers every character of every string: round trips are exact
    tok = dates.tokenizer()
    assert chars | set("0123456789-") <= set(tok.chars)


def test_two_digit_years_need_at_most_100_years():
    with pytest.raises(ValueError, match="two-digit years"):
        DatesTask(years=101)
    with pytest.raises(ValueError, match="both seen and held out"):
        DatesTask(locales=("en_US", "fr_FR"), heldout=("fr_FR",))
    with pytest.raises(ValueError, match="unknown locale"):
        Renderer("xx_NOPE", "short")


def test_dates_splits_are_disjoint(dates):
    assert not set(dates.train_ordinals.tolist()) & set(dates.valid_ordinals.tolist())
    assert len(dates.train_ordinals) + len(dates.valid_ordinals) == dates.last - dates.first + 1
    rng = np.random.default_rng(2)
    train = dates.sample(rng, 20000, split="train")
    valid = dates.validation(2000)
    held = dates.validation(2000, split="heldout")
    valid_dates = set(dates.valid_ordinals.tolist())
    assert all(dt.date.fromisoformat(t).toordinal() not in valid_dates for _, t in train)
    assert all(dt.date.fromisoformat(t).toordinal() in valid_dates for _, t in valid + held)
    assert not {s for s, _ in train} & {s for s, _ in valid + held}
    assert len(valid) == len({s for s, _ in valid}) == 2000


def test_dates_generator_is_deterministic_and_seeded(dates):
    assert dates.batch(3, 7, 64) == dates.batch(3, 7, 64)
    assert dates.batch(3, 7, 64) != dates.batch(3, 8, 64)
    assert dates.batch(3, 7, 64) != dates.batch(4, 7, 64)
    assert dates.validation(100) == get_task("dates").validation(100)
    tok = dates.tokenizer()
    for src, tgt in dates.batch(0, 0, 256) + dates.validation(256, split="heldout"):
        assert tok.decode(tok.encode(src)) == src and tok.decode(tok.encode(tgt)) == tgt


@pytest.mark.parametrize("name", ["reverse", "sort", "copy"])
def test_sequence_tasks(name):
    task = get_task(name, min_len=2, max_len=9)
    expect = {"reverse": lambda s: s[::-1], "sort": lambda s: "".join(sorted(s)),
              "copy": lambda s: s}[name]
    train = task.sample(np.random.default_rng(0), 3000)
    valid = task.validation(300)
    assert all(expect(s) == t and 2 <= len(s) <= 9 for s, t in train + valid)
    assert all(task.split_of(s) == "train" for s, _ in train)
    assert all(task.split_of(s) == "valid" for s, _ in valid)
    assert not {s for s, _ in train} & {s for s, _ in valid}
    assert task.batch(1, 5, 32) == task.batch(1, 5, 32) != task.batch(1, 6, 32)
    # every string of the task is over the alphabet: the tokenizer round-trips them all
    tok = task.tokenizer()
    assert set(tok.chars) == set(task.chars)
    for s, t in train[:200]:
        assert tok.decode(tok.encode(s)) == s and tok.decode(tok.encode(t)) == t


def test_task_errors():
    with pytest.raises(ValueError, match="unknown task 'nope'; expected one of dates"):
        get_task("nope")
    with pytest.raises(ValueError, match="bad options"):
        get_task("reverse", colour="red")
    with pytest.raises(ValueError, match="min_len 5 exceeds max_len 3"):
        get_task("copy", min_len=5, max_len=3)
    with pytest.raises(ValueError, match="empty"):
        get_task("copy", alphabet="ab", min_len=1, max_len=1, valid_percent=1).validation(1)


def test_tokenizer():
    tok = CharTokenizer("cab")
    assert tok.chars == ["a", "b", "c"] and tok.vocab_size == 6
    assert tok.encode("abc") == [3, 4, 5]
    assert tok.decode([BOS, 3, 4, EOS, 5]) == "ab"
    assert tok.decode([3, PAD, 5]) == "ac"
    with pytest.raises(ValueError, match=r"outside the vocabulary: 'x' \(U\+0078\), 'é'"):
        tok.encode("axéx")
    batch = tok.batch(["ab", "c"], bos=True, eos=True)
    assert batch.tolist() == [[BOS, 3, 4, EOS], [BOS, 5, EOS, PAD]]
    assert CharTokenizer.from_dict(tok.to_dict()) == tok
    with pytest.raises(ValueError, match="single characters"):
        CharTokenizer(["ab"])


def test_dates_input_problem_accepts_every_rendering_and_refuses_other_text(dates):
    # every source the task samples, seen and held-out locales, is in the task's formats
    rng = np.random.default_rng(3)
    samples = dates.sample(rng, 400) + dates.sample(rng, 200, split="heldout")
    assert [s for s, _ in samples if DatesTask.input_problem(s, **dates.options())] == []
    for text in ("28 novembre 2026", "Nov 28, 2026", "2026年11月28日", "11/28/26",
                 "samedi 28 novembre 2026", " 28.11.26 "):
        assert DatesTask.input_problem(text) is None, text
    for text in ("hello world", "28 Novembre 2026", "novembre", "2026", "28 novembre 2026 !"):
        why = DatesTask.input_problem(text)
        assert why is not None and "not written like any date" in why, text
    # the year range is part of the format: a year outside it is not a rendering
    assert DatesTask.input_problem("28 novembre 2026", first_year=1950, years=50) is not None


@pytest.mark.parametrize("name", ["reverse", "sort", "copy"])
def test_sequence_input_problem(name):
    task = get_task(name, min_len=2, max_len=9)
    cls = type(task)
    assert all(cls.input_problem(s, **task.options()) is None
               for s, _ in task.sample(np.random.default_rng(1), 200))
    assert "10 characters; sources have 2 to 9" in cls.input_problem("abcdefghij",
                                                                     **task.options())
    assert "characters the task never produces ('A';" in cls.input_problem("abA",
                                                                          **task.options())

"""Property-based tests of the prompt parsers: any bytes either parse or give one clean error, and
valid files in every encoding and line ending come back exactly, never with a shifted column."""

from __future__ import annotations

import csv
import io
import json

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from clipeval.errors import ClipevalError
from clipeval.prompts import FORMATS, parse_named


def parse(data: bytes, fmt: str, **kwargs) -> list[tuple[str, str, str]]:
    """(prompt, category, challenge) rows: what these properties are about."""
    return [row[:3] for row in parse_named(data, fmt, **kwargs)]

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Any character a file could hold, but the NUL that is refused on purpose and lone surrogates
# that no encoding can write.
CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")


def _prompt(exclude: str = ""):
    return st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\r" + exclude),
                   min_size=1, max_size=40).filter(lambda s: s.strip())


def _category():
    return st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\r\n\t"), max_size=12)


ENCODINGS = st.sampled_from(["utf-8", "utf-8-sig", "utf-16"])
NEWLINES = st.sampled_from(["\n", "\r\n"])


@SETTINGS
@given(data=st.binary(max_size=400), fmt=st.sampled_from(FORMATS))
@example(data=b"\xef\xbb\xbf", fmt="csv")
@example(data=b'prompt\n"unclosed', fmt="csv")
@example(data=b"\xff\xfe\x00", fmt="json")
@example(data=b"[{}]", fmt="json")
@example(data=b'{"prompt": ["a"]}\n', fmt="jsonl")
@example(data=b'[{"pro\\nmpt": "x"}]', fmt="json")  # a newline in a column name the error quotes
@example(data=b'{"a\\nb": 5}', fmt="json")
def test_any_bytes_parse_or_fail_with_one_clean_error(data, fmt):
    try:
        rows = parse(data, fmt, origin="f")
    except ClipevalError as err:
        message = str(err)
        assert message.startswith("f: ")
        assert len(message.splitlines()) == 1, message  # the whole message is one line, whatever the bytes
        return
    assert rows and all(isinstance(p, str) and p.strip() for p, _, _ in rows)


@SETTINGS
@given(rows=st.lists(st.tuples(_prompt(), _category()), min_size=1, max_size=8), encoding=ENCODINGS, newline=NEWLINES)
def test_csv_round_trips_exactly(rows, encoding, newline):
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator=newline)
    writer.writerow(["prompt", "category"])
    writer.writerows(rows)
    assert parse(buffer.getvalue().encode(encoding), "csv", origin="f") == [(p, c, "") for p, c in rows]


@SETTINGS
@given(rows=st.lists(st.tuples(_prompt("\t\n"), _category()), min_size=1, max_size=8), encoding=ENCODINGS, newline=NEWLINES)
def test_tsv_round_trips_exactly(rows, encoding, newline):
    text = newline.join(["Prompt\tCategory", *(f"{p}\t{c}" for p, c in rows)]) + newline
    assert parse(text.encode(encoding), "tsv", origin="f") == [(p, c, "") for p, c in rows]


@SETTINGS
@given(rows=st.lists(st.tuples(_prompt(), _category()), min_size=1, max_size=8), encoding=ENCODINGS, newline=NEWLINES,
       ascii_only=st.booleans())
def test_jsonl_and_json_round_trip_exactly(rows, encoding, newline, ascii_only):
    lines = newline.join(json.dumps({"text": p, "category": c}, ensure_ascii=ascii_only) for p, c in rows) + newline
    assert parse(lines.encode(encoding), "jsonl", origin="f") == [(p, c, "") for p, c in rows]
    whole = json.dumps([{"caption": p, "Category": c} for p, c in rows], ensure_ascii=ascii_only)
    assert parse(whole.encode(encoding), "json", origin="f") == [(p, c, "") for p, c in rows]


@SETTINGS
@given(prompts=st.lists(_prompt("\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"), min_size=1, max_size=8),
       encoding=ENCODINGS, newline=NEWLINES)
def test_txt_round_trips_exactly(prompts, encoding, newline):
    text = newline.join(prompts) + newline
    assert parse(text.encode(encoding), "txt", origin="f") == [(p, "", "") for p in prompts]


@SETTINGS
@given(prompt=st.text(st.characters(min_codepoint=0x80, max_codepoint=0xFF), min_size=1, max_size=20),
       fmt=st.sampled_from(["txt", "csv"]))
def test_latin1_files_are_refused_not_guessed(prompt, fmt):
    """Latin-1 bytes are refused, except those that are also valid UTF-8 (e.g. "Â\x80" is c2 80):
    no parser can tell those apart, and the rule is to read UTF-8."""
    data = (("prompt\n" if fmt == "csv" else "") + "a " + prompt + "\n").encode("latin-1")
    try:
        as_utf8 = data.decode("utf-8")
    except UnicodeDecodeError:
        with pytest.raises(ClipevalError, match="not valid UTF-8"):
            parse(data, fmt, origin="f")
    else:
        assert parse(data, fmt, origin="f")[0][0] == as_utf8.splitlines()[-1]


def test_huge_lines_are_kept_whole_or_refused_cleanly():
    long = "a cat " * 200_000  # 1.2 MB on one line
    assert parse(json.dumps({"prompt": long}).encode() + b"\n", "jsonl", origin="f") == [(long, "", "")]
    assert parse(f"prompt\n{long}\n".encode(), "tsv", origin="f") == [(long, "", "")]
    assert parse(f"{long}\n".encode(), "txt", origin="f") == [(long, "", "")]
    with pytest.raises(ClipevalError, match="f: line 2: a field over 131072 characters"):
        parse(f"prompt\n{long}\n".encode(), "csv", origin="f")

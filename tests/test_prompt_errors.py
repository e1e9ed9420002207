"""The exact line a user reads for each kind of broken prompt file, and the exact rows of
files at the edges of each format: what ``clipeval prompts FILE`` prints is the outcome."""

from __future__ import annotations

import csv
import io
import json

import pytest

NAME = "lib"
BAD = [
    ("tsv", b"prompt\tcategory\na\tb\tc\n", "line 2: 3 fields, the header has 2 (a tab inside a prompt?)"),
    ("csv", b"prompt,category\na,b,c\n", "line 2: 3 fields, the header has 2"),
    ("csv", b'prompt\n"unclosed\n', "line 2: malformed CSV (unexpected end of data)"),
    ("csv", b'prompt\n"a"b\n', "line 2: malformed CSV (',' expected after '\"')"),
    ("csv", b"\n \n", "empty file (a header row is required)"),
    ("csv", b"caption,kind\n,x\n", "line 2: empty prompt"),
    ("csv", b"title,kind\nx,y\n", "line 2: no prompt column (looked for prompt, prompts, caption, text); columns are 'title', 'kind'"),
    ("txt", b"a\n\xff\n", "not valid UTF-8 (byte 0xff at offset 2); save the file as UTF-8"),
    ("txt", b"\xff\xfea\x00\x00\xd8", "not valid UTF-16 (byte 0x00 at offset 4); save the file as UTF-8"),
    ("txt", b"one\ntwo\nth\x00ree\n", "line 3: NUL character (a binary file, or UTF-16 without a BOM?)"),
    ("txt", b"\nfirst\x00 and\nsecond\x00\n", "line 2: NUL character (a binary file, or UTF-16 without a BOM?)"),  # the first
    ("jsonl", b"{}\n", "line 1: no prompt column (looked for prompt, prompts, caption, text); columns are none"),
    ("txt", b"\n  \n", "no prompts in the file"),
    ("jsonl", b'{"prompt": "a"}\n\n{"prompt": \n', "line 3: invalid JSON (Expecting value)"),
    ("jsonl", b'"a"\n[1]\n', "line 2: expected a string or an object, got list"),
    ("jsonl", b'{"prompt": "a", "category": ["x"]}\n', "line 1: field 'category' is not text"),
    ("jsonl", b'{"prompt": true}\n', "line 1: field 'prompt' is not text"),
    ("json", b'{"a": "x",\n "b": 3}', "entry 'b': a {name: prompt} map needs text values, or objects with a "
                                     '"prompt" (or "caption", "tags") text'),
    ("json", b'[\n"a",\n', "invalid JSON at line 3 (Expecting value)"),
    ("json", b'["a", 7]', "item 1: expected a string or an object, got int"),
    ("json", b'"just text"', "expected a JSON list or object, got str"),
    ("json", b"[]", "no prompts in the file"),
]


@pytest.mark.parametrize("fmt, data, message", BAD, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(BAD)])
def test_each_broken_file_is_one_exact_line(cli, tmp_path, fmt, data, message):
    path = tmp_path / f"{NAME}.{fmt}"
    path.write_bytes(data)
    result = cli("prompts", path)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == f"clipeval: error: {path}: {message}\n"


@pytest.mark.parametrize("name, message", [
    ("lib.yaml", "lib.yaml: unknown prompt file type .yaml; use one of .tsv, .csv, .jsonl, .json, .txt"),
    ("lib", "lib: unknown prompt file type (no extension); use one of .tsv, .csv, .jsonl, .json, .txt"),
])
def test_an_unknown_file_type_names_the_accepted_ones(cli, tmp_path, name, message):
    path = tmp_path / name
    path.write_text("prompt\na\n")
    result = cli("prompts", path)
    assert result.exit_code == 2 and result.stderr == f"clipeval: error: {message}\n"


BUILT_IN = ("drawbench, geneval, hpsv2-anime, hpsv2-concept-art, hpsv2-paintings, hpsv2-photo, hpsv2, parti, "
            "simpletuner, smoke")


@pytest.mark.parametrize("spec, message", [
    # A file name, or anything with a folder in it, is a file that is not there, not a library name.
    ("missing.tsv", "prompt library file not found: missing.tsv"),
    ("MISSING.JSONL", "prompt library file not found: MISSING.JSONL"),
    ("prompts/missing", "prompt library file not found: prompts/missing"),
    ("prompts\\missing", "prompt library file not found: prompts\\missing"),
    # Otherwise a name: the close ones first (at most three, from a ratio of 0.5), then every built-in.
    ("partiprompts", f"unknown prompt library 'partiprompts'. Did you mean parti? Built-in: {BUILT_IN}; or give a file path."),
    ("hpsv2-", "unknown prompt library 'hpsv2-'. Did you mean hpsv2 or hpsv2-photo or hpsv2-anime? "
               f"Built-in: {BUILT_IN}; or give a file path."),
    ("zzz", f"unknown prompt library 'zzz'. Built-in: {BUILT_IN}; or give a file path."),
])
def test_a_library_that_is_not_there_is_one_exact_line(cli, tmp_path, monkeypatch, spec, message):
    monkeypatch.chdir(tmp_path)
    result = cli("prompts", spec)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == f"clipeval: error: {message}\n"


def test_a_folder_is_not_a_library(cli, tmp_path):
    result = cli("prompts", f"{tmp_path}/")
    assert result.exit_code == 2
    assert result.stderr == (f"clipeval: error: prompt library {tmp_path}/ is a folder; "
                             "give a .tsv/.csv/.jsonl/.json/.txt file\n")


def test_a_broken_built_in_descriptor_is_named(cli, tmp_path, monkeypatch):
    """Built-ins are data (prompts/*.toml): one that is broken, or whose file parses to another count
    than it promises, is a line naming it, not a traceback or a silently shorter library."""
    from clipeval import prompts

    (tmp_path / "short.txt").write_text("one\ntwo\n")
    (tmp_path / "short.toml").write_text('description = "d"\ncount = 3\nfiles = [{name = "short.txt", format = "txt"}]\n')
    monkeypatch.setattr(prompts, "_library_dir", lambda: tmp_path)
    result = cli("prompts", "short")
    assert result.exit_code == 2 and result.stderr == "clipeval: error: library short: expected 3 prompts, parsed 2\n"
    (tmp_path / "broken.toml").write_text('description = "d"\nfiles = []\n')
    result = cli("prompts", "short")
    assert result.exit_code == 2 and result.stderr == "clipeval: error: broken library descriptor broken.toml: 'count'\n"


def test_an_unreadable_file_says_why(cli, tmp_path, monkeypatch):
    """As root (CI) every file is readable, so the failed read is made by hand: the OS's own reason."""
    import errno
    from pathlib import Path

    path = tmp_path / "lib.txt"
    path.write_text("a\n")

    def refuse(self):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)
    result = cli("prompts", path)
    assert result.exit_code == 2 and result.stderr == f"clipeval: error: cannot read prompt library {path}: Permission denied\n"


def _rows(cli, path) -> list[list[str]]:
    result = cli("prompts", path)
    assert result.exit_code == 0, result.stderr
    # The bytes, not click's result.stdout, which turns CRLF into LF.
    return list(csv.reader(io.StringIO(result.stdout_bytes.decode(), newline="")))


GOOD = [
    # Columns matched case-insensitively, best alias first; the named column wins over "text".
    ("csv", b"Text,Caption,CATEGORIES,Challenge\nt,c,k,h\n", [["0", "c", "k", "h"]]),
    ("csv", b'prompt\n"a, quoted ""one"""\r\n"two\nlines"\n', [["0", 'a, quoted "one"', "", ""], ["1", "two\nlines", "", ""]]),
    # A line break inside quotes is the prompt's own: kept as written, CRLF included.
    ("csv", b'prompt\r\n"two\r\nlines"\r\n', [["0", "two\r\nlines", "", ""]]),
    # TSV never unquotes (Parti's prompts may start with a quote); blank rows are skipped, line numbers kept.
    ("tsv", b'prompt\n"quoted" start\n\t\n \nlast\n', [["0", '"quoted" start', "", ""], ["1", "last", "", ""]]),
    # LF only: U+2028 stays inside its prompt; CRLF is tolerated; the last line needs no newline.
    ("txt", "a\u2028b\r\nsecond\nthird".encode(), [["0", "a\u2028b", "", ""], ["1", "second", "", ""], ["2", "third", "", ""]]),
    ("txt", b"\xef\xbb\xbfbom first\n", [["0", "bom first", "", ""]]),
    ("txt", "utf16 é\n".encode("utf-16"), [["0", "utf16 é", "", ""]]),
    ("txt", b"\xfe\xff" + "big-endian utf16 é\n".encode("utf-16-be"), [["0", "big-endian utf16 é", "", ""]]),
    ("jsonl", b'"plain"\n{"caption": "cap", "category": 3}\n', [["0", "plain", "", ""], ["1", "cap", "3", ""]]),
    ("json", b'[{"prompt": "x", "challenge": null}]', [["0", "x", "", ""]]),
]


@pytest.mark.parametrize("fmt, data, rows", GOOD, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(GOOD)])
def test_edge_files_parse_to_these_rows(cli, tmp_path, fmt, data, rows):
    path = tmp_path / f"{NAME}.{fmt}"
    path.write_bytes(data)
    got = _rows(cli, path)
    assert got[0] == ["prompt_id", "prompt", "category", "challenge"]
    assert got[1:] == rows


def test_a_name_map_keeps_its_names_and_order(cli, tmp_path):
    path = tmp_path / "lib.json"
    path.write_text(json.dumps({"z first": "a prompt", "a second": {"caption": "from a caption"}}))
    assert _rows(cli, path) == [["prompt_id", "name", "prompt", "category", "challenge"],
                                ["0", "z first", "a prompt", "", ""], ["1", "a second", "from a caption", "", ""]]


def test_a_name_column_is_a_label_not_part_of_the_hash(tmp_path):
    from clipeval.prompts import load_library

    named, plain = tmp_path / "named.csv", tmp_path / "plain.tsv"
    named.write_text("name,prompt\nfirst,a cat\n")
    plain.write_text("prompt\na cat\n")
    a, b = load_library(str(named)), load_library(str(plain))
    assert a.prompts[0].name == "first" and a.named and not b.named
    assert a.sha256 == b.sha256  # the same prompts from another format and with labels: the same library
    assert a.description == "prompts from named.csv" and a.name == str(named)
    import hashlib

    assert a.files[0].sha256 == hashlib.sha256(named.read_bytes()).hexdigest() and a.files[0].name == "named.csv"


@pytest.mark.parametrize("limit, count", [(None, 3), (0, 0), (2, 2), (3, 3), (4, 3)])
def test_head_keeps_the_first_prompts(tmp_path, limit, count):
    from clipeval.prompts import load_library

    path = tmp_path / "lib.txt"
    path.write_text("a\nb\nc\n")
    library = load_library(str(path))
    head = library.head(limit)
    assert [p.prompt for p in head.prompts] == ["a", "b", "c"][:count]
    assert (head is library) == (limit is None or limit >= 3)  # nothing to cut: the same library, its hash kept


def test_a_descriptor_names_its_columns_format_and_variable():
    """What a descriptor in prompts/ may say of its file: columns that are no alias, the format
    (else the file name's), a constant category, and the variable of a Python dict."""
    from clipeval.errors import ClipevalError
    from clipeval.prompts import parse_as_described

    data = b"text,body,kind,hard\nnot this,a cat,pets,counting\n"
    spec = {"name": "f.csv", "prompt": "body", "category": "kind", "challenge": "hard"}
    assert parse_as_described(spec, data) == [("a cat", "pets", "counting", "")]
    assert parse_as_described({"name": "f.csv"}, data) == [("not this", "", "", "")]  # the alias "text"
    assert parse_as_described({"name": "f.data", "format": "csv", "category_value": "style"}, data) == [
        ("not this", "style", "", "")]
    with pytest.raises(ClipevalError, match=r"^f.csv: no column 'missing'; columns are text, body, kind, hard$"):
        parse_as_described({"name": "f.csv", "category": "missing"}, data)
    with pytest.raises(ClipevalError, match=r"^f.csv: no column 'Hard'; columns are text, body, kind, hard$"):
        parse_as_described({"name": "f.csv", "challenge": "Hard"}, data)  # a named column is matched exactly
    with pytest.raises(ClipevalError, match=r"^f.csv: unknown format 'xml'$"):
        parse_as_described({"name": "f.csv", "format": "xml"}, data)
    source = b"other = {'x': 'ignored'}\nchosen: dict = {'k': 'a dog'}\n"
    assert parse_as_described({"name": "lib.py", "format": "python-dict", "variable": "chosen"}, source) == [
        ("a dog", "", "", "k")]
    assert parse_as_described({"name": "lib.py", "format": "python-dict"}, b"prompts = {'n': 'p'}\n") == [("p", "", "", "n")]


@pytest.mark.parametrize("source, message", [
    (b"prompts = {'a': 'x'\n", "lib.py: not valid Python source (SyntaxError: '{' was never closed (lib.py, line 1))"),
    (b"prompts = " + b"-" * 100_000 + b"1\n", "lib.py: not valid Python source (MemoryError)"),
    (b"prompts = {'a': '\xff'}\n", "lib.py: not valid UTF-8 (byte 0xff at offset 17); save the file as UTF-8"),
    (b"other = {}\n", "lib.py: no top-level assignment to 'prompts'"),
    (b"\nprompts = ['a']\n", "lib.py: line 2: prompts is not a dict literal"),
    (b"prompts = {\n  'a': 'x',\n  3: 'y'}\n", "lib.py: line 3: prompts has a key that is not a plain string"),
    (b"prompts = {'a':\n  __import__('os').system('id')}\n",
     "lib.py: line 2: prompts['a'] is not a plain string (a Call); only literal text is read, nothing is run"),
    (b"prompts = {}\n", "lib.py: prompts is empty"),
    (b"prompts: dict = {'a': ''}\n", "lib.py: line 1 ('a'): empty prompt"),
])
def test_a_python_dict_library_is_read_never_run(source, message):
    from clipeval.errors import ClipevalError
    from clipeval.prompts import PYTHON_DICT, parse_named

    with pytest.raises(ClipevalError) as err:
        parse_named(source, PYTHON_DICT, origin="lib.py")
    assert str(err.value) == message


def test_a_python_dict_library_has_a_size_cap():
    from clipeval.errors import ClipevalError
    from clipeval.prompts import MAX_PYTHON_BYTES, PYTHON_DICT, parse_named

    body = b"prompts = {'a': 'x'}\n"
    at_cap = body + b"#" * (MAX_PYTHON_BYTES - len(body))
    assert parse_named(at_cap, PYTHON_DICT, origin="lib.py") == [("x", "", "", "a")]
    with pytest.raises(ClipevalError, match=rf"^lib.py: {MAX_PYTHON_BYTES + 1} bytes is too large for a prompt library "
                                            rf"\(at most {MAX_PYTHON_BYTES}\)$"):
        parse_named(at_cap + b"#", PYTHON_DICT, origin="lib.py")

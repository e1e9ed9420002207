"""Prompt libraries: every built-in descriptor, the known quirks of the public files, user files,
and every malformed input through the CLI."""

from __future__ import annotations

import csv
import io
import json

import pytest
from conftest import TRICKY_PROMPTS, assert_user_error

from clipeval.prompts import builtin_descriptors, load_library


@pytest.mark.parametrize("name", sorted(builtin_descriptors()))
def test_every_builtin_library_resolves_to_its_declared_count(name, mirror):
    desc = builtin_descriptors()[name]
    lib = load_library(name)
    assert len(lib.prompts) == desc.count
    assert [p.prompt_id for p in lib.prompts] == list(range(desc.count))
    assert all(p.prompt.strip() for p in lib.prompts)
    assert desc.description and lib.description == desc.description and lib.name == name
    assert len(lib.files) == len(desc.files)
    for spec, source in zip(desc.files, lib.files):
        assert source.name == spec["name"] and source.url == spec.get("url", "")
        if "url" in spec:
            assert spec["url"].startswith("https://") and source.sha256 == spec["sha256"]
        else:  # shipped beside the descriptor: the hash of the file itself
            import hashlib
            from pathlib import Path

            shipped = Path(__file__).parents[1] / "prompts" / spec["name"]
            assert source.sha256 == hashlib.sha256(shipped.read_bytes()).hexdigest()


def test_parti_parses_unquoted_with_categories_and_challenges(mirror):
    lib = load_library("parti")
    assert len(lib.prompts) == 1632
    assert len({p.category for p in lib.prompts}) == 12
    assert len({p.challenge for p in lib.prompts}) == 11
    # File line 1562 (header is line 1) starts with a quote that a CSV reader would strip.
    giggle = lib.prompts[1560]
    assert giggle.prompt.startswith('"G I G G L E" painted in thick colorful lettering')
    assert sum('"' in p.prompt for p in lib.prompts) == 22
    # Leading/trailing spaces (file line 311) and the double space (line 1565) are kept verbatim.
    assert lib.prompts[309].prompt != lib.prompts[309].prompt.strip()
    assert "  " in lib.prompts[1563].prompt
    # Lines 322 and 335 differ only by a final period: two prompts, not one.
    assert lib.prompts[333].prompt == lib.prompts[320].prompt + "."


def test_drawbench_crlf_quoted_cells_and_trailing_space_category(mirror):
    lib = load_library("drawbench")
    assert len(lib.prompts) == 200
    counts = {}
    for p in lib.prompts:
        counts[p.category] = counts.get(p.category, 0) + 1
    assert counts["Gary Marcus et al. "] == 10 and counts["Reddit"] == 38 and counts["Colors"] == 25
    assert not any("\r" in p.prompt for p in lib.prompts)
    assert sum("," in p.prompt for p in lib.prompts) == 42
    assert any("Schönhausen" in p.prompt for p in lib.prompts)


def test_geneval_tags_become_categories(mirror):
    lib = load_library("geneval")
    tags = {}
    for p in lib.prompts:
        tags[p.category] = tags.get(p.category, 0) + 1
    assert tags == {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100, "color_attr": 100}


def test_hpsv2_keeps_embedded_newlines_duplicates_and_styles(mirror):
    anime = load_library("hpsv2-anime")
    assert "\n\n" in anime.prompts[723].prompt
    assert len({p.prompt for p in anime.prompts}) == 781
    photo = load_library("hpsv2-photo")
    assert photo.prompts[204].prompt.endswith("\n")
    both = load_library("hpsv2")
    assert [p.category for p in both.prompts[::800]] == ["anime", "concept-art", "paintings", "photo"]
    assert both.prompts[800 + 412].prompt == load_library("hpsv2-concept-art").prompts[412].prompt


# -- the same quirks in small files the tests write: these run on a fresh clone, without ../shared/data,
#    through each built-in descriptor's own format and column settings.

def _as_builtin(name: str, data: bytes, file: int = 0):
    from clipeval.prompts import builtin_descriptors, parse_as_described

    rows = parse_as_described(builtin_descriptors()[name].files[file], data)
    assert all(row[3] == "" for row in rows)  # these libraries have no names
    return [row[:3] for row in rows]


def test_parti_quirks_unquoted_tsv():
    data = ("Prompt\tCategory\tChallenge\tNote\n"
            '"G I G G L E" painted in thick lettering\tIllustrations\tWriting & Symbols\t\n'
            " leading and trailing \tAnimals\tBasic\t\n"
            "a  double space and ’typographic’ quotes, í and ã\tPeople\tImagination\tsome note\n"
            "an impressionistic painting\tArts\tStyle & Format\t\n"
            "an impressionistic painting.\tArts\tStyle & Format\t\n").encode("utf-8")
    assert _as_builtin("parti", data) == [
        ('"G I G G L E" painted in thick lettering', "Illustrations", "Writing & Symbols"),
        (" leading and trailing ", "Animals", "Basic"),
        ("a  double space and ’typographic’ quotes, í and ã", "People", "Imagination"),
        ("an impressionistic painting", "Arts", "Style & Format"),
        ("an impressionistic painting.", "Arts", "Style & Format"),
    ]


def test_drawbench_quirks_crlf_quoted_commas_trailing_space_no_final_newline():
    data = ('Prompts,Category\r\n"A red colored car, on a road.",Colors\r\n'
            "A collection of nail is sitting on a table.,Gary Marcus et al. \r\n"
            "A storefront with 'Schönhausen' written on it.,Text").encode("utf-8")
    assert _as_builtin("drawbench", data) == [
        ("A red colored car, on a road.", "Colors", ""),
        ("A collection of nail is sitting on a table.", "Gary Marcus et al. ", ""),
        ("A storefront with 'Schönhausen' written on it.", "Text", ""),
    ]


def test_geneval_quirks_jsonl_with_nested_fields():
    lines = [
        {"tag": "counting", "include": [{"class": "dog", "count": 2}], "exclude": [{"class": "dog", "count": 3}],
         "prompt": "a photo of two dogs"},
        {"tag": "position", "include": [{"class": "cat", "count": 1}, {"class": "bench", "count": 1, "position": ["above", 0]}],
         "prompt": "a photo of a bench above a cat"},
    ]
    data = "".join(json.dumps(line) + "\n" for line in lines).encode("ascii")
    assert _as_builtin("geneval", data) == [("a photo of two dogs", "counting", ""),
                                            ("a photo of a bench above a cat", "position", "")]


def test_hpsv2_quirks_one_line_json_with_escapes_newlines_and_duplicates():
    prompts = ["A lemon wearing sunglasses on the beach.", ".\n\nA full-body shot of an anime maid",
               'a "quoted" dragon', "A lemon wearing sunglasses on the beach.", "Beksin\u0301ski style ",
               "a photo of a bus\n"]
    data = json.dumps(prompts).encode("ascii")  # \u escapes, one line, no final newline
    assert b"\n" not in data
    rows = _as_builtin("hpsv2-anime", data)
    assert [r[0] for r in rows] == prompts and {r[1] for r in rows} == {""}
    styles = [_as_builtin("hpsv2", data, file)[0][1] for file in range(4)]
    assert styles == ["anime", "concept-art", "paintings", "photo"]


def test_simpletuner_library_is_read_without_running_it(mirror, cli):
    lib = load_library("simpletuner")
    assert len(lib.prompts) == 53 and lib.named
    assert (lib.prompts[0].name, lib.prompts[3].name) == ("alien_landscape", "comic_strip")
    assert lib.prompts[3].prompt == "a 4-panel comic strip showing an orange cat saying the words 'HELP' and 'LASAGNA'"
    assert len({p.name for p in lib.prompts}) == 53
    out = cli("prompts", "simpletuner").stdout.splitlines()
    assert out[0] == "prompt_id,name,prompt,category,challenge" and out[1].startswith("0,alien_landscape,")


def _python_library(source: str):
    from clipeval.prompts import parse_as_described

    spec = {"name": "prompts.py", "format": "python-dict", "variable": "prompts"}
    return parse_as_described(spec, source.encode("utf-8"))


def test_simpletuner_shaped_files_small_and_hostile(tmp_path):
    from clipeval.errors import ClipevalError

    good = 'import os\nfrom x import y\nprompts = {\n  "cat": "a cat",\n  "diner": \'Joe\\\'s "Diner"\',\n}\nother = {"a": f(1)}\n'
    assert _python_library(good) == [("a cat", "", "", "cat"), ('Joe\'s "Diner"', "", "", "diner")]
    marker = tmp_path / "ran"
    hostile = {
        f'prompts = {{"a": __import__("os").system("touch {marker}")}}': "prompts['a'] is not a plain string (a Call)",
        'prompts = {"a": PromptLibraryEntry(prompt="x")}': "(a Call)",
        'prompts = {"a": f"{1+1}"}': "(a JoinedStr)",
        'prompts = {"a": "x" + "y"}': "(a BinOp)",
        'prompts = {1: "x"}': "a key that is not a plain string",
        'prompts = {**base}': "a key that is not a plain string",
        'prompts = dict(a="x")': "prompts is not a dict literal",
        'library = {"a": "x"}': "no top-level assignment to 'prompts'",
        "prompts = {": "not valid Python source",
        "prompts = " + "(" * 100_000 + "1" + ")" * 100_000: "not valid Python source",
        'prompts = {"a": "' + "x" * (5 << 20) + '"}': "too large for a prompt library",
    }
    for source, needle in hostile.items():
        with pytest.raises(ClipevalError) as err:
            _python_library(source)
        assert needle in str(err.value) and len(str(err.value).splitlines()) == 1, (source[:60], str(err.value))
    assert not marker.exists()  # nothing was ever run


def test_name_prompt_maps_keep_their_names(cli, tmp_path):
    path = tmp_path / "user.json"
    path.write_text(json.dumps({"cat": "a cat", "dog": "a dog"}))
    assert cli("prompts", path).stdout.splitlines() == ["prompt_id,name,prompt,category,challenge", "0,cat,a cat,,", "1,dog,a dog,,"]
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(["a cat", "a dog"]))
    assert load_library(str(path)).sha256 == load_library(str(plain)).sha256  # names label, they do not define


def test_library_hash_depends_on_rows_not_file_format(tmp_path):
    rows = [("a red cube", "shapes"), ('a "quoted" sphere', "shapes")]
    tsv = tmp_path / "a.tsv"
    tsv.write_text("prompt\tcategory\n" + "".join(f"{p}\t{c}\n" for p, c in rows), encoding="utf-8")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("".join(json.dumps({"text": p, "category": c}) + "\n" for p, c in rows), encoding="utf-8")
    assert load_library(str(tsv)).sha256 == load_library(str(jsonl)).sha256
    assert load_library(str(tsv)).head(1).sha256 != load_library(str(tsv)).sha256


def test_tricky_csv_round_trips_through_clipeval_prompts(cli, tricky_csv):
    result = cli("prompts", tricky_csv)
    assert result.exit_code == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["prompt"] for r in rows] == TRICKY_PROMPTS
    assert [r["prompt_id"] for r in rows] == [str(i) for i in range(len(TRICKY_PROMPTS))]
    assert rows[1]["category"] == "odd" and rows[1]["challenge"] == ""


@pytest.mark.parametrize(
    "name, content",
    [
        ("list.json", json.dumps(["one", "two ✨"])),
        ("objects.json", json.dumps([{"Prompt": "one", "category": "c"}, {"Prompt": "two ✨", "category": "d"}])),
        ("map.json", json.dumps({"first": "one", "second": "two ✨"})),
        ("lines.jsonl", '{"caption": "one"}\n\n{"caption": "two ✨"}\n'),
        ("plain.txt", "one\r\n\r\ntwo ✨\r\n"),
        ("bom.csv", "\ufeffprompts,category\none,c\n\"two ✨\",d\n"),
        ("crlf.tsv", "Text\tChallenge\r\none\tx\r\ntwo ✨\ty\r\n"),
    ],
)
def test_user_file_formats(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    lib = load_library(str(path))
    assert [p.prompt for p in lib.prompts] == ["one", "two ✨"]


def test_utf16_with_bom(tmp_path):
    path = tmp_path / "u16.csv"
    path.write_bytes("prompt\nünïcode\n".encode("utf-16"))
    assert load_library(str(path)).prompts[0].prompt == "ünïcode"


@pytest.mark.parametrize(
    "name, content, needle",
    [
        ("empty.csv", b"", "empty file"),
        ("header.csv", b"prompt,category\n", "no prompts"),
        ("header-crlf.csv", b"prompt,category\r\n", "no prompts"),
        ("header.tsv", b"caption\tcategory\n", "no prompts"),
        ("nocol.jsonl", b'{"words": "x"}\n', "no prompt column"),
        ("quoted.csv", b'prompt,category\n"x","y","z"\n', "line 2: 3 fields, the header has 2"),
        ("short.tsv", b"prompt\tcategory\nx\n", "line 2: 1 fields, the header has 2"),
        ("nocol.csv", b"description,category\nx,y\n", "no prompt column"),
        ("ragged.tsv", b"prompt\tcategory\na\tb\nc\td\te\n", "line 3: 3 fields"),
        ("ragged.csv", b"prompt,category\na,b\nc\n", "line 3: 1 fields"),
        ("blank.csv", b"prompt,category\na,b\n   ,c\n", "line 3: empty prompt"),
        ("bad.jsonl", b'{"prompt": "a"}\n{"prompt": \n', "line 2: invalid JSON"),
        ("bad.json", b'["a", ', "invalid JSON"),
        ("nums.json", b"[1, 2]", "expected a string or an object"),
        ("latin1.txt", "café\n".encode("latin-1"), "not valid UTF-8"),
        ("nul.txt", b"a\x00b\n", "NUL"),
        ("prompts.yaml", b"- a\n", "unknown prompt file type"),
        ("spaces.txt", b"  \n\n", "no prompts"),
    ],
)
def test_malformed_files_are_one_line_errors(cli, tmp_path, name, content, needle):
    path = tmp_path / name
    path.write_bytes(content)
    result = cli("prompts", path)
    assert_user_error(result, needle, name)


def test_unknown_library_suggests_close_names(cli):
    assert_user_error(cli("prompts", "partii"), "unknown prompt library", "Did you mean parti")
    assert_user_error(cli("prompts", "missing/file.csv"), "not found")


def test_libraries_lists_every_builtin_with_count(cli):
    """Each descriptor file of prompts/, read here with tomllib: its name, count, where its file comes
    from and its description, one line each in name order."""
    import re
    import tomllib
    from pathlib import Path
    from urllib.parse import urlparse

    result = cli("libraries")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["name", "prompts", "source", "description"]
    files = sorted((Path(__file__).parents[1] / "prompts").glob("*.toml"))
    assert len(lines) == 1 + len(files) and len(files) >= 10
    for line, path in zip(lines[1:], files):
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
        url = raw["files"][0].get("url")
        source = "download: " + urlparse(url).netloc if url else "shipped"
        assert re.fullmatch(rf"{re.escape(path.stem)} +{raw['count']}  {re.escape(source)} *  {re.escape(raw['description'])}",
                            line), line


def test_a_name_map_takes_simpletuner_entry_objects_and_refuses_anything_else(tmp_path):
    """{name: prompt}, or {name: {"prompt"|"caption"|"tags": text, ...}} as SimpleTuner's PromptLibraryEntry."""
    from clipeval.errors import ClipevalError
    from clipeval.prompts import load_library

    path = tmp_path / "lib.json"
    path.write_text(json.dumps({"a": {"prompt": "p", "caption": "not this"}, "b": {"caption": "c", "tags": "no"},
                                "c": {"tags": "t", "adapter_strength": 0.5}, "d": "plain"}))
    library = load_library(str(path))
    assert [(p.name, p.prompt) for p in library.prompts] == [("a", "p"), ("b", "c"), ("c", "t"), ("d", "plain")]
    for bad in ({"a": 1}, {"a": {"strength": 1}}, {"a": {"prompt": 3}}, {"a": ["x"]}, {"a": None}):
        path.write_text(json.dumps(bad))
        with pytest.raises(ClipevalError, match="entry 'a': a {name: prompt} map needs text values, or objects "
                                                "with a \"prompt\" \\(or \"caption\", \"tags\"\\) text"):
            load_library(str(path))


def test_combined_libraries_are_one_library_in_order_with_their_files(tmp_path):
    """SimpleTuner's validation set: libraries one after the other, then single named prompts;
    prompt_ids renumbered from 0, names and categories kept, every source file listed."""
    from clipeval.prompts import Combined, load_library

    first, second = tmp_path / "a.tsv", tmp_path / "b.json"
    first.write_text("prompt\tcategory\ncat\tAnimals\ndog\tAnimals\n")
    second.write_text(json.dumps({"car": "a red car"}))
    library = load_library(Combined((str(first), str(second)), (("validation", "a blue ball"),)))
    assert [(p.prompt_id, p.prompt, p.category, p.challenge, p.name) for p in library.prompts] == [
        (0, "cat", "Animals", "", ""), (1, "dog", "Animals", "", ""), (2, "a red car", "", "", "car"),
        (3, "a blue ball", "", "", "validation")]
    assert library.name == f"{first} + {second} + 'validation'" and library.description.startswith(library.name)
    assert [f.name for f in library.files] == ["a.tsv", "b.json"]
    assert load_library(Combined((str(first),))).sha256 == load_library(str(first)).sha256  # one part: the same rows


def test_a_built_in_file_is_downloaded_from_its_pinned_url_on_first_use(shared_data, monkeypatch, tmp_path):
    """With no mirror, the first use of a library reads the URL its descriptor pins (the network is
    stood in for: nothing may be downloaded here), and the second use the verified cache."""
    import io
    import urllib.request

    from clipeval import prompts

    monkeypatch.delenv("CLIPEVAL_LIBRARY_MIRROR", raising=False)
    monkeypatch.setenv("CLIPEVAL_CACHE_DIR", str(tmp_path))
    asked = []

    def urlopen(url, timeout):
        asked.append(url)
        return io.BytesIO((shared_data / "PartiPrompts.tsv").read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    assert len(prompts.load_library("parti").prompts) == 1632
    assert len(prompts.load_library("parti").prompts) == 1632
    assert asked == ["https://raw.githubusercontent.com/google-research/parti/5a657978134374ce28973948331b319adef164bd/"
                     "PartiPrompts.tsv"]

"""The gates' files as CI systems read them, byte for byte where it matters: JUnit XML (what
pytest --junitxml writes) and GitHub's step summary. No model: the gates alone."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from clipeval import gates
from clipeval.errors import ClipevalError


def test_junit_has_one_case_per_gate_with_the_failure_as_pytest_writes_it(tmp_path):
    path = tmp_path / "ci" / "reports" / "gates.xml"  # folders made as needed
    gates.write_junit(path, "compare", [
        gates.Gate("b not worse than a by more than 0.005", True, "delta +0.0010 [-0.0005, +0.0025]"),
        gates.Gate("c not worse than a by more than 0.005", False, "delta -0.0200 [-0.0300, -0.0100]",
                   "c against a: delta -0.0200, p 1e-05"),
        gates.Gate("d & <e>", False, "no details"),
    ], seconds=1.5)
    data = path.read_bytes()
    assert data.startswith(b'<?xml version="1.0" encoding="utf-8"?>\n<testsuites') and data.endswith(b"</testsuites>\n")
    root = ET.fromstring(data)
    assert root.tag == "testsuites" and root.attrib["name"] == "clipeval"
    assert (root.attrib["tests"], root.attrib["failures"], root.attrib["errors"]) == ("3", "2", "0")
    (suite,) = root
    assert suite.attrib["name"] == "clipeval compare" and suite.attrib["tests"] == "3" and suite.attrib["failures"] == "2"
    assert suite.attrib["skipped"] == "0" and suite.attrib["errors"] == "0" and suite.attrib["time"] == "1.500"
    cases = list(suite)
    assert [c.attrib["name"] for c in cases] == ["b not worse than a by more than 0.005",
                                                 "c not worse than a by more than 0.005", "d & <e>"]
    assert all(c.attrib["classname"] == "clipeval.compare" and c.attrib["time"] == "0" for c in cases)
    assert cases[0].find("failure") is None and cases[0].find("system-out").text == "delta +0.0010 [-0.0005, +0.0025]"
    failure = cases[1].find("failure")
    assert failure.attrib == {"message": "delta -0.0200 [-0.0300, -0.0100]", "type": "QualityGateFailed"}
    assert failure.text == "c against a: delta -0.0200, p 1e-05"
    assert cases[2].find("failure").text == "no details"  # the message stands in for missing details
    assert b"d &amp; &lt;e&gt;" in data
    import datetime

    stamp = datetime.datetime.strptime(suite.attrib["timestamp"], "%Y-%m-%dT%H:%M:%S")  # ISO 8601, local time
    assert abs((datetime.datetime.now() - stamp).total_seconds()) < 120


def test_junit_is_utf_8_text_and_times_zero_by_default(tmp_path):
    path = tmp_path / "gates.xml"
    gates.write_junit(path, "sweep", [gates.Gate("clip/mean of café ≥ 0.3", True, "东京 0.31")])
    data = path.read_bytes()
    assert "café ≥ 0.3".encode() in data and "东京 0.31".encode() in data  # UTF-8 bytes, not character references
    assert ET.fromstring(data)[0].attrib["time"] == "0.000"


def test_junit_with_no_gate_is_an_empty_suite(tmp_path):
    path = tmp_path / "none.xml"
    gates.write_junit(path, "run", [])
    root = ET.fromstring(path.read_bytes())
    assert root.attrib["tests"] == "0" and root.attrib["failures"] == "0" and list(root[0]) == []


def test_the_step_summary_appends_only_under_github_actions(tmp_path, monkeypatch):
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)
    gates.step_summary("| a |")  # not on GitHub: nothing, nowhere
    target = tmp_path / "summary.md"
    target.write_text("earlier\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(target))
    gates.step_summary("| a | b |\n\n\n")
    gates.step_summary("| c |")
    assert target.read_text() == "earlier\n| a | b |\n\n| c |\n\n"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "no" / "such" / "dir" / "file"))
    with pytest.raises(ClipevalError, match="cannot append to GITHUB_STEP_SUMMARY"):
        gates.step_summary("x")


def test_a_markdown_cell_keeps_its_column():
    assert gates.cell("a|b\nc") == "a\\|b c"
    assert gates.cell(0.5) == "0.5"

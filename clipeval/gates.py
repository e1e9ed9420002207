"""Quality gates as CI systems read them: a JUnit XML file (one test case per gate, the failure
message as pytest --junitxml writes it) and, on GitHub Actions, a markdown table appended to the
job's step summary. Written after every result file, so a failed gate still leaves its files."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Gate:
    name: str  # what was required, e.g. "clip/mean >= 0.3"
    passed: bool
    message: str  # one line: what was measured
    details: str = ""  # shown under the failure: the numbers behind it


def write_junit(path: Path, command: str, gates: list[Gate], *, seconds: float = 0.0) -> None:
    import xml.etree.ElementTree as ET

    from clipeval.store import write_atomic

    failures = sum(not g.passed for g in gates)
    suites = ET.Element("testsuites", name="clipeval", tests=str(len(gates)), failures=str(failures), errors="0")
    suite = ET.SubElement(suites, "testsuite", name=f"clipeval {command}", tests=str(len(gates)),
                          failures=str(failures), errors="0", skipped="0", time=f"{seconds:.3f}",
                          timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"))
    for gate in gates:
        case = ET.SubElement(suite, "testcase", classname=f"clipeval.{command}", name=gate.name, time="0")
        if gate.passed:
            ET.SubElement(case, "system-out").text = gate.message
        else:
            failure = ET.SubElement(case, "failure", message=gate.message, type="QualityGateFailed")
            failure.text = gate.details or gate.message
    ET.indent(suites)
    data = b'<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="utf-8") + b"\n"
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)


def step_summary(markdown: str) -> None:
    """Append to $GITHUB_STEP_SUMMARY when GitHub Actions sets it (appending is its protocol)."""
    target = os.environ.get("GITHUB_STEP_SUMMARY")
    if not target:
        return
    from clipeval.errors import ClipevalError

    try:
        with open(target, "a", encoding="utf-8") as f:
            f.write(markdown.rstrip("\n") + "\n\n")
    except OSError as err:
        raise ClipevalError(f"cannot append to GITHUB_STEP_SUMMARY ({target}): {err.strerror}") from err


def cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")

"""Per-module figures of the last ``mutmut run``, as the table in docs/mutation.md: mutants,
killed, survived, no test reached, timeouts, segfaults, not checked yet, and the share killed of those a
test reached. Run after ``mutmut run``:

    python tools/mutation_report.py            # prints the markdown table
"""

from __future__ import annotations

import collections
import subprocess
import sys


def main() -> None:
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], capture_output=True, text=True,
                         check=True).stdout
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in out.splitlines():
        if ":" not in line:
            continue
        name, status = (part.strip() for part in line.rsplit(":", 1))
        module = name.split(".x_")[0].split(".xǁ")[0]  # clipeval.stats.x_fn__mutmut_3 -> clipeval.stats
        counts[module][status] += 1
    print("| module | mutants | killed | survived | no test reached | timeout | segfault | not checked | killed of reached |")
    print("|---|---|---|---|---|---|---|---|---|")
    for module in sorted(counts):
        c = counts[module]
        reached = c["killed"] + c["survived"] + c["timeout"]
        share = f"{100 * (c['killed'] + c['timeout']) / reached:.1f}%" if reached else "n/a"
        # A segfault is not counted as a kill: under mutmut's plain fork every torch test crashed,
        # whatever the mutant (see docs/mutation.md); with the fork server none should remain.
        print(f"| `{module}` | {sum(c.values())} | {c['killed']} | {c['survived']} | {c['no tests']} | {c['timeout']} | "
              f"{c['segfault']} | {c['not checked']} | {share} |")


if __name__ == "__main__":
    main()

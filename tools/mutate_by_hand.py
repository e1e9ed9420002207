"""Put one mistake into the code, run the tests that should catch it, and put the code back:

    python tools/mutate_by_hand.py clipeval/sweep.py 'max(2 * short.prompts' 'max(short.prompts' -- tests/test_sweep_plan.py

prints KILLED or SURVIVED with pytest's last line. For checking a new test against the survivor it
was written for (``mutmut show NAME`` gives the change), or a change to code that computes or
decides before committing it. The file is restored even when pytest is interrupted.
"""

from __future__ import annotations

import subprocess
import sys


def main() -> None:
    if "--" not in sys.argv or len(sys.argv[: sys.argv.index("--")]) != 4:
        raise SystemExit(__doc__)
    path, old, new = sys.argv[1:4]
    tests = sys.argv[sys.argv.index("--") + 1 :]
    source = open(path, encoding="utf-8").read()
    if source.count(old) != 1:
        raise SystemExit(f"{old!r} occurs {source.count(old)} times in {path}; give a unique piece")
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(source.replace(old, new))
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                             capture_output=True, text=True)
    finally:
        with open(path, "w", encoding="utf-8") as f:
            f.write(source)
    last = (run.stdout.strip().splitlines() or [run.stderr.strip()[-200:]])[-1]
    print(("KILLED  " if run.returncode else "SURVIVED") + f" {old!r} -> {new!r}: {last}")


if __name__ == "__main__":
    main()

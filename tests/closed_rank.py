"""``clipeval`` under a launcher, saying at exit whether its process group is still up (left to
interpreter exit, gloo's threads could abort a rank after its work was done)."""

import atexit
import os
import sys


def report() -> None:
    import torch.distributed as dist

    alive = dist.is_available() and dist.is_initialized()
    print(f"rank {os.environ.get('RANK')}: process group alive at exit: {alive}", file=sys.stderr)


atexit.register(report)

if __name__ == "__main__":
    from clipeval.cli import main

    main()

"""``clipeval`` under a launcher, as the multi-process tests run it:

- at exit it says whether its process group is still up (left to interpreter exit, gloo's threads
  could abort a rank after its work was done);
- it writes its pid to ``$CLIPEVAL_TEST_PIDS/<RANK>`` (torchrun starts workers in sessions of their
  own, so a test cannot reach them through the launcher), and prints every thread's stack on
  SIGUSR1: a test that times out shows where each rank hung;
- with ``CLIPEVAL_TEST_SLOW_FINISH=<s>`` rank 0 takes that long to write the tables and says when
  it is done, so a test sees whether the other ranks waited for it.

Other test wrappers import it first."""

import atexit
import faulthandler
import os
import signal
import sys
import time


def report() -> None:
    import torch.distributed as dist

    alive = dist.is_available() and dist.is_initialized()
    print(f"rank {os.environ.get('RANK')}: process group alive at exit: {alive}", file=sys.stderr, flush=True)


atexit.register(report)
faulthandler.register(signal.SIGUSR1, all_threads=True)
if os.environ.get("CLIPEVAL_TEST_PIDS"):
    with open(os.path.join(os.environ["CLIPEVAL_TEST_PIDS"], os.environ.get("RANK", "0")), "w") as f:
        f.write(str(os.getpid()))
if os.environ.get("CLIPEVAL_TEST_SLOW_FINISH"):
    import clipeval.store as store

    _finish = store.RunDir.finish

    def finish(self, *args, **kwargs):
        time.sleep(float(os.environ["CLIPEVAL_TEST_SLOW_FINISH"]))
        done = _finish(self, *args, **kwargs)
        print(f"rank {os.environ.get('RANK')}: tables written", file=sys.stderr, flush=True)
        return done

    store.RunDir.finish = finish

if __name__ == "__main__":
    from clipeval.cli import entry

    entry()

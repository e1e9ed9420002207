"""``python -m clipeval`` (and ``accelerate launch -m clipeval``)."""

from clipeval.cli import entry

if __name__ == "__main__":
    entry()

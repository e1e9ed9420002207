"""``python -m clipeval`` (and ``accelerate launch -m clipeval``)."""

from clipeval.cli import main

if __name__ == "__main__":
    main()

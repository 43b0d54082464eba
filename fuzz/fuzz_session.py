"""atheris harness: the session target of fuzz/targets.py (see fuzz/runner.py)."""

from runner import main

if __name__ == "__main__":
    main("session")

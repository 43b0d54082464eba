"""atheris harness: the device_state target of fuzz/targets.py (see fuzz/runner.py)."""

from runner import main

if __name__ == "__main__":
    main("device_state")

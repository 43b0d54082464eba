"""atheris harness: the qemu_stream target of fuzz/targets.py (see fuzz/runner.py)."""

from runner import main

if __name__ == "__main__":
    main("qemu_stream")

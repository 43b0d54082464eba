"""atheris harness: the method_qatzip_libqatzip target of fuzz/targets.py (see fuzz/runner.py)."""

from runner import main

if __name__ == "__main__":
    main("method_qatzip_libqatzip")

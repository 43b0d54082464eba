"""Runs one target from targets.py under atheris (libFuzzer): coverage-guided, instrumented.

Usage: ``python fuzz/fuzz_<target>.py [libFuzzer flags] [corpus dirs]``, e.g.
``python fuzz/fuzz_ram_packet.py -atheris_runs=1000000``. Without a corpus directory the
harness uses fuzz/.corpus/<target>/, seeded with valid inputs. A crash (any exception but a
MultiFDError) is written by libFuzzer as ``crash-<sha1>``: copy it to
tests/fuzz_corpus/<target>/ once fixed, and tests/test_fuzz.py replays it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# Instrument the core, the plugins (loaded through entry points by targets()) and targets.
with atheris.instrument_imports(include=["multifd_core", "multifd_zlib", "multifd_zstd",
                                         "multifd_qpl", "multifd_uadk", "multifd_qatzip",
                                         "multifd_lz4", "targets"]):
    import targets

    AVAILABLE = targets.targets()
    for _name, _target in AVAILABLE.items():  # load what each target loads lazily
        targets.run(_target, targets.seed_inputs(_name)[0])


def main(name: str) -> None:
    available = AVAILABLE
    if name not in available:
        sys.exit(f"fuzz target {name} is not available here (method not installed?)")
    target = available[name]

    def one_input(data: bytes) -> None:
        targets.run(target, data)

    argv = list(sys.argv)
    if not any(not a.startswith("-") for a in argv[1:]):
        corpus = HERE / ".corpus" / name
        corpus.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(targets.seed_inputs(name)):
            (corpus / f"seed-{i}").write_bytes(seed)
        regressions = HERE.parent / "tests" / "fuzz_corpus" / name
        argv.append(str(corpus))
        if regressions.is_dir():
            argv.append(str(regressions))
    if not any(a.startswith("-max_len") for a in argv):
        argv.append("-max_len=8192")
    atheris.Setup(argv, one_input)
    atheris.Fuzz()

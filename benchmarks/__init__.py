"""The performance suite of a source checkout: ``python -m benchmarks`` (the same as
``multifd bench``) or one part, e.g. ``python -m benchmarks.bench_wall``. Not installed with the
wheel: run from the checkout's root (or through ``multifd bench``, which loads this package by
its path)."""

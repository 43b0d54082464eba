"""The C extension of multifd-pagecodec; everything else is in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["multifd_pagecodec/_build.py:ffibuilder"])

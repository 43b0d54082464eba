"""The C extension of multifd-pagecodec; everything else is in pyproject.toml.

cffi builds it against the stable ABI (``_pagecodec.abi3.so``, ``Py_LIMITED_API``), so the
wheel is tagged ``cp310-abi3``: one wheel per platform serves CPython 3.10 and later.
"""

from setuptools import setup

setup(cffi_modules=["multifd_pagecodec/_build.py:ffibuilder"],
      options={"bdist_wheel": {"py_limited_api": "cp310"}})

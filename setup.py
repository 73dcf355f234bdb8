"""The extension build lives here because cffi_modules has no pyproject
spelling; everything else is in pyproject.toml."""
from setuptools import setup

setup(cffi_modules=["bindings/blocktable/_build.py:ffibuilder"])

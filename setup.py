"""Build script: all metadata is in pyproject.toml; this only adds the cffi module."""
from setuptools import setup

setup(cffi_modules=["_fdpass/build.py:ffibuilder"])

# Everything but the cffi extension is declared in pyproject.toml.
from setuptools import setup

setup(cffi_modules=["blockcrypt/crypto/_xts_build.py:ffibuilder"])

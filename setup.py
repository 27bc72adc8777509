"""The optional C scanner (supervisor/_scan.c); everything else is declared in pyproject.toml.

`optional=True`: without a C compiler the build goes on and termfilter uses its regex instead.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("supervisor._scan", ["supervisor/_scan.c"], optional=True)])

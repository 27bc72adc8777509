"""The optional C scanner (supervisor/console/_scan.c); everything else is declared in pyproject.toml.

`optional=True`: without a C compiler the build goes on and console/filter.py uses its regex instead.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("supervisor.console._scan", ["supervisor/console/_scan.c"], optional=True)])

"""The optional C parts; everything else is declared in pyproject.toml.

- supervisor/console/_scan.c: the console filter's scanner, an extension module. `optional=True`:
  without a C compiler the build goes on and console/filter.py uses its regex instead.
- supervisor/egress/handoff.c: the egress proxy's per-connection helper, an executable
  (supervisor/egress/agentvm-handoff). Optional too: without it QEMU runs handoff.py instead,
  which works the same and starts slower.
"""

from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HANDOFF = Path("supervisor/egress/handoff.c")


class _BuildExt(build_ext):
    def run(self) -> None:
        super().run()
        out_dir = HANDOFF.parent if self.inplace else Path(self.build_lib) / HANDOFF.parent
        try:
            objects = self.compiler.compile(
                [str(HANDOFF)], output_dir=self.build_temp, extra_postargs=["-O2"]
            )
            self.compiler.link_executable(objects, "agentvm-handoff", output_dir=str(out_dir))
        except Exception as exc:  # optional: handoff.py is the fallback
            print(f"warning: {HANDOFF} did not compile ({exc}); the egress proxy uses handoff.py")


setup(
    ext_modules=[Extension("supervisor.console._scan", ["supervisor/console/_scan.c"], optional=True)],
    cmdclass={"build_ext": _BuildExt},
)

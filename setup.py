"""Ship the top-level ``hardware_profiles/`` and ``spaces/`` inside the wheel.

They stay at the top of the repository (they are data users read and copy);
at build time they are copied to ``search/_builtin/`` so a non-editable
install finds them (``search._base.paths.builtin_dir``). Everything else is in
pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

_DATA = ("hardware_profiles", "spaces")


class _BuildWithBuiltins(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads them from the checkout
            return
        root = Path(__file__).resolve().parent
        for name in _DATA:
            target = Path(self.build_lib) / "search" / "_builtin" / name
            target.mkdir(parents=True, exist_ok=True)
            for path in sorted((root / name).glob("*.yaml")):
                shutil.copy2(path, target / path.name)


setup(cmdclass={"build_py": _BuildWithBuiltins})

"""`llavactl --help` starts light: no torch, transformers, numpy, pyarrow, PIL, nor the profile schema."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_help_imports_neither_heavy_packages_nor_the_profile_schema() -> None:
    heavy = ("torch", "transformers", "numpy", "pyarrow", "PIL", "pydantic", "llavactl.config.schema")
    code = (
        "import sys, runpy\n"
        "sys.argv = ['llavactl', '--help']\n"
        "try:\n    runpy.run_module('llavactl', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        f"print(sorted(m for m in sys.modules if m in {heavy!r} or m.split('.')[0] in {heavy!r}))\n"
    )
    root = Path(__file__).resolve().parents[2]  # this checkout's llavactl, first on the path
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert "Usage: llavactl" in result.stdout
    assert result.stdout.splitlines()[-1] == "[]"

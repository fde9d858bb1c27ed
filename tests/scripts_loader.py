"""`load_script(name)`: a module of `scripts/<name>.py`, so tests call a command line's `main` in-process."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    if str(SCRIPTS) not in sys.path:      # as when run: a script imports its siblings (hugepages)
        sys.path.append(str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(f"{name}_script", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

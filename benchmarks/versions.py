"""Load a second copy of qkv from another checkout, to time two versions side by side."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def load_qkv(src: Path, name: str):
    """Import the qkv package found in ``src`` (a checkout's ``src`` folder) as module
    ``name``; its own imports are relative, so it stays apart from any other qkv."""
    spec = importlib.util.spec_from_file_location(name, src / "qkv" / "__init__.py",
                                                  submodule_search_locations=[str(src / "qkv")])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod

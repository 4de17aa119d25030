"""Helpers shared by the test modules (import them from here, not from a
sibling test module)."""
from __future__ import annotations

import importlib.util
import os.path as osp
from types import ModuleType

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def load_tool(*path: str) -> ModuleType:
    """A script under ``tools/`` (not a package) as a module, e.g.
    ``load_tool('deploy', 'export_onnx.py').main([...])``."""
    script = osp.join(ROOT, 'tools', *path)
    name = 'tool_' + '_'.join(path).replace('.py', '').replace('.', '_')
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

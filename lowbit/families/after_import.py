"""Run a function once a module is imported, whenever that happens (now, if it already was).

lowbit registers itself with transformers' quantizer registry this way: `import lowbit` must not
import transformers (seconds, and an optional dependency), yet a lowbit folder must load right
through `AutoModel.from_pretrained` whichever of the two a program imports first.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Callable
from types import ModuleType
from typing import Any

from lowbit.errors import LowbitWarning

Hook = Callable[[ModuleType], None]


def _run(hook: Hook, module: ModuleType) -> None:
    try:
        hook(module)
    except Exception as error:  # noqa: BLE001 - a failing hook must not break the user's import
        with warnings.catch_warnings():  # not even under -W error
            warnings.simplefilter("default")
            warnings.warn(f"lowbit could not hook into {module.__name__}: {type(error).__name__}: "
                          f"{error}", LowbitWarning, stacklevel=2)


class _HookedLoader(importlib.abc.Loader):
    """The module's own loader, then the hook; a wrapper, so a loader shared by many modules
    (a zip importer) is left as it was."""

    def __init__(self, loader: Any, name: str, hook: Hook) -> None:
        self.loader, self.name, self.hook = loader, name, hook

    def __getattr__(self, name: str) -> Any:  # get_source, is_package, ...: the real loader's
        return getattr(self.loader, name)

    def create_module(self, spec: Any) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        if module.__name__ == self.name:
            _run(self.hook, module)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds `name` with the other finders and wraps its loader (`_HookedLoader`) so that
    `hook` runs after the module's code; then steps out of the import system."""

    def __init__(self, name: str, hook: Hook) -> None:
        self.name, self.hook = name, hook

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _HookedLoader(spec.loader, fullname, self.hook)
        return spec


def after_import(name: str, hook: Hook) -> None:
    """Call `hook(module)` when `name` is imported, or at once if it already is."""
    if name in sys.modules:
        _run(hook, sys.modules[name])
        return
    if not any(isinstance(finder, _AfterImport) and finder.name == name for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(name, hook))

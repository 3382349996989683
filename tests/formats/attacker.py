"""An attacker's tools for the security tests: craft files whose checksums are all recomputed,
and watch (with a Python audit hook) what a load opens, runs and deletes."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lowbit.core.digest import tensor_sha256

REPORT = {"bits": 8, "verified": False, "prediction_differences": None, "max_probability_difference": None,
          "fallbacks": {}, "kept_float": [], "encodings": {}, "pruned": {}}
FORBIDDEN = ("os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
             "os.remove", "os.unlink", "os.rename", "pty.spawn")


class _Watch:
    """One audit hook for the whole test session (hooks cannot be removed); it records only
    while a `watching` block runs."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] | None = None
        sys.addaudithook(self._hook)

    def _hook(self, event: str, arguments: tuple) -> None:
        if self.events is None:
            return
        if event == "open" and isinstance(arguments[0], (str, bytes, os.PathLike)):
            self.events.append(("open", os.path.realpath(os.fsdecode(arguments[0]))))
        elif event.startswith(FORBIDDEN):
            self.events.append((event, repr(arguments[:2])))


_WATCH = _Watch()


@contextmanager
def watching():
    """Yield the list of (event, detail) pairs seen inside the block: file opens (real paths)
    and any program start, exec, spawn, delete or rename."""
    _WATCH.events = events = []
    try:
        yield events
    finally:
        _WATCH.events = None


def opened_under(events: list[tuple[str, str]], folder: Path) -> list[str]:
    root = os.path.realpath(folder)
    return [path for event, path in events if event == "open" and path.startswith(root)]


def forbidden(events: list[tuple[str, str]]) -> list[str]:
    return [f"{event} {detail}" for event, detail in events if event != "open"]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def craft_sklearn_file(path: Path, graph: Any, arrays: bytes = b"", record_dtypes: list | None = None,
                       extra: dict[str, bytes] | None = None, manifest: dict | None = None) -> Path:
    """A .lowbit zip holding `graph` as skeleton.json, with every sha256 and size recomputed."""
    entries = {"skeleton.json": json.dumps({"record_dtypes": record_dtypes or [], "graph": graph}).encode(),
               "arrays.safetensors": arrays, **(extra or {})}
    header = {"format": "lowbit-sklearn", "version": 2, "estimator": "sklearn.tree.DecisionTreeClassifier",
              "report": REPORT, "sha256": {name: sha256(data) for name, data in entries.items()},
              "sizes": {name: len(data) for name, data in entries.items()}, **(manifest or {})}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("lowbit.json", json.dumps(header))
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


def rewrite_sklearn_file(path: Path, change) -> Path:
    """Apply `change(entries)` to a real .lowbit file's entries, then recompute its checksums."""
    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    change(entries)
    manifest = json.loads(entries.pop("lowbit.json"))
    manifest["sha256"] = {name: sha256(data) for name, data in entries.items()}
    manifest["sizes"] = {name: len(data) for name, data in entries.items()}
    path.unlink()
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("lowbit.json", json.dumps(manifest))
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


def resign_folder(folder: Path) -> None:
    """Recompute every size, sha256 and tensor digest lowbit.json records for a torch folder."""
    from safetensors.torch import load_file

    manifest = json.loads((folder / "lowbit.json").read_text())
    for name, entry in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            continue
        entry["sha256"] = sha256(file.read_bytes())
        entry["bytes"] = file.stat().st_size
        if entry.get("tensors") is not None:
            entry["tensors"] = {key: tensor_sha256(value) for key, value in load_file(file).items()}
    (folder / "lowbit.json").write_text(json.dumps(manifest))


def edit_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / "lowbit.json").read_text())
    change(manifest)
    (folder / "lowbit.json").write_text(json.dumps(manifest))

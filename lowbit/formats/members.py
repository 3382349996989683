"""The files a manifest lists: plain files inside their folder, read no further than checked.

A saved model names its files in lowbit.json. A file an attacker crafted may name
`../outside/secret.safetensors`, an absolute path, a symlink to a file elsewhere, or a device;
`member` refuses each of them before anything is opened, so a loader only ever reads regular
files inside the folder it was given.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

from lowbit.errors import ChecksumError, FormatError

NAME_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}")
MAX_PARTS = 4


def check_member_name(name: object) -> str:
    """`name` if it is a relative path of plain parts (no `..`, no absolute path, no backslash)."""
    parts = name.split("/") if isinstance(name, str) else []
    if not parts or len(parts) > MAX_PARTS or not all(NAME_PART.fullmatch(part) for part in parts) \
            or any(set(part) == {"."} for part in parts):
        raise FormatError(f"the manifest names a file {name!r}, which is not a plain path inside the folder")
    return name


def member(folder: Path, name: object) -> Path:
    """The path of file `name` in `folder`, after checking that it is a regular file that lies
    inside the folder (not a symlink that leaves it, not a device or a pipe)."""
    path = folder / check_member_name(name)
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        raise FormatError(f"{path} is missing; the folder is incomplete") from None
    except OSError as error:
        raise FormatError(f"{path} cannot be read: {error.strerror}") from None
    if stat.S_ISLNK(status.st_mode):
        target = Path(os.path.realpath(path))
        if not target.is_relative_to(Path(os.path.realpath(folder))):
            raise FormatError(f"{path} is a link to {target}, outside the model folder; lowbit reads "
                              "only files inside it")
        status = os.stat(path)
    if not stat.S_ISREG(status.st_mode):
        raise FormatError(f"{path} is not a regular file")
    return path


def read_member(folder: Path, name: object, limit: int) -> bytes:
    """The bytes of a small member (a JSON or text file), refused when larger than `limit`."""
    path = member(folder, name)
    size = path.stat().st_size
    if size > limit:
        raise FormatError(f"{path} is {size:,} bytes, more than the {limit:,} lowbit reads for it")
    with open(path, "rb") as handle:
        return handle.read(limit + 1)[:limit]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_member(folder: Path, name: str, sha256: str, size: int | None) -> Path:
    """The member's path, after its size and sha256 match what was recorded when it was saved."""
    path = member(folder, name)
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise ChecksumError(f"{path} is {actual:,} bytes; {size:,} were recorded when it was saved. "
                            "The file is truncated or was changed: re-save or re-download the model.")
    if file_sha256(path) != sha256:
        raise ChecksumError(f"{path} does not match the sha256 recorded when it was saved: the file is "
                            "corrupt or was changed. Re-save or re-download the model.")
    return path

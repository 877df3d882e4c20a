"""Paths of a zoo workspace: creating, opening and validating one.

A workspace is one folder per zoo project (see ARCHITECTURE.md). Everything the
workbench writes for a project lives inside it, never inside the repository.
"""
from __future__ import annotations

import os
import re
import threading
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

UNKNOWN = "Unknown"
# Names that would collide with the workspace's own folders or with OS devices.
_RESERVED = {"_trash", "_meta.csv", ".", "..", "con", "prn", "aux", "nul"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ZoolibError(ValueError):
    """A problem with the user's input or data, with a message that names it."""


@dataclass(frozen=True)
class Workspace:
    """The folders and files of one zoo project.

    Attributes:
        root: the workspace folder.
    """

    root: Path

    @property
    def library(self) -> Path:
        return self.root / "library"

    @property
    def meta_csv(self) -> Path:
        return self.library / "_meta.csv"

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def models(self) -> Path:
        return self.root / "models"

    @property
    def deployed_json(self) -> Path:
        return self.models / "deployed.json"

    @property
    def bulkid(self) -> Path:
        return self.root / "bulkid"

    @property
    def trash(self) -> Path:
        return self.root / "_trash"

    @property
    def splits(self) -> Path:
        return self.root / "splits"

    @property
    def benchmark_csv(self) -> Path:
        return self.splits / "benchmark.csv"

    @property
    def cache(self) -> Path:
        """Derived data the workbench can always rebuild (scan cache)."""
        return self.root / ".zoolib"

    @property
    def journal_db(self) -> Path:
        return self.root / "zoo.sqlite"

    def __str__(self) -> str:
        return str(self.root)


def create(path: str | Path) -> Workspace:
    """Create an empty workspace (library, inbox, models folders).

    Args:
        path: folder to create; may already exist.

    Returns:
        The workspace.
    """
    ws = Workspace(Path(path).expanduser().resolve())
    for folder in (ws.library, ws.inbox, ws.models):
        folder.mkdir(parents=True, exist_ok=True)
    return ws


def open_workspace(path: str | Path | Workspace) -> Workspace:
    """Open an existing workspace, checking that it has a non-empty library.

    Args:
        path: the workspace folder (or an already opened workspace).

    Returns:
        The workspace.

    Raises:
        ZoolibError: the folder is missing, is not a workspace, or its library
            holds no class folder.
    """
    if isinstance(path, Workspace):
        return path
    if not str(path).strip():
        raise ZoolibError("WORKSPACE is empty: pass the path of a workspace folder")
    ws = Workspace(Path(path).expanduser().resolve())
    if not ws.root.is_dir():
        raise ZoolibError(f"workspace {ws.root} does not exist")
    if not ws.library.is_dir():
        raise ZoolibError(
            f"workspace {ws.root} has no library/ folder: expected library/<class>/<image>"
        )
    if not class_folders(ws):
        raise ZoolibError(f"workspace {ws.root} is empty: library/ holds no class folder")
    return ws


def class_folders(ws: Workspace) -> list[Path]:
    """The class folders of the library, sorted by name (hidden ones skipped)."""
    return sorted(
        p for p in ws.library.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
    )


def check_class_name(name: str) -> str:
    """Check that a class name is a plain folder name and return it.

    Args:
        name: a class name typed by a user.

    Returns:
        The name, unchanged.

    Raises:
        ZoolibError: the name is empty, has a path separator, control characters,
            surrounding spaces, or is reserved.
    """
    if not isinstance(name, str) or not name:
        raise ZoolibError(f"class name {name!r} is empty")
    problems = []
    if "/" in name or "\\" in name:
        problems.append("contains a path separator")
    if _CONTROL.search(name) or any(unicodedata.category(c) == "Cc" for c in name):
        problems.append("contains control characters")
    if name != name.strip():
        problems.append("has leading or trailing spaces")
    if name.startswith("."):
        problems.append("starts with a dot")
    if name.lower() in _RESERVED or name.startswith("_"):
        problems.append("is reserved")
    if len(name.encode()) > 200:
        problems.append("is longer than 200 bytes")
    if problems:
        raise ZoolibError(f"class name {name!r} is not a plain folder name: {', '.join(problems)}")
    return name


def write_atomic(path: str | Path, data: str | bytes | None = None, *,
                 write: Callable[[Path], object] | None = None, fsync: bool = False) -> Path:
    """Write a whole file or nothing: a temporary sibling, then an atomic rename.

    The one helper every writer in zoolib uses. A crash mid-write leaves the old
    file (or none), never half a file. The temporary name is unique per process
    and thread, so two writers never share one, and it starts with a dot, so
    scans and globs skip it.

    Args:
        path: the file to write.
        data: text (written as UTF-8) or bytes; or None when `write` is given.
        write: a function writing the file at the path it is given (for
            example ``lambda p: frame.to_parquet(p)``), for writers that need a path.
        fsync: flush the file and its folder to disk before returning, where a
            power cut must not lose a file the caller already reported written.

    Returns:
        The path written.
    """
    path = Path(path)
    if (data is None) == (write is None):
        raise TypeError("write_atomic needs exactly one of data or write")
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        if write is not None:
            write(tmp)
        elif isinstance(data, (bytes, bytearray, memoryview)):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
        if fsync:
            _fsync(tmp)
        tmp.replace(path)
        if fsync:
            _fsync(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _fsync(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk; folders cannot be opened on Windows."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

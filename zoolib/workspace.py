"""Paths of a zoo workspace: creating, opening and validating one.

A workspace is one folder per zoo project (see ARCHITECTURE.md). Everything the
workbench writes for a project lives inside it, never inside the repository.
"""
from __future__ import annotations

import hashlib
import os
import re
import threading
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

UNKNOWN = "Unknown"
# Names that would collide with the workspace's own folders or with OS devices.
_RESERVED = {"_trash", "_meta.csv", ".", "..", "con", "prn", "aux", "nul"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
NAME_MAX, COUNTER = 255, "~999999"  # bytes of a name where the OS does not say; longest counter


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

    @property
    def served(self) -> Path:
        """Served images kept by content hash for review (`translog`)."""
        return self.root / "served"

    @property
    def settings(self) -> Path:
        """Choices the workspace remembers between notebooks (`embedder.choose`)."""
        return self.root / "settings.json"

    @property
    def cleaning(self) -> Path:
        """Derived tables of the cleaning step (rebuilt by re-running it)."""
        return self.root / "cleaning"

    def internals(self) -> dict[str, Path]:
        """The workspace's own files and folders, by name: everything but the class
        folders of the library and the inbox. The one list of them."""
        return {"library/": self.library, "models/": self.models, "splits/": self.splits,
                "bulkid/": self.bulkid, "_trash/": self.trash, ".zoolib/": self.cache,
                "served/": self.served, "cleaning/": self.cleaning,
                "settings.json": self.settings, "zoo.sqlite": self.journal_db}

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
    if ws.root.is_file():
        raise ZoolibError(f"workspace {ws.root} is a file, not a folder")
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
    if ws.root.is_file():
        raise ZoolibError(f"workspace {ws.root} is a file, not a folder: pass the folder "
                          "that holds library/")
    if not ws.root.is_dir():
        raise ZoolibError(f"workspace {ws.root} does not exist")
    if not ws.library.is_dir():
        raise ZoolibError(f"workspace {ws.root} has no library/ folder: expected "
                          "library/<class>/<image>")
    if not class_folders(ws):
        raise ZoolibError(f"workspace {ws.root} is empty: library/ holds no class folder")
    return ws


def class_folders(ws: Workspace) -> list[Path]:
    """The class folders of the library, sorted by name (hidden ones skipped)."""
    return sorted(p for p in ws.library.iterdir()
                  if p.is_dir() and not p.name.startswith((".", "_")))


def _invisible(c: str) -> bool:
    """Format characters (zero-width spaces and joiners, bidirectional overrides and
    isolates, soft hyphens): they make two names look alike or display reversed."""
    return unicodedata.category(c) == "Cf"


def name_problems(name: str) -> list[str]:
    """Why a class (folder) name is not a plain name; empty when it is.

    The checks of `check_class_name`, as a list, so the library scan can report a
    folder a user made by hand instead of refusing the whole library.
    """
    problems = []
    if "/" in name or "\\" in name:
        problems.append("contains a path separator")
    if _CONTROL.search(name) or any(unicodedata.category(c) == "Cc" for c in name):
        problems.append("contains control characters")
    if any(_invisible(c) for c in name):
        problems.append("contains invisible or bidirectional control characters "
                        f"({', '.join(sorted({f'U+{ord(c):04X}' for c in name if _invisible(c)}))})")
    if name != name.strip():
        problems.append("has leading or trailing spaces")
    if name.startswith("."):
        problems.append("starts with a dot")
    if name.lower() in _RESERVED or name.startswith("_"):
        problems.append("is reserved")
    if is_unknown(name) and name != UNKNOWN:
        problems.append(f"is reserved: spell it {UNKNOWN!r} (the class of images that are "
                        "none of the others)")
    if len(name.encode()) > 200:
        problems.append("is longer than 200 bytes")
    return problems


def name_key(name: str) -> str:
    """The identity of a class name: NFC-normalised and case-folded.

    Two names with the same key ("Lion" and "lion", or "café" typed with a
    combining accent and with a precomposed one) are the same class to a person,
    so the library refuses to train on both (see `library.name_collisions`).
    """
    return unicodedata.normalize("NFC", name).casefold()


def is_unknown(name: str) -> bool:
    """Whether a name is the reserved Unknown class, in any case or Unicode form."""
    return name_key(name) == UNKNOWN.casefold()


def check_class_name(name: str, ws: Workspace | None = None) -> str:
    """Check that a class name typed by a user is a plain folder name.

    Args:
        name: a class name typed by a user.
        ws: when given, the name must not differ only by case or Unicode form
            from an existing class folder (that folder's own name is fine).

    Returns:
        The name in NFC form (what becomes the folder name).

    Raises:
        ZoolibError: the name is empty, has a path separator, control or invisible
            characters, surrounding spaces, is reserved (Unknown in another case
            included), or collides with an existing class.
    """
    if not isinstance(name, str) or not name:
        raise ZoolibError(f"class name {name!r} is empty")
    name = unicodedata.normalize("NFC", name)
    problems = name_problems(name)
    if problems:
        raise ZoolibError(f"class name {name!r} is not a plain folder name: {', '.join(problems)}")
    if ws is not None and ws.library.is_dir():
        for folder in class_folders(ws):
            if folder.name != name and name_key(folder.name) == name_key(name):
                raise ZoolibError(f"class name {name!r} differs from the existing class "
                                  f"{folder.name!r} only by case or accents: use {folder.name!r}")
    return name


# ---------------------------------------------------------------- user files and internals

def lexical(ws: Workspace, path: str | Path) -> Path:
    """The absolute path of a file as named: folders resolved, the last part not followed.

    A symbolic link is then the link itself, never its target, so a move or a
    trash acts on the link (relative paths are taken from the workspace root).
    """
    p = Path(path).expanduser()
    p = p if p.is_absolute() else ws.root / p
    return p.parent.resolve() / p.name


def _inside(path: Path, folder: Path) -> bool:
    return folder == path or folder in path.parents


def user_area(ws: Workspace, path: str | Path) -> str:
    """Where a file lies: "library" (under a class folder), "inbox", "outside" (not in
    the workspace), or "internal" (any other workspace file: the database, models,
    splits, results, the trash, the scan cache, library side files)."""
    p = lexical(ws, path)
    if not _inside(p, ws.root):
        return "outside"
    if _inside(p, ws.inbox) and p != ws.inbox:
        return "inbox"
    if ws.library in p.parents and p.parent != ws.library:
        top = p.relative_to(ws.library).parts[0]
        if not top.startswith((".", "_")):
            return "library"
    return "internal"


def check_user_file(ws: Workspace, path: str | Path, areas=("library", "inbox", "outside"),
                    links: bool = False) -> Path:
    """A file that library actions may move or copy: the file as named, checked.

    Args:
        ws: the workspace.
        path: the file (absolute, or relative to the workspace root).
        areas: where the file may lie (see `user_area`); workspace internals never.
        links: accept a symbolic link (it is then acted on itself, never its target).

    Returns:
        The file's absolute path (see `lexical`).

    Raises:
        ZoolibError: a workspace internal, an area not allowed, a link when links
            are not accepted, not a file, or a name too long for the workspace.
    """
    p, area = lexical(ws, path), user_area(ws, path)
    if area == "internal":
        raise ZoolibError(f"{path} is a workspace internal ({p.relative_to(ws.root).as_posix()}"
                          "): library actions only touch images in library/<class>/ and the "
                          "inbox")
    if area not in areas:
        where = {"outside": "outside the workspace", "inbox": "in the inbox",
                 "library": "in the library"}
        raise ZoolibError(f"{path} is {where[area]}, where this action does not apply "
                          f"(it takes files {', '.join(where[a] for a in areas)})")
    if p.is_symlink():
        if not links:
            raise ZoolibError(f"{path} is a symbolic link: zoolib never follows links; "
                              "copy the file it points to instead")
    elif not p.is_file():
        raise ZoolibError(f"{path} is not a file" + (" (a folder)" if p.is_dir() else ""))
    limit, size = name_limit(ws.library), len(os.fsencode(p.name))
    if size > limit or not cut_stem(p.name, COUNTER + p.suffix, limit):  # a namesake's too
        raise ZoolibError(f"{path}: its name is {size} bytes; the workspace holds names of at "
                          f"most {limit} bytes, a counter ({COUNTER}) included: rename it shorter")
    return p


def name_limit(folder: Path) -> int:
    """The longest name (bytes) `folder`'s file system holds (PC_NAME_MAX, else NAME_MAX)."""
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows), or no answer
        return NAME_MAX


def cut_stem(name: str, tail: str, limit: int) -> str:
    """`name`'s stem cut at a character boundary to fit `limit` bytes before `tail` ("" if none)."""
    stem, room = Path(name).stem, limit - len(os.fsencode(tail))
    while stem and len(os.fsencode(stem)) > room:
        stem = stem[:-1]
    return stem


# ---------------------------------------------------------------- one writer at a time

_LOCKS: dict[Path, tuple[threading.RLock, FileLock]] = {}
_LOCKS_GUARD = threading.Lock()


@contextmanager
def file_lock(path: Path, timeout: float = -1, busy: str | None = None) -> Iterator[None]:
    """Hold the lock file `path`: one holder at a time across processes and threads.

    The one lock helper of zoolib (the workspace's action lock, a training run, a
    bulk-identification run, an ONNX export). Re-entrant within a thread. The
    file is created if needed and never removed: unlinking it on release would
    let a process that opened the old file lock it while a third locks a new one.
    Threads of this process queue on a lock of their own first (a flock taken on
    a fresh file handle per thread would do on Linux, but not on every system).

    Args:
        path: the lock file (callers keep it hidden or in `.zoolib/`).
        timeout: seconds to wait; 0 refuses at once, -1 waits for ever.
        busy: the ZoolibError message when the lock is not had in time.

    Raises:
        ZoolibError (on entry): another holder kept it for `timeout` seconds.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _LOCKS_GUARD:
        local, held = _LOCKS.setdefault(path, (threading.RLock(), FileLock(path,
                                                                           thread_local=False)))
    refused = ZoolibError(busy or f"{path} is held by another process; try again")
    if not local.acquire(timeout=timeout):
        raise refused
    try:
        try:
            held.acquire(timeout=timeout)
        except Timeout:
            raise refused from None
        try:
            yield
        finally:
            held.release()
    finally:
        local.release()


def lock(ws: Workspace, timeout: float = 60):
    """The workspace's action lock: one library action (a batch) at a time, across
    processes and threads (`file_lock` on `.zoolib/actions.lock`); re-entrant within
    a thread, so an action may call another. Use as ``with lock(ws): ...``.

    Raises:
        ZoolibError (on entry): another process held the lock for `timeout` seconds.
    """
    path = ws.cache / "actions.lock"
    return file_lock(path, timeout, f"the workspace is busy: another process holds {path} "
                                    "(a library action is running); try again")


def write_atomic(path: str | Path, data: str | bytes | None = None, *,
                 write: Callable[[Path], object] | None = None, fsync: bool = False) -> Path:
    """Write a whole file or nothing: a temporary sibling (`temp_path`), then an atomic rename.

    The one helper every writer in zoolib uses. A crash mid-write leaves the old
    file (or none), never half a file.

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
    tmp = temp_path(path)
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


def temp_path(path: Path, writer: str = "") -> Path:
    """The temporary sibling of `path`, `.<name's first 24 characters>.<writer>-<tag>.tmp`:
    writer `<pid>-<thread>` (default; "*" globs any), tag a hash of the whole name.
    Short whatever the name (at most ~130 bytes), hidden from scans (a dot-file),
    its pid where `models.remove_dead_temps` reads it, and still saying whose it is."""
    writer = writer or f"{os.getpid()}-{threading.get_ident()}"
    tag = hashlib.blake2s(os.fsencode(path.name), digest_size=6).hexdigest()
    return path.with_name(f".{path.name[:24]}.{writer}-{tag}.tmp")


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

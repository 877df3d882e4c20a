"""The files of a bulk-identification run: listing an inbox, refusing workspace files,
and reading, hashing and decoding each file for the model.

What is identified: every file under the inbox, any depth, except hidden ones
(names starting with "."; hidden folders are not entered). Symbolic links are
never followed: a link (to a file or a folder) gets a row with the error
LINK_ERROR, and so does a pipe, socket or device (SPECIAL_ERROR), which is never
opened; nothing is skipped silently. An inbox that is, holds or lies inside the
workspace's own files (`Workspace.internals`) is refused: discarding its error
rows would move the workspace's files to the trash.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import torch

from ..images import content_hash, read_file, squished_pixels
from ..workspace import Workspace, ZoolibError

LINK_ERROR = "is a symbolic link; zoolib does not follow links"
SPECIAL_ERROR = "is not a regular file (a pipe, socket or device); zoolib does not open it"


class ImageFiles(torch.utils.data.Dataset):
    """Files -> (uint8 HWC pixels or zeros, content hash, error) for a DataLoader.

    Every failure (unreadable, truncated, not an image, decompression bomb) is
    returned as an error string, so one bad file never stops a run.

    Args:
        paths: the files, in the order rows are produced.
        size: the square input size from model.json.
        interpolation: the resize filter from model.json.
        decode: the decode mode from model.json ("full" when it has none).
        refused: path -> error for files that must not be opened (links, pipes:
            see `_not_regular`); they get that error without being read.
    """

    def __init__(self, paths: list[str | Path], size: int, interpolation: str = "bilinear",
                 refused: dict[str, str] | None = None, decode: str = "full"):
        self.paths, self.size = [str(p) for p in paths], int(size)
        self.interpolation, self.refused, self.decode = interpolation, refused or {}, decode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str, str]:
        if self.refused and self.paths[i] in self.refused:
            return self._blank(), "", self.refused[self.paths[i]]
        try:
            data = read_file(self.paths[i])
        except OSError as exc:
            return self._blank(), "", f"{type(exc).__name__}: {exc}"
        digest = content_hash(data)
        if not data:
            return self._blank(), digest, "empty file (0 bytes)"
        try:
            # Decoded like training (EXIF upright, RGB) and squish-resized: the pixels
            # of inference.to_tensor before the float conversion.
            pixels = squished_pixels(data, self.size, self.interpolation, self.decode)
            return torch.from_numpy(pixels), digest, ""
        except Exception as exc:  # noqa: BLE001 - any decoder failure becomes a row's error
            return self._blank(), digest, f"{type(exc).__name__}: {exc}"

    def _blank(self) -> torch.Tensor:
        """Zero pixels standing in for an unreadable file (its row gets no prediction)."""
        return torch.zeros((self.size, self.size, 3), dtype=torch.uint8)


def list_files(folder: Path) -> list[Path]:
    """Every non-hidden entry under `folder` that is not a folder, sorted.

    Any depth; hidden names (".") are skipped and hidden folders not entered.
    Symbolic links (to files or folders, or broken) are listed as themselves and
    never followed, and so are pipes, sockets, devices and folders that cannot be
    listed: `run` gives each an error row (see `_scan`) without opening it, so no
    file is ever left out silently.
    """
    return [Path(p) for p in _scan(folder)[0]]


def _scan(folder: str | Path) -> tuple[list[str], dict[str, str]]:
    """The entries `list_files` lists (as strings, sorted) and the error of each that
    is not a regular file (a link, pipe, socket or device), from one directory walk.

    os.scandir tells a link or a folder from the directory entry itself, with no
    system call per file (os.walk plus os.path.isfile costs a stat per file).
    """
    top = os.fspath(folder)
    found, refused, todo = [], {}, [top]
    while todo:
        where = todo.pop()
        try:
            entries = os.scandir(where)
        except OSError as exc:
            if where == top:
                raise ZoolibError(f"cannot list the inbox {top}: {exc}") from exc
            refused[where] = f"{type(exc).__name__}: {exc}; the folder's files were not listed"
            found.append(where)
            continue
        with entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_symlink():
                    refused[entry.path] = LINK_ERROR
                elif entry.is_dir(follow_symlinks=False):
                    todo.append(entry.path)
                    continue
                elif not entry.is_file(follow_symlinks=False):
                    refused[entry.path] = SPECIAL_ERROR
                found.append(entry.path)
    return sorted(found), refused


def _not_regular(paths: list[str]) -> dict[str, str]:
    """The error of each given path that is a link, pipe, socket or device (one lstat
    each); missing files are left to the reader, which reports them."""
    refused = {}
    for p in paths:
        try:
            mode = os.lstat(p).st_mode
        except OSError:
            continue
        if stat.S_ISLNK(mode):
            refused[p] = LINK_ERROR
        elif not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            refused[p] = SPECIAL_ERROR
    return refused


def input_files(ws: Workspace, inbox: str | Path | None, files: list[Path] | None
                 ) -> tuple[list[str], dict[str, str]]:
    """Absolute file paths as strings (rows are keyed by them), without duplicates, and
    the error of each that must not be opened (links, pipes: see `_scan`)."""
    if files is not None:
        paths = [os.path.abspath(os.path.expanduser(f)) for f in files]
        if not paths:
            raise ZoolibError("files is an empty list: nothing to identify")
        paths = list(dict.fromkeys(paths))  # duplicates would duplicate rows
        return paths, _not_regular(paths)
    folder = Path(inbox).expanduser().resolve() if inbox is not None else ws.inbox
    if not folder.is_dir():
        raise ZoolibError(f"inbox {folder} does not exist or is not a folder")
    _check_inbox(ws, folder)
    paths, refused = _scan(folder)
    if not paths:
        raise ZoolibError(f"inbox {folder} is empty: no file to identify")
    return paths, refused


def _internals(ws: Workspace) -> dict[str, Path]:
    """The workspace's own files and folders (`Workspace.internals`), links resolved."""
    return {k: Path(os.path.realpath(p)) for k, p in ws.internals().items()}


def _check_inbox(ws: Workspace, folder: Path) -> None:
    """Refuse an inbox that is the workspace root, holds it, is or lies inside one of
    its internals, or holds one (linked from elsewhere). The workspace's own inbox/,
    its other folders and folders outside it are fine.

    Every file of an inbox gets a row, and discarding a run's error rows moves the
    files to the trash: an inbox over the workspace would trash its database,
    models and side tables (`library/_meta.csv`, `splits/benchmark.csv`).

    Raises:
        ZoolibError: naming the folder and the workspace files it is, holds or lies in.
    """
    real, root = Path(os.path.realpath(folder)), Path(os.path.realpath(ws.root))
    why = ("bulk identification would list them as inbox files, and discarding their error "
           "rows would move them to _trash/; point the inbox at a folder of new images: "
           f"{ws.inbox} or a folder outside the workspace")
    if real == root or real in root.parents:
        what = "is the workspace root" if real == root else f"contains the workspace {root}"
        raise ZoolibError(f"inbox {folder} {what}, with its library, models, splits and "
                          f"database: {why}")
    internals = _internals(ws)
    for label, path in internals.items():
        if real == path or path in real.parents:
            where = "is" if real == path else "is inside"
            raise ZoolibError(f"inbox {folder} {where} the workspace's {label} ({path}), "
                              f"which holds workspace files, not new images: {why}")
    held = [label for label, path in internals.items() if real in path.parents]
    if held:
        raise ZoolibError(f"inbox {folder} contains the workspace's {', '.join(held)} "
                          f"(linked from {ws.root}): {why}")

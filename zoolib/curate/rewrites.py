"""Rewrites of library files: rotation, orientation tags, merged classes, relabels.

Rotation: the original is moved to `_trash/` (a journal "trash" row) and the rotated
pixels are written as a new file at its path (a "rotate" row naming that trash row).
Undo trashes the rotated file and moves the original back. Each rewrite keeps the
image's split (`splits.record_rewrite`).
"""
from __future__ import annotations


import io
import json
import os
from pathlib import Path

import pandas as pd
from PIL import Image, ImageOps

from .. import journal, library, splits
from ..images import content_hash
from ..workspace import Workspace, ZoolibError, check_class_name, check_user_file, class_folders
from .edits import check_paths, edit_table, locked, read_table, undo_table

ROTATIONS = {90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180,
             270: Image.Transpose.ROTATE_90}  # clockwise degrees -> PIL transpose


def _keep_split(ws: Workspace, rel: str, old: bytes, new: bytes) -> None:
    """Record a rewrite so the image keeps its split (splits.record_rewrite)."""
    splits.record_rewrite(ws, content_hash(old), content_hash(new), rel)



@locked
def rotate(ws: Workspace, path: str, degrees: int) -> int:
    """Rotate a library image clockwise by 90, 180 or 270 degrees, keeping the original.

    The upright pixels (EXIF applied) are turned and written at the same path
    (no orientation tag; JPEG quality 95); the original goes to `_trash/`.

    Returns:
        The journal id of the "rotate" event (undo it with `undo`).
    """
    if degrees not in ROTATIONS:
        raise ZoolibError(f"rotation must be 90, 180 or 270 degrees, got {degrees}")
    rel = check_paths(ws, path)[0]
    src = ws.library / rel
    with Image.open(src) as img:
        fmt = img.format or "PNG"
        turned = ImageOps.exif_transpose(img).transpose(ROTATIONS[degrees])
    buf = io.BytesIO()  # encode before moving anything, so a failure changes nothing
    turned.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    _keep_split(ws, rel, src.read_bytes(), buf.getvalue())
    trashed = journal.trash(ws, src.relative_to(ws.root), reason=f"rotate {degrees}")
    src.write_bytes(buf.getvalue())
    dest = journal.dest(ws, trashed)
    return journal.record(ws, "rotate", path=src.relative_to(ws.root).as_posix(), dest=dest,
                          degrees=degrees, trash_event=trashed)


def undo_rotate(ws: Workspace, row: pd.Series, details: dict) -> int:
    rotated = ws.root / row["path"]
    if not (ws.root / row["dest"]).exists():
        raise ZoolibError(f"cannot undo rotation {row['id']}: original {row['dest']} is missing")
    if rotated.exists():
        journal.trash(ws, row["path"], reason=f"undo rotate {row['id']}")
    journal.undo(ws, int(details["trash_event"]))
    return journal.record(ws, "undo", path=row["path"], undoes=int(row["id"]))


def exif_disagreements(ws: Workspace, manifest: pd.DataFrame) -> pd.DataFrame:
    """Images whose EXIF orientation tag disagrees with their pixels.

    Two cases are detectable from the file alone: a tag outside 1..8, and a
    quarter-turn tag (5..8) on pixels that were already turned (the stored size
    is the camera's recorded PixelXDimension x PixelYDimension swapped), which
    viewers and training would turn a second time.

    Returns:
        Columns path, label, orientation, width, height, problem, suggested
        (the fix: "strip tag" means rewrite upright without the tag).
    """
    rows = []
    tagged = manifest[manifest["readable"] & (manifest["orientation"] != 1)]
    for r in tagged.itertuples():
        problem = ""
        if not 1 <= r.orientation <= 8:
            problem = f"orientation tag {r.orientation} is not a valid value (1..8)"
        elif r.orientation >= 5:
            with Image.open(ws.library / r.path) as img:
                exif = img.getexif().get_ifd(0x8769)
            shot = (exif.get(0xA002), exif.get(0xA003))
            if None not in shot and shot[0] != shot[1] and (r.width, r.height) == shot[::-1]:
                problem = (f"pixels are already turned ({r.width}x{r.height}, camera recorded "
                           f"{shot[0]}x{shot[1]}) but tag {r.orientation} turns them again")
        if problem:
            rows.append({"path": r.path, "label": r.label, "orientation": r.orientation,
                         "width": r.width, "height": r.height, "problem": problem})
    return pd.DataFrame(rows, columns=["path", "label", "orientation", "width", "height",
                                       "problem"])


@locked
def strip_orientation(ws: Workspace, path: str) -> int:
    """Rewrite an image's stored pixels without its EXIF orientation tag (the fix
    for pixels that were already turned); the original goes to `_trash/`, undoable
    like a rotation. Returns the journal event id."""
    rel = check_paths(ws, path)[0]
    src = ws.library / rel
    with Image.open(src) as img:
        fmt = img.format or "PNG"
        img.load()
        buf = io.BytesIO()
        img.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    _keep_split(ws, rel, src.read_bytes(), buf.getvalue())
    trashed = journal.trash(ws, src.relative_to(ws.root), reason="strip orientation tag")
    src.write_bytes(buf.getvalue())
    dest = journal.dest(ws, trashed)
    return journal.record(ws, "rotate", path=src.relative_to(ws.root).as_posix(), dest=dest,
                          degrees=0, trash_event=trashed)


MERGE = "merge"


@locked
def merge_classes(ws: Workspace, source: str, into: str) -> int:
    """Move every image of `library/<source>/` into `library/<into>/`, as one undoable event.

    The fix for two folders that are one class to a person ("Lion" beside
    "lion", see `library.name_issues`). Files keep their names (a counter is
    added where `into` has the name already); their rows in `_meta.csv` and
    `_flags.csv` move with them; the emptied folder is removed. Splits are
    keyed by content, so no image changes split.

    Returns:
        The journal id of the merge (undo it with `undo`).

    Raises:
        ZoolibError: either folder is not a class folder, or they are the same.
    """
    folders = {f.name: f for f in class_folders(ws)}
    for name in (source, into):
        if name not in folders or folders[name].is_symlink():
            raise ZoolibError(f"{name!r} is not a class folder of library {ws.library}")
    if source == into:
        raise ZoolibError(f"cannot merge class {source!r} into itself")
    files = sorted(Path(top) / n for top, dirs, names in os.walk(folders[source])
                   for n in names + [d for d in dirs if (Path(top) / d).is_symlink()])
    for f in files:  # all checked before the first moves: a link stops the merge here
        check_user_file(ws, f, areas=("library",))
    events, tables = _move_images(ws, files, into)
    for folder in sorted((p for p in folders[source].rglob("*") if p.is_dir()), reverse=True):
        folder.rmdir()
    folders[source].rmdir()
    return journal.record(ws, MERGE, path=f"library/{source}", dest=f"library/{into}",
                          label=into, events=events, tables=tables)


RELABEL = "relabel"


@locked
def relabel(ws: Workspace, paths, cls: str) -> int:
    """Move library images to another class folder (a label fix), as one undoable event.

    Their `_meta.csv` and `_flags.csv` rows move with them; the content hash,
    and so the split, stays. A new class name creates the folder.

    Args:
        ws: the workspace.
        paths: library-relative image paths ("lion/x.jpg").
        cls: the class they belong to.

    Returns:
        The journal id of the relabel (undo it with `undo`).

    Raises:
        ZoolibError: a path is not a library image, or the class name is not plain
            (or differs from an existing class only by case).
    """
    cls = check_class_name(cls, ws)
    paths = check_paths(ws, paths)
    same = [p for p in paths if p.split("/", 1)[0] == cls]
    if same:
        raise ZoolibError(f"{same[0]!r} is already in class {cls!r}")
    events, tables = _move_images(ws, [ws.library / p for p in paths], cls)
    return journal.record(ws, RELABEL, path=paths[0], dest=f"library/{cls}", label=cls,
                          paths=paths, events=events, tables=tables)


def _move_images(ws: Workspace, files: list[Path], into: str) -> tuple[list[int], list[int]]:
    """Move checked library files into class `into` with their side-table rows.

    Returns:
        The journal ids of the file moves and of the side-table edits.
    """
    events, moves = [], {}
    for f in files:
        event = journal.copy_into(ws, f, ws.library / into, action="move_image", label=into,
                                  move=True)
        events.append(event)
        moves[f.relative_to(ws.library).as_posix()] = \
            journal.dest(ws, event).removeprefix("library/")
    tables = [_rekey(ws, table, columns, moves) for table, columns in
              ((ws.meta_csv, ["source", "notes"]), (library.flags_csv(ws), library.FLAG_COLUMNS))]
    return events, [t for t in tables if t]


def _rekey(ws: Workspace, path: Path, columns: list[str], moves: dict[str, str]) -> int | None:
    """Move a side table's rows from old to new image paths (one journaled edit)."""
    if not path.exists():
        return None
    table = read_table(path, columns)
    updates: dict[str, dict | None] = {}
    for old, new in moves.items():
        if old in table.index:
            updates[old] = None
            updates[new] = table.loc[old].to_dict()
    return edit_table(ws, path, columns, "rekey", updates) if updates else None


def undo_moves(ws: Workspace, row: pd.Series, details: dict) -> int:
    """Undo a merge or relabel whole, or refuse it with nothing changed.

    Every file is checked first (`_check_undo_moves`); then the files move back,
    newest first, and only then the side tables are restored: a table never
    names a path its file has not reached.

    Raises:
        ZoolibError: the undo could not be complete (see `_check_undo_moves`).
    """
    _check_undo_moves(ws, row, details)
    for event in reversed(details["events"]):
        journal.undo(ws, event)
    for table_event in reversed(details["tables"]):
        table_row = journal.undoable_event(ws, table_event)
        undo_table(ws, table_row, json.loads(table_row["details"]))
    return journal.record(ws, "undo", path=row["path"], undoes=int(row["id"]))


def _check_undo_moves(ws: Workspace, row: pd.Series, details: dict) -> None:
    """Refuse an undo of a merge or relabel that could not be complete (or exact).

    Raises:
        ZoolibError: a later standing event acts on one of its files or their
            side-table rows (named: undo it first), a part of it was undone on its
            own, a file is not where the event put it, or its origin is taken.
    """
    rows = journal.read(ws)
    own = rows[rows["id"].isin(details["events"] + details["tables"])].set_index("id")
    what = f"cannot undo {row['action']} {row['id']}"
    for event in details["events"] + details["tables"]:
        if event not in own.index or own.loc[event, "undone"]:
            raise ZoolibError(f"{what}: its part {event} was undone on its own")
    moves = own.loc[details["events"], ["path", "dest"]]
    blocker = _later_event_on(rows, int(row["id"]), set(moves["path"]) | set(moves["dest"]))
    if blocker is not None:
        raise ZoolibError(f"{what}: a later event still acts on its files; undo event "
                          f"{blocker[0]} ({blocker[1]}) first, then this one")
    for origin, dest in moves.itertuples(index=False):
        if not os.path.lexists(ws.root / dest):
            raise ZoolibError(f"{what}: {dest} is missing (moved or deleted outside zoolib)")
        if os.path.lexists(ws.root / origin):
            raise ZoolibError(f"{what}: {origin} is taken by another file; move it away first")


def _later_event_on(rows: pd.DataFrame, after: int, paths: set[str]) -> tuple[int, str] | None:
    """The latest standing event after `after` that acts on one of `paths` (workspace-
    relative), as (id, action) of what a user undoes: the relabel, merge or rotation
    that a file move or table edit is part of, else the event itself."""
    later = rows[(rows["id"] > after) & ~rows["undone"].astype(bool) & rows["undoes"].isna()]
    details = {int(r.id): json.loads(r.details or "{}") for r in later.itertuples()}
    owner = {part: (int(r.id), r.action) for r in later.itertuples() if r.action in _WHOLES
             for part in _parts(details[int(r.id)])}
    for r in later[::-1].itertuples():
        if _named(r, details[int(r.id)]) & paths:
            return owner.get(int(r.id), (int(r.id), r.action))
    return None


_WHOLES = (MERGE, RELABEL, "rotate")  # events made of parts, undone whole


def _parts(details: dict) -> list[int]:
    """The journal ids of an event's parts (file moves, table edits, a rotation's trash)."""
    return details.get("events", []) + details.get("tables", []) + (
        [details["trash_event"]] if "trash_event" in details else [])


def _named(r, details: dict) -> set[str]:
    """The workspace-relative paths a journal row acts on: its file and destination, and
    the library images its details list (a mark's paths, a table edit's rows)."""
    listed = details.get("paths", []) + [c["path"] for c in details.get("changes", [])]
    return {r.path, r.dest} | {f"library/{p}" for p in listed}

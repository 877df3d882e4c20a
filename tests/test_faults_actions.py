"""Fault injection for library actions: SIGKILL a batch of adds, discards and undos at
seeded points, then check that no user image is lost and the journal tells the truth.

The child process wraps the journal's row writer and file mover so that it kills
itself with SIGKILL at the Nth call, before or after the call: the points between
a journal row and its file move, the ones that matter.
"""
import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections import Counter

import pytest

from zoolib import actions, demo, journal
from zoolib.workspace import open_workspace

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")

CHILD = textwrap.dedent("""
    import os, signal, sys
    from zoolib import actions, journal
    from zoolib.workspace import open_workspace

    kill_at, when = int(sys.argv[2]), sys.argv[3]
    calls = [0]

    def hooked(fn):
        def run(*args, **kwargs):
            calls[0] += 1
            if calls[0] == kill_at and when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            out = fn(*args, **kwargs)
            if calls[0] == kill_at and when == "after":
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        return run

    journal.record, journal._move, journal._copy = map(hooked, (journal.record, journal._move,
                                                                journal._copy))
    ws = open_workspace(sys.argv[1])
    inbox = sorted(p for p in ws.inbox.rglob("*") if p.is_file())
    lions = sorted((ws.library / "lion").iterdir())
    actions.discard(ws, inbox[:4])
    actions.add_to_library(ws, inbox[4:8], "tapir")
    actions.add_to_library(ws, inbox[8:10], "tapir", move=True)
    actions.undo_last(ws)
    actions.discard(ws, lions[:3])
    actions.undo_files(ws, inbox[:2])
    print("calls", calls[0])
""")


def _user_images(ws) -> Counter:
    """sha256 of every image anywhere a user image may be (library, inbox, trash)."""
    found = Counter()
    for top in (ws.library, ws.inbox, ws.trash):
        for p in top.rglob("*"):
            if p.is_file() and not p.name.startswith(("_", ".")):
                found[hashlib.sha256(p.read_bytes()).hexdigest()] += 1
    return found


def _layout(ws) -> Counter:
    """sha256 per place of the library and inbox (not the trash)."""
    return Counter((p.relative_to(ws.root).parts[0], hashlib.sha256(p.read_bytes()).hexdigest())
                   for top in (ws.library, ws.inbox) for p in top.rglob("*")
                   if p.is_file() and not p.name.startswith(("_", ".")))


def _run(root, kill_at: int, when: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHILD, str(root), str(kill_at), when],
                          capture_output=True, text=True, timeout=120)


def _check_journal_matches_files(ws) -> None:
    """Every live move row's file is at its destination; nothing moved without a row."""
    con = sqlite3.connect(ws.journal_db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    for m in actions.marks(ws).itertuples():
        assert (ws.root / m.dest).exists(), f"journal says {m.key} is at {m.dest}"
        if m.status == actions.DISCARDED:
            assert not os.path.lexists(m.path), f"{m.key} is discarded yet still in place"


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    return demo.build(tmp_path_factory.mktemp("faults") / "ws", seed=0)


def test_killed_library_actions_lose_nothing(template, tmp_path):
    import shutil

    shutil.copytree(template.root, tmp_path / "full")
    full = _run(tmp_path / "full", 10**9, "never")
    assert full.returncode == 0, full.stderr
    total = int(full.stdout.split()[-1])
    rng = random.Random(18)
    points = sorted(rng.sample(range(1, total + 1), 6))
    for n, kill_at in enumerate(points):
        root = tmp_path / f"ws{n}"
        shutil.copytree(template.root, root)
        ws = open_workspace(root)
        before_images, before_layout = _user_images(ws), _layout(ws)
        when = "before" if n % 2 else "after"
        out = _run(root, kill_at, when)
        assert out.returncode == -signal.SIGKILL, (kill_at, when, out.stderr[-2000:])
        # every user image is still somewhere in the workspace, none half-written
        assert not +(before_images - _user_images(ws)), f"image lost at call {kill_at} {when}"
        journal.recover(ws)  # what the next action does first
        _check_journal_matches_files(ws)
        while actions.undo_last(ws):  # undo everything that still stands
            pass
        for m in actions.marks(ws).itertuples():  # marks left by per-file undos' batches
            actions.undo_files(ws, [m.path])
        after = _layout(ws)
        assert after == before_layout, f"layout differs after undo (kill at {kill_at} {when})"

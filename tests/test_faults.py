"""Fault injection: bulk identification and training SIGKILLed at chosen points, then resumed.

Each kill point is a hook a child process installs on itself: a wrapped function
that SIGKILLs its own process on its Nth call (before, after, or half-way through
writing a file), so production code carries no test switch. N is drawn from a
seeded generator. After every kill the invariants are checked: no result row
lost or duplicated, every row the same as in an uninterrupted run, every user
image still there (content hashes of library/ and inbox/), the workspace
database intact, no half-written generation, and no temporary of an earlier
kill left (each run cleans up after the one before). The resumed run must end
exactly where an uninterrupted run ends.

The children are forked by one driver process (`subprocess.Popen` of
`sys.executable -c DRIVER`) that imported zoolib once, before any torch
operation: importing torch and fastai costs 5-7 s per process on 2 cores, a
killed run well under one.
"""
import hashlib
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from zoolib import bulkid, demo, journal, models, workspace
from zoolib.runs import INPROGRESS
from zoolib.train import TrainConfig, train

from .test_train import COLOUR_TINY, colour_workspace

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the driver forks (POSIX)")

SEED = 18
MERGED = r"results\.parquet|seg-\d+\.parquet"  # the files a merge writes (first run, later runs)
CHILD_SECONDS = 120  # a child that neither finishes nor dies by then is killed and reported

DRIVER = r'''
import io, json, os, re, signal, sys, time, traceback
import torch
import zoolib.bulkid, zoolib.train  # imported once: every child inherits them
torch.set_num_threads(1)  # as the test process while it compares (see `one_thread`)

class Stop(Exception):
    """Interrupts a run softly (an exception from on_batch), as a user would."""

def kill():
    os.kill(os.getpid(), signal.SIGKILL)

def install(hook):
    """Wrap `module:attr[.attr]` so that its Nth call (among those whose path arguments
    match the regular expression `match`) kills the process before, after or half-way
    through it."""
    module, _, dotted = hook["target"].partition(":")
    owner = __import__(module, fromlist=["_"])
    *parents, attr = dotted.split(".")
    for name in parents:
        owner = getattr(owner, name)
    real, calls = getattr(owner, attr), [0]

    def wrapped(*args, **kw):
        named = " ".join(str(a) for a in args if isinstance(a, (str, os.PathLike)))
        if re.search(hook.get("match", ""), named):
            calls[0] += 1
            if calls[0] == hook["nth"]:
                if hook["when"] == "before":
                    kill()
                if hook["when"] == "cut":  # torch.save(obj, path): half the bytes, then die
                    buf = io.BytesIO()
                    real(args[0], buf, **kw)
                    with open(args[1], "wb") as f:
                        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                    kill()
                result = real(*args, **kw)
                kill()
                return result
        return real(*args, **kw)

    setattr(owner, attr, wrapped)

def bulkid_job(ws, kill_after_batches=None, stop_after_batches=None):
    from zoolib import bulkid
    bulkid.parts.FLUSH_ROWS, bulkid.engine._READ_BATCHES = 1, 1  # a part per batch: many flushes

    def on_batch(done, total):
        if kill_after_batches and done >= kill_after_batches:
            kill()
        if stop_after_batches and done >= stop_after_batches:
            raise Stop()
    bulkid.run(ws, batch_size=1, num_workers=0, progress=False, on_batch=on_batch)

def train_job(ws, cfg):
    from zoolib.train import TrainConfig, train
    train(ws, TrainConfig(**cfg), progress=False)

for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.dup2(2, 1)  # the child's prints go to the log, not into the reply pipe
        code = 0
        try:
            for hook in job["hooks"]:
                install(hook)
            {"bulkid": bulkid_job, "train": train_job}[job["job"]](**job["args"])
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
    deadline = time.monotonic() + job["seconds"]
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            break
        time.sleep(0.005)
    reply = {"pid": pid, "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0,
             "rc": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}
    print(json.dumps(reply), flush=True)
'''


class Driver:
    """The forking driver: `kill(job)` runs one child and returns how it ended."""

    def __init__(self, log_path):
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-c", DRIVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True)

    def run(self, job: str, hooks: list[dict], **args) -> dict:
        self.proc.stdin.write(json.dumps({"job": job, "hooks": hooks, "args": args,
                                          "seconds": CHILD_SECONDS}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the driver died:\n{self.tail()}"
        return json.loads(line)

    def killed(self, job: str, hooks: list[dict], **args) -> int:
        """Run a child that must die by SIGKILL at its hook; its process id."""
        reply = self.run(job, hooks, **args)
        assert reply["signal"] == signal.SIGKILL, f"{reply} (the kill point was never " \
            f"reached, or the run failed):\n{self.tail()}"
        return reply["pid"]

    def tail(self, chars: int = 6000) -> str:
        self.log.flush()
        return self.log_path.read_text()[-chars:]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture
def one_thread():
    """One torch thread here, as in the children: rows and weights computed here and
    there compare bit for bit, and a busy machine slows one thread the least."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    d = Driver(tmp_path_factory.mktemp("faults") / "driver.log")
    yield d
    d.close()


def hook(target: str, nth: int, when: str = "after", match: str = "") -> dict:
    return {"target": target, "nth": nth, "when": when, "match": match}


# ----------------------------------------------------------------------------- invariants

def inventory(ws) -> dict[str, str]:
    """sha256 of every user file: the library's and the inbox's."""
    return {p.relative_to(ws.root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for top in (ws.library, ws.inbox) for p in sorted(top.rglob("*")) if p.is_file()}


def temps(ws) -> list:
    """Temporaries left anywhere in the workspace (every zoolib temporary ends in .tmp)."""
    return sorted(p for p in ws.root.rglob("*") if p.name.endswith(".tmp"))


_PID = re.compile(r"\.(\d+)-[^.]*\.tmp$")


def assert_only_temps_of(ws, pid: int) -> None:
    """Leftovers of earlier kills are gone: a temporary may only be the last child's."""
    stale = [p for p in temps(ws) if int(_PID.search(p.name).group(1)) != pid]
    assert not stale, f"leftovers of earlier kills were not cleaned: {stale}"


def assert_database_ok(ws, events: int) -> None:
    with closing(sqlite3.connect(ws.journal_db)) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert con.execute("SELECT COUNT(*) FROM journal").fetchone()[0] == events


def _value(v):
    """A cell as something == compares exactly (arrays as tuples, missing values as a tag)."""
    if isinstance(v, (np.ndarray, list)):
        return tuple(np.asarray(v).tolist())
    return "missing" if v is None or pd.isna(v) else v


def rows_by_rel(frame) -> dict[str, tuple]:
    """Each row (all columns but the absolute path) by its workspace-relative path."""
    cols = [c for c in bulkid.RESULT_COLUMNS if c not in ("path", "rel")]
    return {r["rel"]: tuple(_value(r[c]) for c in cols) for r in frame.to_dict("records")}


# ----------------------------------------------------------------------------- bulk identification

CLASSES = ["cheetah", "elephant", "flamingo", "leopard", "lion", "okapi", "penguin", "zebra"]


def _generation(ws) -> str:
    """A random-weight zoo_cnn_small at 32 px (the engine does not care how it was trained)."""
    torch.manual_seed(0)
    info = {"arch": "zoo_cnn_small", "img_size": 32, "mean": list(models.IMAGENET_MEAN),
            "std": list(models.IMAGENET_STD), "classes": CLASSES, "resize": "squish",
            "interpolation": "bilinear"}
    return models.save_generation(ws, models.create_model("zoo_cnn_small", len(CLASSES)), info)


def test_bulk_identification_killed_anywhere_resumes_to_the_same_table(driver, one_thread,
                                                                         tmp_path, capsys):
    ws = demo.build(tmp_path / "ws", seed=0)
    _generation(ws)
    journal.record(ws, "note", details="before the kills")
    ref_ws = workspace.open_workspace(shutil.copytree(ws.root, tmp_path / "reference"))
    reference = rows_by_rel(bulkid.run(ref_ws, batch_size=1, num_workers=0, progress=False))
    files, before = {str(p) for p in bulkid.list_files(ws.inbox)}, inventory(ws)
    assert len(reference) == len(files) > 60

    rng = random.Random(SEED)
    n = lambda: rng.randint(2, 8)  # noqa: E731 - batches (= images) before the kill
    kills = [  # each child resumes what the kills before it left
        ("during a batch", [], {"kill_after_batches": n()}),
        ("before a part is written",
         [hook("zoolib.bulkid.parts:PartWriter.flush", n(), "before")], {}),
        ("a part written, not yet renamed",
         [hook("pyarrow.parquet:write_table", n(), match="part-")], {}),
        ("merging leftover parts: written, not yet renamed",
         [hook("zoolib.bulkid.parts:_merge", 1)], {}),
        ("merging leftover parts: renamed, parts not yet removed",
         [hook("zoolib.bulkid.parts:write_atomic", 1, match=MERGED)], {}),
        # The kill before left only parts its merged file holds: removed, not merged.
        ("the merge of an interrupted run: written, not yet renamed",
         [hook("zoolib.bulkid.parts:_merge", 1)], {"stop_after_batches": n()}),
        ("the merge of an interrupted run: renamed, parts not yet removed",
         [hook("zoolib.bulkid.parts:write_atomic", 2, match=MERGED)],
         {"stop_after_batches": n()}),
    ]
    seen: set[str] = set()
    for what, hooks, args in kills:
        pid = driver.killed("bulkid", hooks, ws=str(ws.root), **args)
        rows = bulkid.load_results(ws, "gen-0001-inbox")
        assert rows["path"].is_unique and set(rows["path"]) <= files, what
        assert seen <= set(rows["path"]), f"rows lost after a kill {what}"
        got = rows_by_rel(rows)
        assert {k: reference[k] for k in got} == got, f"rows differ after a kill {what}"
        seen = set(rows["path"])
        assert inventory(ws) == before and models.generation_names(ws) == ["gen-0001"]
        assert_only_temps_of(ws, pid)
        assert_database_ok(ws, events=1)
    assert len(seen) < len(files)  # work was left for the resumed run
    log = driver.tail(10**7)
    assert "removed 1 leftover(s) of a killed process" in log  # a part, a merge
    assert "part(s) left by an interrupted run" in log

    capsys.readouterr()
    out = bulkid.run(ws, batch_size=1, num_workers=0, progress=False)
    # The last kill left parts its renamed merge holds: removed, never merged twice.
    assert "already merged by a killed run" in capsys.readouterr().out
    assert rows_by_rel(out) == reference and set(out["path"]) == files
    run_dir = ws.bulkid / "gen-0001-inbox"
    stored = [p for f in [run_dir / "results.parquet", *(run_dir / "segments").iterdir()]
              for p in pq.read_table(f).column("path").to_pylist()]
    assert sorted(stored) == sorted(files)  # on disk too: one row per file, no duplicate
    assert not list((run_dir / "parts").iterdir()) and temps(ws) == []
    assert inventory(ws) == before
    assert_database_ok(ws, events=1)


# ----------------------------------------------------------------------------- training

def test_training_killed_anywhere_saves_one_generation_like_an_uninterrupted_run(
        driver, one_thread, tmp_path, capsys):
    ws = colour_workspace(tmp_path / "ws")
    journal.record(ws, "note", details="before the kills")
    cfg = {**COLOUR_TINY, "epochs": 4}
    ref_ws = workspace.open_workspace(shutil.copytree(ws.root, tmp_path / "reference"))
    ref = train(ref_ws, TrainConfig(**cfg), progress=False)
    before = inventory(ws)

    rng = random.Random(SEED)
    kills = [  # each child resumes (or restarts) what the kills before it left
        ("during a batch of epoch 1",
         [hook("fastai.learner:Learner._do_one_batch", rng.randint(2, 6), "before")], []),
        ("at the end of an epoch",
         [hook("zoolib.callbacks:ReleaseMemory.after_epoch", rng.randint(1, 2))], []),
        ("while writing the checkpoint (one file, written whole)",
         [hook("torch:save", 1, "cut", match=r"\.state\.pth\.")], []),
        ("kept.pth written, not yet renamed", [hook("torch:save", 1, match=r"\.kept\.pth\.")], []),
        ("inside save_generation", [hook("zoolib.models:save_file", 1)], []),
        ("after save_generation, before the run folder is removed",
         [hook("zoolib.models:save_generation", 1)], ["gen-0001"]),
    ]
    for what, hooks, generations in kills:
        pid = driver.killed("train", hooks, ws=str(ws.root), cfg=cfg)
        assert models.generation_names(ws) == generations, what
        for name in generations:  # a generation is whole or absent
            assert {"model.json", "weights.safetensors"} <= {
                p.name for p in (ws.models / name).iterdir()}
        assert inventory(ws) == before
        assert_only_temps_of(ws, pid)
        assert_database_ok(ws, events=1)
    log = driver.tail(10**7)
    assert "resuming an interrupted run" in log  # from the checkpoint before the cut one
    assert "removed 1 leftover(s) of a killed process" in log  # kept.pth, then the save

    capsys.readouterr()
    r = train(ws, TrainConfig(**cfg), progress=False)
    assert "this run was saved as gen-0001 before it was interrupted" in capsys.readouterr().out
    assert r.name == "gen-0001" and models.generation_names(ws) == ["gen-0001"]
    model, info = models.load_generation(ws, "gen-0001")
    expected, _ = models.load_generation(ref_ws, ref.name)
    for k, v in expected.state_dict().items():  # as if never interrupted
        assert torch.equal(model.state_dict()[k], v), k
    assert info["metrics"]["best_epoch"] == ref.info["metrics"]["best_epoch"]
    assert not (ws.models / INPROGRESS).exists() and temps(ws) == []
    assert inventory(ws) == before
    assert_database_ok(ws, events=1)

"""The folder of a training run in progress: its lock, resume, attempts and checkpoints.

Each run has its own folder under `models/_inprogress/`, named by a hash of its
settings, classes and data, so an interrupted run of other settings keeps its
folder (and can resume). Each epoch is checkpointed there as one file written
whole (`callbacks.Checkpoint`: `checkpoint/state.pth`), so an interrupted run
resumes where it stopped when started again with the same settings; a kill while
writing leaves the previous epoch's checkpoint and a dead temporary that the next
start removes. A run killed after saving its generation but before removing its
folder is not trained again: its run.json carries an id (`attempt`) that the
saved model.json repeats (`run_attempt`), and the next start finds it. A folder
of an older zoolib (several checkpoint files and a state.json) is started again
from epoch 1, saying so.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from fastai.learner import Learner
from fastai.torch_core import get_model

from . import models
from .callbacks import CHECKPOINT
from .workspace import Workspace, ZoolibError, file_lock, write_atomic

INPROGRESS = "_inprogress"


def run_path(ws: Workspace, run_key: dict) -> Path:
    """The run's own in-progress folder, named by a hash of its settings, classes and
    data: an interrupted run of other settings keeps its folder (and can resume)."""
    key = json.dumps(run_key, sort_keys=True, default=str)
    return ws.models / INPROGRESS / hashlib.blake2b(key.encode(), digest_size=8).hexdigest()


@contextmanager
def _exclusive(ws: Workspace, run_dir: Path):
    """Hold the run's lock: a second process starting the same run is refused. The
    lock file lives in `.zoolib/locks/` (it stays; see `workspace.file_lock`)."""
    lock = ws.cache / "locks" / f"train-{run_dir.name}.lock"
    with file_lock(lock, 0, f"the same training run is already going on in another process "
                            f"({run_dir}); wait for it, or change a setting"):
        try:
            yield
        finally:
            if run_dir.parent.exists() and not any(run_dir.parent.iterdir()):
                run_dir.parent.rmdir()


def _run_dir(run_dir: Path, run_key: dict, resume: bool) -> dict | None:
    """Prepare the run folder; the progress of an interrupted run to resume (epochs
    done, history, schedule), else None.

    A folder that cannot be resumed (see `_unresumable`) is started again from
    epoch 1, saying why; temporaries of a killed process in it are removed.

    Raises:
        ZoolibError: the checkpoint is there but unreadable (named, with what to do).
    """
    saved = run_dir / "run.json"
    if resume and saved.exists() and _has_checkpoint(run_dir):
        problem = _unresumable(run_dir)
        if problem is None:
            models.remove_dead_temps(run_dir)
            models.remove_dead_temps(run_dir / "checkpoint")
            state = read_checkpoint(run_dir)
            return {k: state[k] for k in ("epochs_done", "history", "schedule")}
        print(f"cannot resume the interrupted run in {run_dir}: {problem}; "
              "starting it again from epoch 1")
    shutil.rmtree(run_dir, ignore_errors=True)
    (run_dir / "checkpoint").mkdir(parents=True)
    record = {**run_key, "attempt": uuid.uuid4().hex}
    write_atomic(saved, json.dumps(record, indent=2, default=str))
    return None


def _has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / "checkpoint" / CHECKPOINT).exists() or (run_dir / "state.json").exists()


def _unresumable(run_dir: Path) -> str | None:
    """Why an interrupted run's folder cannot be resumed, or None when it can."""
    if not (run_dir / "checkpoint" / CHECKPOINT).exists():
        return ("it was written by an older zoolib (a state.json and several checkpoint "
                "files, which a kill could leave from two epochs)")
    return None


def read_checkpoint(run_dir: Path) -> dict:
    """The checkpoint of an interrupted run (`callbacks.Checkpoint`'s one dict).

    Raises:
        ZoolibError: it cannot be read, naming the file and what to do.
    """
    path = run_dir / "checkpoint" / CHECKPOINT
    try:
        state = torch.load(path, weights_only=False)
        int(state["epochs_done"]), list(state["history"]), dict(state["schedule"])
        dict(state["model"]), dict(state["optimizer"])
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a damaged file
        raise ZoolibError(f"{path} is unreadable ({type(exc).__name__}: {exc}): the "
                          f"interrupted run cannot resume; set RESUME=False (or delete "
                          f"{run_dir}) to train it again from epoch 1") from exc
    return state


def attempt_id(run_dir: Path) -> str | None:
    """The id of the run attempt in a run folder (None for a folder of older zoolib)."""
    try:
        return json.loads((run_dir / "run.json").read_bytes()).get("attempt")
    except (OSError, ValueError, AttributeError):
        return None


def _saved_as(ws: Workspace, run_dir: Path) -> str | None:
    """The generation an interrupted run was saved as before it could remove its folder."""
    attempt = attempt_id(run_dir) if run_dir.is_dir() else None
    if attempt is None:
        return None
    for name in reversed(models.generation_names(ws)):
        if models.read_info(ws, name).get("run_attempt") == attempt:
            return name
    return None


def discard_run(run_dir: Path) -> None:
    """Remove a finished run's folder: renamed first (atomic), so a kill part-way
    through the removal leaves a dead temporary (`models.remove_dead_temps` cleans
    it), never a folder that looks like a run to resume."""
    if not run_dir.exists():
        return
    dead = run_dir.with_name(f".{run_dir.name}.{os.getpid()}-done.tmp")
    run_dir.rename(dead)
    shutil.rmtree(dead, ignore_errors=True)


def open_run(held: ExitStack, ws: Workspace, run_dir: Path, run_key: dict,
              resume: bool) -> tuple[str | None, dict | None]:
    """Take the run's lock into `held` and find where the run stands (rank 0: it writes).

    Returns:
        The generation an earlier attempt of this run saved before it was stopped
        (its leftover folder removed) or None; the state of an interrupted run to
        resume or None.
    """
    held.enter_context(_exclusive(ws, run_dir))
    models.remove_dead_temps(run_dir.parent)  # folders of finished runs killed mid-removal
    _mention_others(run_dir)
    saved = _saved_as(ws, run_dir) if resume else None
    if saved is None:
        return None, _run_dir(run_dir, run_key, resume)
    print(f"this run was saved as {saved} before it was interrupted: removing its "
          f"leftover folder {run_dir}")
    discard_run(run_dir)
    return saved, None


def _mention_others(run_dir: Path) -> None:
    """Say which other interrupted runs wait in `_inprogress/` (another setting of the
    same workspace), so none is left there for ever without a word."""
    others = sorted(p for p in run_dir.parent.glob("*/run.json") if p.parent != run_dir)
    if others:
        names = ", ".join(p.parent.name for p in others)
        print(f"{len(others)} other interrupted run(s) in {run_dir.parent} ({names}): "
              "started again with their settings they resume; delete a folder to drop it")


def already_saved(ws: Workspace, name: str, data: pd.DataFrame) -> TrainResult:
    """The result of a run that saved `name` and was stopped before removing its folder."""
    history = pd.read_csv(ws.models / name / "history.csv")
    return TrainResult(name=name, info=models.read_info(ws, name), history=history, splits=data)


def load_checkpoint(learn: Learner, state: dict) -> None:
    """Put an interrupted run's weights and optimizer state (`read_checkpoint`) back."""
    get_model(learn.model).load_state_dict(state["model"])
    if learn.opt is None:
        learn.create_opt()
    learn.opt.load_state_dict(state["optimizer"])


def save_kept(ckpt: Path, learn: Learner) -> None:
    """Save the weights a run keeps (the averaged ones when averaging) to kept.pth."""
    # get_model: under several processes the model is wrapped in DistributedDataParallel
    model = learn.ema.average.module if hasattr(learn, "ema") else get_model(learn.model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    write_atomic(ckpt / "kept.pth", write=lambda p: torch.save(state, p))


@dataclass
class TrainResult:
    """What a finished run produced."""

    name: str
    info: dict
    history: pd.DataFrame
    splits: pd.DataFrame = field(repr=False)

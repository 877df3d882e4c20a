"""The engine of bulk identification: files in, rows of the results table out.

`run(workspace, generation, inbox)` predicts every file under a folder (any depth)
into the run's results dataset (see `zoolib.bulkid.results`), one row per file.

How a run streams:

- A torch DataLoader over the file list reads, hashes, decodes and resizes in
  worker processes while the main process runs the model, so memory holds a few
  batches whatever the inbox size. (On a small CPU-only machine the default is
  to decode in the main process, a few batches at a time: there no core is
  idle to overlap with.) Files are decoded by `images.squished_pixels` with the
  generation's decode mode, the pixels training saw. Workers hand over uint8
  pixels (4x less to copy than floats); normalisation happens per batch, on the
  model's device, with the same float32 operations as `inference.to_tensor`
  (bit for bit), into channels-last memory, which the model runs faster on.
- Finished rows go to the results module's part writer, flushed every few
  seconds; a re-run with the same name skips every path already done.

What is identified, and which inboxes are refused: see `zoolib.bulkid.inbox`.

Scores:

- confidence: the top softmax probability; margin: top-1 minus top-2
  probability; entropy: of the softmax, in nats (0 = certain, log(classes) = flat).
- ood: the energy score of Liu et al. 2020, ``-logsumexp(logits)``. Higher means
  more out-of-distribution. Unlike ``1 - confidence`` it keeps the logits' scale,
  which falls for inputs unlike anything seen in training (junk, new species),
  even when the softmax happens to be peaked.
- knn: 1 - cosine similarity to the 10th nearest training image of the generation,
  in the pooled features of the network's stage before the last (Sun et al.
  2022; see zoolib/neighbours.py for why that stage). Higher means farther from
  everything the model was trained on; NaN in runs made with `knn=False`.
- embedding: the pre-logit features (float16), for "more like this".
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import torch
from tqdm.auto import tqdm

from .. import inference, neighbours
from ..embedder import MODEL, EmbeddingCache, display_name, for_workspace
from ..images import RESAMPLE
from ..machine import cores as machine_cores
from ..preprocess import normalise
from ..models import resolve_generation
from ..workspace import UNKNOWN, Workspace, ZoolibError, open_workspace
from . import embedded, parts, results, schema
from .rows import table as _rows
from .inbox import LINK_ERROR, SPECIAL_ERROR, ImageFiles, input_files, list_files  # noqa: F401

_READ_BATCHES = 4  # model batches decoded in a row when decoding in this process ...
_READ_BYTES = 64 << 20  # ... while their pixels take at most this much (or one batch)
ENGINES = ("local", "ray")
RAY_INSTALL = "pip install -e '.[ray]' (in the zoolib checkout)"
RAY_BATCHES = 4  # model batches per Ray call


# ----------------------------------------------------------------------------- the run

def run(workspace, generation: str = "last", inbox: str | Path | None = None,
        name: str | None = None, batch_size: int = 64, num_workers: int | None = None,
        progress: bool = True, files: list[Path] | None = None,
        on_batch: Callable[[int, int], None] | None = None, device: str | None = None,
        knn: bool = True, runtime: str | None = None, engine: str = "local",
        address: str | None = None, lazy: bool = False, tta: bool = False,
        embedder: str = MODEL):
    """Predict every file under an inbox folder into `bulkid/<name>/results.parquet`.

    Args:
        workspace: a workspace path or Workspace.
        generation: "last" (the newest, throw-away runs included) or a generation name.
        inbox: the folder to identify (any depth); WORKSPACE/inbox when None.
        name: the run's folder under bulkid/; "<generation>-inbox" when None
            ("<generation>-files" when `files` is given).
        batch_size: images per forward pass.
        num_workers: decoding processes; None = all spare cores (at most 16) with a
            GPU, none on a CPU with up to 4 cores, else 2 (see `_default_workers`).
            With engine="ray": the number of model actors (None = the cluster's CPUs).
        progress: show a progress bar (images/s).
        files: identify exactly these files instead of listing `inbox`.
        on_batch: called after every batch with (rows done in this call, rows to do);
            a widget can show progress with it (an exception raised there stops the
            run after saving what is done).
        device: "cpu", "cuda", ...; None = a GPU if there is one.
        knn: score each image by its distance to the generation's training images
            (the `knn` column; see zoolib/neighbours.py). The first run of a
            generation embeds its training images once (cached).
        runtime: "torch", "onnx" or "onnx-int8" (`inference.RUNTIMES`); None =
            `inference.default_runtime()`: onnx where installed, else torch
            (torch on a GPU). The ONNX ones run on the CPU and export the
            generation on first use (see zoolib/onnx_export.py).
        engine: "local" (this process) or "ray": a Ray Data pipeline whose actors
            (the model loaded once per actor) identify the files; the rows, the
            table and resuming are the same. Needs `pip install -e '.[ray]'`; the
            files and the workspace must be readable at the same paths on every node.
        address: with engine="ray", the cluster to join ("auto", "ray://host:10001");
            None = RAY_ADDRESS if set, else a local cluster on this machine's cores.
        lazy: return the run opened lazily (`view.open_view`) instead of loading the
            whole table: memory then does not grow with the inbox.
        tta: multi-crop test-time augmentation (`inference.tta_views`: six passes
            per image, the scores of their averaged logits); recorded in the run's
            run.json, and a run is never resumed with the other setting.
        embedder: "model", or a pretrained EMBEDDER whose vectors fill the knn and
            embedding columns (`bulkid.embedded`); recorded in run.json likewise.

    Symbolic links, pipes, sockets and devices are never opened: each gets a row
    with an error (`LINK_ERROR`, `SPECIAL_ERROR`), as unreadable files do. Hidden
    files are not listed. See the module docstring for how a killed run is
    cleaned up and resumed.

    Returns:
        The whole results table of the run (rows of earlier calls included), with
        columns `schema.RESULT_COLUMNS`; `attrs` holds generation, classes and name.
        With `lazy`, a `view.ResultsView` of it.

    Raises:
        ZoolibError: missing or empty inbox, an inbox that is, holds or lies inside
            workspace internals, unknown generation, bad name or batch size, a run
            of that name made with another generation or going on in another process.
    """
    ws = open_workspace(workspace)
    if int(batch_size) < 1:
        raise ZoolibError(f"batch_size must be at least 1, got {batch_size}")
    if engine not in ENGINES:
        raise ZoolibError(f"engine must be one of {', '.join(map(repr, ENGINES))}, "
                          f"not {engine!r}")
    loaded = inference.load(ws, generation, device=device, runtime=runtime, tta=tta)
    _check_preprocessing(loaded)
    paths, refused = input_files(ws, inbox, files)
    name = name or f"{loaded.name}-{'inbox' if files is None else 'files'}"
    run_dir = results.run_dir(ws, name)
    with results.exclusive(run_dir, name):
        results.open_run(run_dir, name, loaded, display_name(embedder, ws))
        done = results.recover(run_dir)
        skip = pc.is_in(pa.array(paths, pa.string()), value_set=done)
        todo = [p for p, done_ in zip(paths, skip.to_numpy(zero_copy_only=False)) if not done_]
        if todo:
            own = knn and embedder == MODEL
            ref = neighbours.reference(ws, loaded) if own else None  # cached for actors too
            post = _post(ws, loaded, embedder, knn, progress)
            if engine == "ray":
                _predict_ray(ws, loaded, run_dir, todo, int(batch_size), num_workers,
                             progress, on_batch, own, refused, address, post)
            else:
                _predict(ws, loaded, run_dir, todo, int(batch_size), num_workers, progress,
                         on_batch, ref, refused, post)
    if lazy:  # a big inbox: the table stays on disk, opened as the widget reads it
        from .view import open_view

        return open_view(ws, name)
    return results.load_results(ws, name)


def identify_unknown(workspace, generation: str = "last", name: str | None = None,
                     **kw) -> pd.DataFrame:
    """Bulk-identify the images filed in the library as Unknown.

    Same engine and table as `run`; the run is named "<generation>-unknown" by default.

    Raises:
        ZoolibError: the library has no Unknown folder or it holds no file.
    """
    ws = open_workspace(workspace)
    folder = ws.library / UNKNOWN
    files = list_files(folder) if folder.is_dir() else []
    if not files:
        raise ZoolibError(f"{folder} holds no file to identify")
    gen = resolve_generation(ws, generation, include_throwaway=True)
    return run(ws, gen, name=name or f"{gen}-unknown", files=files, **kw)


def _post(ws: Workspace, loaded: inference.Loaded, embedder: str, knn: bool, progress: bool
          ) -> Callable[[pa.Table], pa.Table]:
    """What each table of rows goes through before it is written: nothing, or the
    pretrained embedder's knn and embedding (`embedded.rescore`)."""
    if embedder == MODEL:
        return lambda table: table
    ref = embedded.reference(ws, loaded.name, embedder, progress) if knn else None
    cache = EmbeddingCache(ws, for_workspace(ws, embedder))  # once: not per table
    return lambda table: embedded.rescore(cache, ref, table)


def _check_preprocessing(loaded: inference.Loaded) -> None:
    """Refuse a model.json asking for preprocessing this engine does not do."""
    info = loaded.info
    resize, interp = info.get("resize", "squish"), info["interpolation"]
    if resize != "squish" or interp not in RESAMPLE:
        raise ZoolibError(f"{loaded.name}/model.json asks for resize={resize!r}, "
                          f"interpolation={interp!r}; bulk identification does squish "
                          f"with {', '.join(RESAMPLE)}")


def _default_workers(cuda: bool) -> int:
    """Decoding processes for a run.

    On a GPU, every spare core (CPU decoding is the bottleneck there). On a CPU
    the model keeps every core busy, so overlap gains nothing: with up to 4 cores
    decoding stays in the main process (measured on 2 cores at 32 px, decoding
    and model only: 0.81-0.85x of the bare forward with no worker, 0.69-0.76x
    with one, even at the idle scheduling class, as it preempts the model's
    thread team); with more, 2 workers and the model gets the other cores.
    """
    cores = machine_cores()
    if cuda:
        return max(0, min(cores - 1, 16))
    return 0 if cores <= 4 else 2


def _predict(ws: Workspace, loaded: inference.Loaded, run_dir: Path, todo: list[str],
             batch_size: int, num_workers: int | None, progress: bool,
             on_batch: Callable[[int, int], None] | None,
             ref: torch.Tensor | None, refused: dict[str, str] | None = None,
             post: Callable[[pa.Table], pa.Table] = lambda table: table) -> None:
    """Stream `todo` through the model, flushing parts (each table through `post`);
    always leaves a merged table."""
    cuda = loaded.device.type == "cuda"
    workers = _default_workers(cuda) if num_workers is None else int(num_workers)
    # Decoding in this process: several model batches per read, so the decoder's
    # code and tables stay in cache from one image to the next instead of being
    # evicted by every forward pass (~4 of ~30 us per 32 px image).
    per_read = batch_size * (_read_batches(batch_size, loaded.info["img_size"])
                             if workers == 0 else 1)
    loader = torch.utils.data.DataLoader(
        ImageFiles(todo, loaded.info["img_size"], loaded.info["interpolation"], refused,
                   loaded.info["decode"]),
        batch_size=per_read, shuffle=False,
        num_workers=workers, pin_memory=cuda, persistent_workers=False)
    writer = parts.PartWriter(run_dir, parts.schema(loaded))
    threads = torch.get_num_threads()
    if not cuda and workers and threads > 4:
        # On a CPU the decoders and the model share the cores: give the model the
        # others, as an oversubscribed thread team stalls on every preemption.
        torch.set_num_threads(max(1, threads - workers))
    bar = tqdm(total=len(todo), unit="img", desc=f"identifying with {loaded.name}",
               disable=not progress, smoothing=0.1)
    start, done, scored = 0, 0, []  # rows in the table, rows scored, their scores
    try:
        for pixels, hashes, errors in loader:
            for i in range(0, len(hashes), batch_size):
                batch = slice(i, i + batch_size)
                scored.append(_score_batch(loaded, pixels[batch], errors[batch], ref))
                done += len(hashes[batch])
                bar.update(len(hashes[batch]))
                if on_batch is not None:
                    on_batch(done, len(todo))
            # One table per read, not per model batch: Arrow's cost per call, paid
            # cold after every forward pass, was ~10 us per 32 px image per batch.
            writer.add(post(_rows(ws, loaded, todo[start:done], hashes, errors, scored)))
            start, scored = done, []
    finally:
        if scored:  # batches scored before an interruption keep their rows
            n = done - start
            writer.add(post(_rows(ws, loaded, todo[start:done], hashes[:n], errors[:n], scored)))
        torch.set_num_threads(threads)
        bar.close()
        writer.flush()
        parts.consolidate(run_dir)


def identify_files(ws: Workspace, loaded: inference.Loaded, paths: list[str],
                   ref: torch.Tensor | None = None, refused: dict[str, str] | None = None,
                   batch_size: int = 64) -> pa.Table:
    """The work of every engine on one batch of files, with nothing else: file paths in,
    their rows of the results table out (SCHEMA, in the order of `paths`).

    Args:
        ws: the workspace (rows name files relative to its root).
        loaded: the generation, loaded for inference.
        paths: absolute file paths.
        ref: the knn reference (`neighbours.reference`), or None for no knn score.
        refused: path -> error for files never to be opened (links, pipes).
        batch_size: images per forward pass.
    """
    if not paths:
        return schema.SCHEMA.empty_table()
    info = loaded.info
    files = ImageFiles(paths, info["img_size"], info["interpolation"], refused, info["decode"])
    items = [files[i] for i in range(len(files))]
    pixels = torch.stack([item[0] for item in items])
    hashes, errors = [item[1] for item in items], [item[2] for item in items]
    scored = [_score_batch(loaded, pixels[i:i + batch_size], errors[i:i + batch_size], ref)
              for i in range(0, len(items), batch_size)]
    return _rows(ws, loaded, [str(p) for p in paths], hashes, errors, scored)


class _RayIdentifier:
    """A Ray Data actor: the generation loaded once, then `identify_files` per batch."""

    def __init__(self, root: str, generation: str, runtime: str, device: str, knn: bool,
                 batch_size: int, tta: bool = False):
        torch.set_num_threads(1)  # one CPU per actor: the cluster places the actors
        self.ws = open_workspace(root)
        self.loaded = inference.load(self.ws, generation, device=device, runtime=runtime,
                                     tta=tta)
        self.ref = neighbours.reference(self.ws, self.loaded) if knn else None
        self.batch_size = batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        paths = batch.column("path").to_pylist()
        refused = {p: e for p, e in zip(paths, batch.column("refused").to_pylist()) if e}
        return identify_files(self.ws, self.loaded, paths, self.ref, refused, self.batch_size)


def _ray():
    """The ray module, or a ZoolibError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data is the part used
    except ImportError as exc:
        raise ZoolibError(f"engine='ray' needs Ray Data, which is not installed ({exc}): "
                          f"{RAY_INSTALL}; or use engine='local'") from exc
    return ray


def _predict_ray(ws: Workspace, loaded: inference.Loaded, run_dir: Path, todo: list[str],
                 batch_size: int, num_workers: int | None, progress: bool,
                 on_batch: Callable[[int, int], None] | None, knn: bool,
                 refused: dict[str, str] | None, address: str | None,
                 post: Callable[[pa.Table], pa.Table]) -> None:
    """`_predict` on Ray Data: actors identify, this process writes the parts (and runs
    `post`: a pretrained embedder's pass is not spread over the cluster yet).

    The rows come back in the order of `todo` (preserve_order), so the parts,
    the table and resuming are those of the local engine.
    """
    ray = _ray()
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 num_cpus=None if address or os.environ.get("RAY_ADDRESS") else machine_cores())
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    actors = int(num_workers) if num_workers else max(1, int(ray.cluster_resources()["CPU"]))
    gpu = loaded.device.type == "cuda"
    items = pa.table({"path": todo, "refused": [(refused or {}).get(p, "") for p in todo]})
    # Blocks made here: a repartition would be a task needing a CPU that the actors
    # hold, and the pipeline would wait for ever on a small cluster. A block is a few
    # model batches, as Ray's cost per call (~10-20 ms) would dominate small images.
    per_call = batch_size * RAY_BATCHES
    blocks = [items.slice(i, per_call) for i in range(0, len(todo), per_call)]
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # not a line per dataset run
    rows = ray.data.from_arrow(blocks) \
        .map_batches(_RayIdentifier, batch_format="pyarrow", batch_size=per_call,
                     concurrency=actors, num_cpus=0 if gpu else 1, num_gpus=1 if gpu else 0,
                     fn_constructor_kwargs=dict(
                         root=str(ws.root), generation=loaded.name, runtime=loaded.runtime,
                         device=str(loaded.device), knn=knn, batch_size=batch_size,
                         tta=loaded.tta))
    writer = parts.PartWriter(run_dir, parts.schema(loaded))
    bar = tqdm(total=len(todo), unit="img", desc=f"identifying with {loaded.name} on Ray",
               disable=not progress, smoothing=0.1)
    done = 0
    try:
        for table in rows.iter_batches(batch_format="pyarrow", batch_size=None):
            writer.add(post(table.cast(schema.SCHEMA)))  # Ray may widen types (large_binary)
            done += table.num_rows
            bar.update(table.num_rows)
            if on_batch is not None:
                on_batch(done, len(todo))
    finally:
        bar.close()
        writer.flush()
        parts.consolidate(run_dir)


def _read_batches(batch_size: int, size: int) -> int:
    """Model batches to decode in a row: up to _READ_BATCHES within _READ_BYTES of pixels."""
    return max(1, min(_READ_BATCHES, _READ_BYTES // (batch_size * int(size) ** 2 * 3)))


@torch.inference_mode()
def _scores(loaded: inference.Loaded, x: torch.Tensor,
            ref: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """Probabilities, top-5, margin, entropy, energy, kNN distance and embeddings of a batch.

    One pass of the loaded runtime (`inference.outputs`), keeping the logits
    (the energy score needs them) and computing every score on the model's
    device, so a batch costs one transfer back and no small CPU operations.
    """
    # With knn, the one pass gives the pooled stage features the score needs too.
    heads = inference.outputs(loaded, x, stage=ref is not None)
    probs, logits, feats = heads["probs"], heads["logits"], heads["embedding"]
    top_p, top_i = probs.topk(min(5, probs.shape[1]), dim=1)
    out = {"top_p": top_p, "top_i": top_i, "margin": top_p[:, 0] - top_p[:, 1],
           "entropy": -(probs * probs.clamp_min(1e-12).log()).sum(dim=1),
           "ood": -torch.logsumexp(logits, dim=1), "emb": feats.to(torch.float16)}
    if ref is not None:
        out["knn"] = neighbours.kth_distance(ref, heads["stage"])
    return {k: v.cpu().numpy() for k, v in out.items()}


def _score_batch(loaded: inference.Loaded, pixels: torch.Tensor, errors: list[str],
                 ref: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """`_scores` of a batch's readable images, with `ok` marking which rows they are."""
    ok = np.array([e == "" for e in errors], dtype=bool)
    if not ok.any():
        return {"ok": ok}
    # Index only when needed: a fresh tensor would lose the pinned memory.
    kept = pixels if ok.all() else pixels[torch.from_numpy(ok)]
    return {"ok": ok, **_scores(loaded, normalise(kept, loaded.info, loaded.device), ref)}

"""Data-parallel training: torchrun starts 2 CPU processes (gloo) on a tiny workspace."""
import json
import os
import socket
import subprocess
import sys

import pandas as pd
import pytest
import torch
import torch.distributed
import torch.distributed as dist
from fastai.callback.core import Callback

from zoolib import inference, models
from zoolib.config import read_params
from zoolib.train import TrainConfig, train
from zoolib.workspace import ZoolibError

from .test_train import COLOUR_TINY, colour_workspace

pytestmark = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(ws, tmp_path, **params) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=2 -m zoolib.train --workspace WS params.json`."""
    file = tmp_path / "params.json"
    file.write_text(json.dumps({k.upper(): v for k, v in {**COLOUR_TINY, **params}.items()}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           "-m", "zoolib.train", "--workspace", str(ws.root), str(file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 processes on 2 cores
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _files(root) -> set[str]:
    """Every file but the run locks (`.zoolib/locks/`, named by the run, kept by design)."""
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_file() and not p.relative_to(root).as_posix().startswith(".zoolib/locks/")}


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """A scratch run and a warm start, each on 2 processes, in one workspace."""
    tmp = tmp_path_factory.mktemp("ddp")
    ws = colour_workspace(tmp / "ws")
    first = _torchrun(ws, tmp)
    after_first = _files(ws.root)
    second = _torchrun(ws, tmp, init_from="last")
    return ws, first, after_first, second


def test_two_processes_save_exactly_one_generation(ddp_runs):
    ws, first, after_first, _ = ddp_runs
    assert "saved gen-0001" in first.stdout and first.stdout.count("saved gen-") == 1
    assert {p.split("/")[1] for p in after_first if p.startswith("models/")} == {"gen-0001"}


def test_the_generation_is_written_as_a_single_process_run_writes_it(ddp_runs, tmp_path):
    ws, _, after_first, _ = ddp_runs
    single = colour_workspace(tmp_path / "single")
    train(single, TrainConfig(**COLOUR_TINY), progress=False)
    assert after_first == _files(single.root)  # no second generation, checkpoint or lock
    info, alone = models.read_info(ws, "gen-0001"), models.read_info(single, "gen-0001")
    assert set(info) == set(alone) and set(info["metrics"]) == set(alone["metrics"])
    assert (info["processes"], alone["processes"]) == (2, 1)
    assert info["classes"] == alone["classes"] == ["blue", "green", "red"]
    assert (info["init"], info["parent"], info["config"]) == ("scratch", None, alone["config"])
    hist = pd.read_csv(ws.models / "gen-0001" / "history.csv")
    assert list(hist.columns) == list(pd.read_csv(single.models / "gen-0001" / "history.csv"))
    assert hist["epoch"].tolist() == list(range(1, len(hist) + 1)) == [1, 2]


def test_the_saved_weights_load_and_predict_every_class(ddp_runs):
    ws = ddp_runs[0]
    loaded = inference.load(ws, "gen-0001")
    for k, cls in enumerate(loaded.classes):  # the colours are easy: each is predicted
        files = sorted((ws.library / cls).iterdir())[:4]
        batch = torch.stack([inference.file_tensor(f, loaded.info) for f in files])
        probs, _ = inference.forward(loaded, batch)
        assert probs.shape == (4, 3) and torch.allclose(probs.sum(1), torch.ones(4), atol=1e-4)
        assert (probs.argmax(1) == k).sum() >= 3, (cls, probs)


def test_a_second_run_on_two_processes_warm_starts_from_the_first(ddp_runs):
    ws, _, _, second = ddp_runs
    assert models.generation_names(ws) == ["gen-0001", "gen-0002"]
    info = models.read_info(ws, "gen-0002")
    assert (info["init"], info["parent"], info["processes"]) == ("warm", "gen-0001", 2)
    assert info["transferred_tensors"] > 0 and "parent=gen-0001" in second.stdout
    assert not (ws.models / "_inprogress").exists()


def test_a_parameter_file_is_read_with_upper_case_names(tmp_path):
    (tmp_path / "p.yaml").write_text("epochs: 3\nBATCH_SIZE: 16\nREPORT_DIR: x\n")
    cfg = TrainConfig.from_params(read_params(tmp_path / "p.yaml"))
    assert (cfg.epochs, cfg.batch_size) == (3, 16)
    (tmp_path / "bad.yaml").write_text("- 1\n")
    with pytest.raises(ZoolibError, match="mapping"):
        read_params(tmp_path / "bad.yaml")


def test_pyyaml_is_a_declared_dependency():
    """config.read_params imports yaml: it must not arrive only through papermill."""
    import tomllib
    from pathlib import Path

    deps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    names = [d.split("==")[0].split(">")[0].lower() for d in deps["project"]["dependencies"]]
    assert "pyyaml" in names


# ----------------------------------------------------------------------- the DDP machinery
# Two gloo processes train one step of a two-parameter model through the same fastai
# callbacks `train` uses; the test fails when `parallel_callbacks` does nothing.

def _learner(x: torch.Tensor, bs: int = 8):
    from fastai.data.core import DataLoaders, TfmdDL
    from fastai.learner import Learner
    from fastai.losses import MSELossFlat
    from fastai.optimizer import SGD
    from fastai.test_utils import RegModel
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)  # the same start on every process
    ds = TensorDataset(x, 2 * x + 3)
    dls = DataLoaders(TfmdDL(ds, bs=bs, shuffle=False, num_workers=0),
                      TfmdDL(ds, bs=bs, num_workers=0))
    return Learner(dls, RegModel(), loss_func=MSELossFlat(), opt_func=SGD, lr=0.1)


class _Seen(Callback):
    def before_fit(self):
        self.x = []

    def before_batch(self):
        if self.training:
            self.x += self.xb[0].flatten().tolist()


def _ddp_worker(rank: int, port: int, out: str, x: torch.Tensor) -> None:
    from zoolib import distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        learn, seen = _learner(x), _Seen()
        learn.fit(1, cbs=[*distributed.parallel_callbacks(), seen])
        torch.save({"seen": seen.x, "weights": {k: v.detach().clone() for k, v in
                                                learn.model.state_dict().items()}},
                   f"{out}/rank{rank}.pth")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_on_different_shards_with_averaged_gradients(tmp_path):
    import torch.multiprocessing as mp

    x = torch.arange(16, dtype=torch.float32).view(-1, 1) / 16
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path), x), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pth") for r in (0, 1))
    # each process saw its own half of every epoch, together all of it
    assert not set(r0["seen"]) & set(r1["seen"])
    assert sorted(r0["seen"] + r1["seen"]) == sorted(x.flatten().tolist())
    # gradients averaged: both processes hold the same weights after their steps ...
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k
    # ... which are not what one process gets from the same step on rank 0's shard alone
    alone = _learner(x[[x.flatten().tolist().index(v) for v in r0["seen"]]], bs=8)
    alone.fit(1)
    assert any(not torch.allclose(alone.model.state_dict()[k], v)
               for k, v in r0["weights"].items())

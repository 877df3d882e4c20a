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

from zoolib import inference, models
from zoolib.distributed import read_params
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
    """`torchrun --nproc_per_node=2 -m zoolib.distributed --workspace WS params.json`."""
    file = tmp_path / "params.json"
    file.write_text(json.dumps({k.upper(): v for k, v in {**COLOUR_TINY, **params}.items()}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           "-m", "zoolib.distributed", "--workspace", str(ws.root), str(file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 processes on 2 cores
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _files(root) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


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
    files = sorted((ws.library / "red").iterdir())[:4]
    batch = torch.stack([inference.file_tensor(f, loaded.info) for f in files])
    probs, _ = inference.forward(loaded, batch)
    assert probs.shape == (4, 3) and torch.allclose(probs.sum(1), torch.ones(4), atol=1e-4)


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
    """distributed.read_params imports yaml: it must not arrive only through papermill."""
    import tomllib
    from pathlib import Path

    deps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    names = [d.split("==")[0].split(">")[0].lower() for d in deps["project"]["dependencies"]]
    assert "pyyaml" in names

"""Shared fixtures: demo workspaces built fresh per test, and one tiny trained generation."""
import json
import shutil

import pytest

from zoolib import demo
from zoolib.train import TrainConfig, train
from zoolib.workspace import open_workspace

# Tiny and fast: enough to exercise every code path, not to learn much.
TINY = dict(arch="zoo_cnn_small", img_size=32, epochs=2, batch_size=32, patience=2,
            num_workers=0, seed=0)


@pytest.fixture
def demo_ws(tmp_path):
    """A fresh demo workspace (deterministic, well under a second to build)."""
    return demo.build(tmp_path / "ws", seed=0)


@pytest.fixture(scope="session")
def truth(tmp_path_factory):
    """The demo workspace's answer key (the same for every seed-0 demo workspace)."""
    ws = demo.build(tmp_path_factory.mktemp("truth") / "ws", seed=0)
    return json.loads((ws.root / "demo_truth.json").read_text())


@pytest.fixture(scope="session")
def _trained_template(tmp_path_factory):
    ws = demo.build(tmp_path_factory.mktemp("trained") / "ws", seed=0)
    train(ws, TrainConfig(**TINY), progress=False)
    return ws


@pytest.fixture
def trained_ws(_trained_template, tmp_path):
    """A demo workspace (copy) holding generation gen-0001 trained tiny."""
    shutil.copytree(_trained_template.root, tmp_path / "trained")
    return open_workspace(tmp_path / "trained")

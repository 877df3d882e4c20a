import ast
import hashlib
import json
import shutil
from pathlib import Path

from PIL import Image

from zoolib import demo, library, translog


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_demo_is_deterministic_by_seed(tmp_path):
    a, b, c = (demo.build(tmp_path / n, seed=s) for n, s in (("a", 1), ("b", 1), ("c", 2)))
    assert _digest(a.root) == _digest(b.root)
    assert _digest(a.root) != _digest(c.root)


def test_demo_holds_every_situation(demo_ws, truth):
    counts = {p.name: sum(1 for _ in p.glob("*.jpg")) for p in demo_ws.library.iterdir()
              if p.is_dir()}
    assert len([c for c in counts if c != "Unknown"]) >= 6
    assert 36 <= truth["counts"]["okapi"] <= 39 and counts["Unknown"] > 0
    assert set(truth["lookalikes"]) <= set(counts)
    assert truth["meta"]["staged"] > 0 and truth["meta"]["synthetic"] > 0
    lib = demo_ws.library
    for a, b in truth["exact_duplicates"]:
        assert (lib / a).read_bytes() == (lib / b).read_bytes()
    (a, b), = truth["near_duplicates"]
    assert (lib / a).read_bytes() != (lib / b).read_bytes()
    assert Image.open(lib / b).size == (48, 48)
    assert (lib / "penguin" / "penguin_empty.jpg").stat().st_size == 0
    assert Image.open(lib / truth["rotated"][0]).size == (64, 64)
    inbox_classes = set(truth["inbox"].values())
    assert truth["inbox_only"] in inbox_classes and truth["inbox_only"] not in counts
    assert {"junk", "unreadable"} <= inbox_classes
    assert any(len(p.relative_to(demo_ws.inbox).parts) > 2 for p in demo_ws.inbox.rglob("*.jpg"))


def test_add_class(demo_ws):
    before = {p: p.read_bytes() for p in demo_ws.library.rglob("*") if p.is_file()}
    paths = demo.add_class(demo_ws)
    assert len(paths) == 50 and all(p.parent.name == demo.ADDED_CLASS for p in paths)
    assert all(p.is_file() for p in paths)
    # real, distinct, readable images of the new class, and nothing else changed
    m = library.scan(demo_ws, progress=False)
    added = m[m["label"] == demo.ADDED_CLASS]
    assert len(added) == 50 and added["readable"].all() and added["hash"].nunique() == 50
    assert {p: p.read_bytes() for p in before} == before
    assert demo.ADDED_CLASS in library.training_classes(m, 40, set())  # it takes part
    drawn = [p.read_bytes() for p in paths]
    shutil.rmtree(paths[0].parent)
    again = demo.add_class(demo_ws)  # the same seed draws the same images
    assert again == paths and [p.read_bytes() for p in again] == drawn


def test_demo_imports_nothing_from_pipeline():
    """pipeline calls demo; demo importing pipeline would close a circle."""
    names = []  # every module path an import statement names, e.g. ".pipeline", "zoolib.pipeline"
    for node in ast.walk(ast.parse(Path(demo.__file__).read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            names += [module] + [f"{module}.{alias.name}" for alias in node.names]
    assert not [n for n in names if n.rsplit(".", 1)[-1] == "pipeline"], names


def test_simulate_traffic(trained_ws, truth):
    shutil.copytree(trained_ws.models / "gen-0001", trained_ws.models / "gen-0002")
    info = trained_ws.models / "gen-0002" / "model.json"
    info.write_text(json.dumps({**json.loads(info.read_text()), "name": "gen-0002"}))
    counts = demo.simulate_traffic(trained_ws, truth["inbox"], per_generation=8,
                                   eval_share=0.5, days=14, seed=3)
    tx = translog.joined(trained_ws)
    assert list(counts) == ["gen-0001", "gen-0002"]
    assert tx.groupby("generation").size().to_dict() == {"gen-0001": 8, "gen-0002": 8}
    assert tx["evaluated"].sum() == sum(c["evaluations"] for c in counts.values()) > 0
    assert tx["time"].is_monotonic_increasing
    assert (tx["time"].max() - tx["time"].min()).days >= 5  # spread over simulated days
    ev = tx[tx["evaluated"]]
    assert (ev["evaluated_at"] > ev["time"]).all()
    assert set(ev["true_class"]) <= set(truth["inbox"].values())
    assert (ev["correct"] == (ev["true_class"] == ev["predicted"])).all()
    assert not trained_ws.deployed_json.exists()  # the user's deployment is untouched

"""The Ray engine of bulk identification on a local 2-worker cluster (the `ray` extra)."""
import numpy as np
import pandas as pd
import pytest

from zoolib import bulkid
from zoolib.workspace import ZoolibError

from .test_bulkid import Stop, _generation, _inbox_files, _stop_after

ray = pytest.importorskip("ray", reason="the ray extra is not installed")


@pytest.fixture
def ws(demo_ws):
    _generation(demo_ws)
    return demo_ws


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs for this module, shut down after it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _same_rows(got: pd.DataFrame, ref: pd.DataFrame, ulps: bool = False) -> None:
    """Equal tables, row for row and value for value (embeddings included).

    With `ulps`, numbers may differ in their last bits: CPU kernels round differently
    for another batch size (a resumed run's batches are not the first run's).
    """
    assert list(got["path"]) == list(ref["path"])
    close = (lambda a, b: np.allclose(a, b, rtol=1e-4, atol=1e-6)) if ulps else np.array_equal
    for column in bulkid.RESULT_COLUMNS:
        if column == "embedding":
            for a, b in zip(got[column], ref[column]):
                assert (a is None and b is None) or close(a, b)
        elif column == "top5":
            assert [list(v) for v in got[column]] == [list(v) for v in ref[column]]
        elif column == "top5_prob":
            assert all(close(a, b) for a, b in zip(got[column], ref[column]))
        else:
            pd.testing.assert_series_equal(got[column], ref[column], check_names=False,
                                           check_exact=not ulps, rtol=1e-4)


def test_ray_rows_equal_local_rows(ws, cluster):
    ref = bulkid.run(ws, name="local", num_workers=0, progress=False, runtime="torch")
    got = bulkid.run(ws, name="ray", engine="ray", num_workers=2, progress=False,
                     runtime="torch")
    assert len(got) == len(_inbox_files(ws)) and (got["error"] != "").sum() == 2
    _same_rows(got, ref)
    run_dir = ws.bulkid / "ray"
    assert (run_dir / "results.parquet").is_file() and not list((run_dir / "parts").iterdir())


def test_ray_run_resumes_without_duplicates(ws, cluster, monkeypatch):
    ref = bulkid.run(ws, name="local", num_workers=0, progress=False, runtime="torch")
    monkeypatch.setattr(bulkid.parts, "consolidate", lambda run_dir: None)  # killed: no merge
    with pytest.raises(Stop):
        bulkid.run(ws, name="ray", engine="ray", batch_size=16, progress=False,
                   runtime="torch", on_batch=_stop_after(2))
    monkeypatch.undo()
    partial = bulkid.load_results(ws, "ray")
    assert 32 <= len(partial) < len(ref)
    calls = []
    got = bulkid.run(ws, name="ray", engine="ray", batch_size=16, progress=False,
                     runtime="torch", on_batch=lambda done, total: calls.append(total))
    assert calls[-1] == len(ref) - len(partial)  # only what was missing
    _same_rows(got.set_index("path").loc[ref["path"]].reset_index(), ref, ulps=True)


def test_the_pure_batch_function_gives_the_engine_rows(ws):
    ref = bulkid.run(ws, name="local", num_workers=0, progress=False, runtime="torch", knn=False)
    from zoolib import inference

    loaded = inference.load(ws, "gen-0001", runtime="torch")
    paths = [str(p) for p in _inbox_files(ws)]
    table = bulkid.engine.identify_files(ws, loaded, paths, None,
                                         bulkid.inbox._not_regular(paths))
    got = bulkid.schema.float16_rows(table.column("embedding"))
    frame = table.drop_columns(["embedding"]).to_pandas()
    frame.insert(bulkid.RESULT_COLUMNS.index("embedding"), "embedding", got)
    _same_rows(frame, ref)


def test_an_unknown_engine_is_refused(ws):
    with pytest.raises(ZoolibError, match="engine must be one of 'local', 'ray', not 'spark'"):
        bulkid.run(ws, engine="spark", progress=False)

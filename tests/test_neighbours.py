import numpy as np
import pytest
import torch

from zoolib import bulkid, inference, models, neighbours
from zoolib.images import load_rgb


def test_kth_distance_is_one_minus_the_kth_cosine_similarity():
    ref = neighbours.unit(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    q = torch.tensor([[2.0, 0.0], [0.0, -3.0]])
    assert torch.allclose(neighbours.kth_distance(ref, q, k=1), torch.tensor([0.0, 1.0]))
    # second nearest of (1, 0) is (1, 1): cosine 0.7071
    assert neighbours.kth_distance(ref, q, k=2)[0] == pytest.approx(1 - 2 ** -0.5, abs=1e-6)
    assert neighbours.kth_distance(ref, q, k=50)[0] == pytest.approx(1.0)  # k clipped to 3
    assert torch.isnan(neighbours.kth_distance(ref[:0], q)).all()


def test_reference_is_the_generations_train_split_cached(trained_ws):
    loaded = inference.load(trained_ws, "gen-0001")
    saved = models.read_splits(trained_ws, "gen-0001")
    ref = neighbours.reference(trained_ws, loaded)
    # one row per training content (a file and its exact copy are one image to compare with)
    assert len(ref) == saved.loc[saved["split"] == "train", "hash"].nunique() > 100
    assert ref.shape[1] == 2 * 64  # zoo_cnn_small's second stage: means and maxima
    assert torch.allclose(ref.norm(dim=1), torch.ones(len(ref)), atol=1e-2)
    assert (trained_ws.models / "gen-0001" / neighbours.CACHE).exists()
    assert torch.equal(neighbours.reference(trained_ws, loaded), ref)  # read back


def test_a_training_image_scores_as_typical_and_noise_as_far(trained_ws):
    loaded = inference.load(trained_ws, "gen-0001")
    ref = neighbours.reference(trained_ws, loaded)
    rows = neighbours.train_rows(trained_ws, "gen-0001", loaded.classes)
    x = torch.stack([inference.to_tensor(load_rgb(trained_ws.library / p), loaded.info)
                     for p in rows["path"][:16]])
    noise = torch.randn(16, 3, 32, 32) * 2
    with torch.no_grad():
        near = neighbours.kth_distance(ref, neighbours.features(loaded.model, x)[1])
        far = neighbours.kth_distance(ref, neighbours.features(loaded.model, noise)[1])
    assert near.max() < far.min()


def test_bulk_identification_scores_distance_to_the_library(trained_ws):
    results = bulkid.run(trained_ws, "gen-0001", progress=False)
    ok = results[results["error"] == ""]
    assert ok["knn"].between(0, 2).all() and ok["knn"].std() > 0
    worst = bulkid.lowest_scores(results, n=5, by="knn")
    assert worst["knn"].tolist() == sorted(ok["knn"], reverse=True)[:5]
    off = bulkid.run(trained_ws, "gen-0001", name="no-knn", knn=False, progress=False)
    assert off["knn"].isna().all()
    assert np.allclose(off["confidence"], results["confidence"], equal_nan=True)


def test_kth_distance_does_not_depend_on_batch_boundaries_or_threads():
    torch.manual_seed(0)
    ref = torch.nn.functional.normalize(torch.randn(3000, 512), dim=1)
    feats = torch.randn(150, 512) * 3
    threads = torch.get_num_threads()
    whole = neighbours.kth_distance(ref, feats)
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            for size in (64, 7, 6, 1, 100):  # a last batch of 6 rounded apart (2 threads)
                parts = torch.cat([neighbours.kth_distance(ref, feats[i:i + size])
                                   for i in range(0, len(feats), size)])
                assert torch.equal(parts, whole), (n_threads, size)
    finally:
        torch.set_num_threads(threads)
    assert neighbours.kth_distance(ref, feats[:0]).shape == (0,)


def test_a_rotated_training_image_stays_in_the_reference(trained_ws):
    """The reference rows are found by split key, as evaluation finds its test rows: a
    training image rotated after the generation was trained is still a training image."""
    from zoolib import curate

    loaded = inference.load(trained_ws, "gen-0001")
    before = neighbours.train_rows(trained_ws, "gen-0001", loaded.classes)
    path = before["path"].iloc[0]
    curate.rotate(trained_ws, path, 90)
    after = neighbours.train_rows(trained_ws, "gen-0001", loaded.classes)
    assert len(after) == len(before) and path in set(after["path"])

"""Exact and near-duplicate detection: zoolib versus imagededup's PHash, same files, one run.

zoolib's path is what the curation notebook runs: `library.scan` (read, content
hash, decode, perceptual hash) then `curate.exact_duplicates` and
`curate.near_duplicate_pairs` (multi-index Hamming search). imagededup runs in
its own virtual environment (it is not a zoolib dependency) as a subprocess that
times only its `encode_images` and `find_duplicates`. Both use a Hamming
threshold of 10 bits (imagededup's default) and the same worker budget (2).

Recall: for the first images of the data set, four variants each (resized,
re-encoded, cropped 1 px a side, brightness +15%) are written to a temporary
folder; recall is the share of variants found within the threshold of their
original, by each tool, plus the count of pairs between distinct originals.

    nice .venv/bin/python bench/dedup_throughput.py [--data DIR] [--limit N]
        [--imagededup-python /tmp/idd/bin/python]
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageEnhance

from cifar import place
from zoolib import curate, library
from zoolib.workspace import create

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "cifar10" / "train"
THRESHOLD = 10

IDD_SCRIPT = r"""
import json, sys, time
from imagededup.methods import PHash
folder, threshold, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ph = PHash(verbose=False)
t0 = time.perf_counter()
enc = ph.encode_images(image_dir=folder, recursive=True, num_enc_workers=2)
t1 = time.perf_counter()
sub = dict(sorted(enc.items())[:limit])
dups = ph.find_duplicates(encoding_map=sub, max_distance_threshold=threshold,
                          num_dist_workers=2)
t2 = time.perf_counter()
pairs = sorted({tuple(sorted((a, b))) for a, bs in dups.items() for b in bs})
print(json.dumps({"n": len(enc), "encode_s": t1 - t0, "search_s": t2 - t1, "searched": len(sub),
                  "pairs": pairs}))
"""


def _link_workspace(tmp: Path, data: Path, limit: int | None) -> Path:
    """A workspace whose library holds links to the data (nothing copied)."""
    ws = create(tmp / "ws")
    files = sorted(data.glob("*/*.jpg"))[:limit] if limit else None
    if files is None:
        ws.library.rmdir()
        ws.library.symlink_to(data, target_is_directory=True)
        return ws.root
    for f in files:
        dest = ws.library / f.parent.name / f.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        place(f, dest)
    return ws.root


def _imagededup(python: str, folder: Path, limit: int = 10**9) -> dict:
    out = subprocess.run([python, "-c", IDD_SCRIPT, str(folder), str(THRESHOLD), str(limit)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _zoolib(root: Path, limit: int = 10**9) -> dict:
    t0 = time.perf_counter()
    manifest = library.scan(root, progress=False)
    t1 = time.perf_counter()
    exact = curate.exact_duplicates(manifest)
    pairs = curate.near_duplicate_pairs(manifest, THRESHOLD)
    t2 = time.perf_counter()
    sub = manifest.sort_values("path").head(limit)
    t3 = time.perf_counter()
    curate.exact_duplicates(sub)
    sub_pairs = curate.near_duplicate_pairs(sub, THRESHOLD)
    t4 = time.perf_counter()
    return {"n": len(manifest), "encode_s": t1 - t0, "search_all_s": t2 - t1,
            "search_s": t4 - t3, "searched": len(sub), "exact_groups": len(exact),
            "pairs": pairs, "sub_pairs": sub_pairs}


def _variants(data: Path, folder: Path, count: int) -> list[tuple[str, str]]:
    """Originals and four variants each, in one flat class folder; (original, variant)."""
    out = []
    lib = folder / "library" / "v"
    lib.mkdir(parents=True)
    for k, src in enumerate(sorted(data.glob("*/*.jpg"))[:count]):
        with Image.open(src) as im:
            img = im.convert("RGB")
        w, h = img.size
        name = f"img{k:04d}"
        shutil.copyfile(src, lib / f"{name}.jpg")
        img.resize((w * 2, h * 2), Image.BILINEAR).save(lib / f"{name}_resized.jpg", quality=90)
        img.save(lib / f"{name}_reencoded.jpg", quality=40)
        img.crop((1, 1, w - 1, h - 1)).save(lib / f"{name}_cropped.jpg", quality=90)
        ImageEnhance.Brightness(img).enhance(1.15).save(lib / f"{name}_brighter.jpg", quality=90)
        out += [(f"{name}.jpg", f"{name}_{v}.jpg")
                for v in ("resized", "reencoded", "cropped", "brighter")]
    return out


def _recall(pairs: set[tuple[str, str]], truth: list[tuple[str, str]]) -> dict:
    kinds = {}
    for a, b in truth:
        kinds.setdefault(b.split("_")[-1][:-4], []).append(tuple(sorted((a, b))) in pairs)
    result = {k: sum(v) / len(v) for k, v in kinds.items()}
    result["all"] = sum(sum(v) for v in kinds.values()) / len(truth)
    originals = [p for p in pairs if "_" not in p[0] and "_" not in p[1]]
    result["false_pairs_among_originals"] = len(originals)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--limit", type=int, default=None, help="first N files only")
    parser.add_argument("--variants", type=int, default=500, help="originals for recall")
    parser.add_argument("--search-limit", type=int, default=5000,
                        help="files both tools search side by side (imagededup's search is"
                             " quadratic: 50,000 files take it about half an hour)")
    parser.add_argument("--imagededup-python", default="/tmp/idd/bin/python")
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"no data at {args.data}: this benchmark needs ../shared/datasets")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = _link_workspace(tmp, args.data, args.limit)
        # warm the OS file cache once so neither tool pays the first disk read
        for f in sorted(args.data.glob("*/*.jpg"))[:args.limit]:
            f.read_bytes()
        ours = _zoolib(root, args.search_limit)
        theirs = _imagededup(args.imagededup_python, root / "library", args.search_limit)
        print(f"files: {ours['n']} (zoolib) / {theirs['n']} (imagededup), "
              f"threshold {THRESHOLD} bits", flush=True)
        for name, r in (("zoolib", ours), ("imagededup", theirs)):
            print(f"{name:>10}: hash {r['encode_s']:.1f} s ({r['n'] / r['encode_s']:.0f} img/s);"
                  f" search of the first {r['searched']} files {r['search_s']:.2f} s "
                  f"({r['searched'] / r['search_s']:.0f} img/s)")
        print(f"    zoolib: search of all {ours['n']} files {ours['search_all_s']:.2f} s, "
              f"{len(ours['pairs'])} pairs")
        ratio_hash = (ours["n"] / ours["encode_s"]) / (theirs["n"] / theirs["encode_s"])
        ratio_search = (ours["searched"] / ours["search_s"]) / (theirs["searched"]
                                                                / theirs["search_s"])
        print(f"zoolib / imagededup images/s: hashing {ratio_hash:.2f}x, search {ratio_search:.1f}x"
              f" (zoolib also content-hashes and fully validates every file)", flush=True)
        vroot = tmp / "variants"
        truth = _variants(args.data, vroot, args.variants)
        create(vroot)
        ours_v = _zoolib(vroot)
        ours_pairs = {tuple(sorted((Path(a).name, Path(b).name))) for a, b in
                      zip(ours_v["pairs"]["path_a"], ours_v["pairs"]["path_b"])}
        theirs_v = _imagededup(args.imagededup_python, vroot / "library")
        theirs_pairs = {tuple(sorted((Path(a).name, Path(b).name))) for a, b in theirs_v["pairs"]}
        for name, pairs in (("zoolib", ours_pairs), ("imagededup", theirs_pairs)):
            rec = _recall(pairs, truth)
            print(f"{name:>10} recall on {len(truth)} variants: " +
                  ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in rec.items()))


if __name__ == "__main__":
    main()

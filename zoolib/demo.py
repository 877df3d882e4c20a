"""The embedded demo workspace: procedurally drawn animal-like images.

`build(path, seed)` writes, in seconds and deterministically, a workspace with
every situation the workflow exists for: a class just under the cutoff, staged
and synthetic images, look-alike classes, an Unknown folder, exact and near
duplicates, unreadable and empty files, a rotated image and an inbox holding a
class the library lacks. The answer key is `demo_truth.json` in the workspace.
`simulate_traffic` then serves some of the inbox through the real Predictor on a
simulated clock, so the report has days of traffic to show.

Only the demo pipeline (`zoolib.pipeline`) and the tests use this module; the
workflow never does, and this module never imports `pipeline` (no circle).
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from .workspace import Workspace, ZoolibError, create, open_workspace

SIZE = 64


@dataclass(frozen=True)
class Species:
    """How to draw one kind of animal."""

    body: tuple[int, int, int]
    pattern: str = "plain"  # plain | stripes | spots | rosettes | patches | belly | legstripes
    mark: tuple[int, int, int] = (20, 20, 20)
    neck: float = 0.0  # neck length relative to body height
    legs: float = 0.5
    aspect: float = 1.8  # body width / height
    extra: str = ""  # mane | trunk | beak | ""
    upright: bool = False


SPECIES = {
    "lion": Species((196, 150, 80), extra="mane"),
    "zebra": Species((235, 235, 235), "stripes", (15, 15, 15)),
    "elephant": Species((125, 125, 130), legs=0.7, aspect=1.5, extra="trunk"),
    "flamingo": Species((240, 120, 160), neck=1.4, legs=1.6, aspect=1.3, extra="beak"),
    "leopard": Species((215, 170, 70), "rosettes", (60, 40, 20), aspect=2.2),
    "cheetah": Species((220, 180, 90), "spots", (30, 25, 20), aspect=2.3, legs=0.7),
    "penguin": Species((25, 25, 30), "belly", (245, 245, 245), legs=0.15, aspect=0.6,
                       upright=True),
    "okapi": Species((90, 50, 35), "legstripes", (240, 240, 240), neck=0.5, aspect=1.6),
    "giraffe": Species((225, 175, 80), "patches", (120, 70, 30), neck=1.8, legs=1.3),
    "jaguar": Species((170, 120, 50), "rosettes", (25, 15, 10), aspect=2.0, legs=0.45),
}
# Library classes with their image counts; okapi sits between 35 and 40.
LIBRARY_COUNTS = {"lion": 60, "zebra": 56, "elephant": 54, "flamingo": 50, "leopard": 52,
                  "cheetah": 50, "penguin": 48, "okapi": 37}
ADDED_CLASS = "giraffe"  # joins the library for generation 2
INBOX_ONLY = "jaguar"  # a class the library never had: a leopard look-alike
LOOKALIKE_OF = "leopard"  # the library class the jaguars are mistaken for
BACKGROUNDS = [(120, 160, 80), (200, 180, 120), (110, 150, 190), (90, 120, 70),
               (170, 170, 150)]


def draw(species: Species, rng: random.Random) -> Image.Image:
    """Draw one animal on a random background, pose, scale and colour shift."""
    bg = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in rng.choice(BACKGROUNDS))
    img = Image.new("RGB", (SIZE, SIZE), bg)
    d = ImageDraw.Draw(img)
    for _ in range(rng.randint(3, 8)):  # grass and stones
        x, y = rng.randint(0, SIZE), rng.randint(SIZE // 2, SIZE)
        shade = tuple(max(0, c - rng.randint(10, 50)) for c in bg)
        d.ellipse([x, y, x + rng.randint(2, 8), y + rng.randint(1, 4)], fill=shade)
    jitter = rng.randint(-12, 12)
    body = tuple(min(255, max(0, c + jitter)) for c in species.body)
    scale = rng.uniform(0.75, 1.05)
    h = 14 * scale if not species.upright else 30 * scale
    w = h * species.aspect
    cx = SIZE / 2 + rng.uniform(-6, 6)
    leg_len = species.legs * 14 * scale
    ground = SIZE * rng.uniform(0.8, 0.92)
    top = max(ground - leg_len - h, 6 + species.neck * h)  # keep a long neck in frame
    box = [cx - w / 2, top, cx + w / 2, top + h]
    _legs(d, species, box, leg_len, body)
    d.ellipse(box, fill=body)
    _pattern(d, species, box, rng)
    _head(d, species, box, body, scale, rng)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    img = img.rotate(rng.uniform(-8, 8), resample=Image.BILINEAR, fillcolor=bg)
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.6)))


def _legs(d: ImageDraw.ImageDraw, s: Species, box, leg_len: float, body) -> None:
    x0, _, x1, y1 = box
    width = max(1, int((x1 - x0) / 10))
    for i, fx in enumerate((0.2, 0.35, 0.65, 0.8) if not s.upright else (0.35, 0.65)):
        x = x0 + fx * (x1 - x0)
        d.line([x, y1 - 2, x, y1 + leg_len], fill=body, width=width)
        if s.pattern == "legstripes":
            for k in range(1, 4):
                y = y1 + k * leg_len / 4
                d.line([x - width, y, x + width, y], fill=s.mark, width=1)


def _pattern(d: ImageDraw.ImageDraw, s: Species, box, rng: random.Random) -> None:
    x0, y0, x1, y1 = box
    if s.pattern == "stripes":
        for x in range(int(x0) + 2, int(x1) - 1, 4):
            d.line([x, y0 + 1, x + rng.randint(-2, 2), y1 - 1], fill=s.mark, width=2)
    elif s.pattern in ("spots", "rosettes", "patches"):
        r = {"spots": 1.2, "rosettes": 2.4, "patches": 3.2}[s.pattern]
        for _ in range(int((x1 - x0) * (y1 - y0) / (r * r * 9))):
            x, y = rng.uniform(x0 + r, x1 - r), rng.uniform(y0 + r, y1 - r)
            if s.pattern == "rosettes":
                d.ellipse([x - r, y - r, x + r, y + r], outline=s.mark, width=1)
            else:
                d.ellipse([x - r, y - r, x + r, y + r], fill=s.mark)
    elif s.pattern == "belly":
        w = (x1 - x0) * 0.3
        d.ellipse([x0 + w, y0 + (y1 - y0) * 0.25, x1 - w, y1 - 2], fill=s.mark)


def _head(d: ImageDraw.ImageDraw, s: Species, box, body, scale: float,
          rng: random.Random) -> None:
    x0, y0, x1, y1 = box
    r = 5 * scale
    if s.upright:
        hx, hy = (x0 + x1) / 2, y0 - r * 0.6
    else:
        nx, ny = x1 - (y1 - y0) * 0.2, y0 - s.neck * (y1 - y0)
        d.line([x1 - (y1 - y0) * 0.3, y0 + 3, nx, ny], fill=body, width=max(2, int(3 * scale)))
        hx, hy = nx + r * 0.6, ny
    if s.extra == "mane":
        m = r * 1.8
        d.ellipse([hx - m, hy - m, hx + m, hy + m], fill=(110, 70, 30))
    d.ellipse([hx - r, hy - r, hx + r, hy + r], fill=body)
    d.point([hx + r * 0.3, hy - r * 0.3], fill=(0, 0, 0))
    if s.extra == "trunk":
        d.line([hx + r * 0.5, hy, hx + r * 0.9, hy + r * 2.5], fill=body, width=max(2, int(2 * scale)))
        d.ellipse([hx - r * 1.8, hy - r, hx - r * 0.2, hy + r * 0.8], fill=tuple(c - 15 for c in body))
    if s.extra == "beak":
        d.polygon([(hx + r, hy - 1), (hx + r * 2.2, hy + 2), (hx + r, hy + 2)], fill=(30, 30, 30))
    if s.upright:
        d.polygon([(hx + r, hy), (hx + r * 1.8, hy + 1), (hx + r, hy + 2)], fill=(240, 170, 40))


def _junk(rng: random.Random) -> Image.Image:
    """A vehicle-like scene with no animal: nothing worth labelling."""
    img = Image.new("RGB", (SIZE, SIZE), (rng.randint(100, 200),) * 3)
    d = ImageDraw.Draw(img)
    colour = tuple(rng.randint(0, 255) for _ in range(3))
    x, y = rng.randint(5, 20), rng.randint(20, 35)
    d.rectangle([x, y, x + 35, y + 14], fill=colour)
    d.rectangle([x + 8, y - 8, x + 26, y], fill=colour)
    for wx in (x + 7, x + 28):
        d.ellipse([wx - 4, y + 10, wx + 4, y + 18], fill=(20, 20, 20))
    return img


def _save(img: Image.Image, path: Path, quality: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "JPEG", quality=quality)


def _draw_class(folder: Path, name: str, count: int, rng: random.Random) -> list[Path]:
    paths = []
    for i in range(count):
        path = folder / f"{name}_{i:04d}.jpg"
        _save(draw(SPECIES[name], rng), path)
        paths.append(path)
    return paths


def build(path: str | Path, seed: int = 0, inbox_per_class: int = 12) -> Workspace:
    """Write a fresh demo workspace (an existing folder at `path` is replaced).

    Args:
        path: the workspace folder to create.
        seed: drawing seed; the same seed gives the same files.
        inbox_per_class: unlabelled inbox images per species.

    Returns:
        The workspace. Its `demo_truth.json` lists the planted problems.
    """
    root = Path(path)
    if root.exists():
        shutil.rmtree(root)
    ws = create(root)
    rng = random.Random(seed)
    files = {name: _draw_class(ws.library / name, name, n, rng)
             for name, n in LIBRARY_COUNTS.items()}
    truth = _plant_problems(ws, files, rng)
    truth["meta"] = _write_meta(ws, files, rng)
    truth["unknown"] = _unknown(ws, rng)
    truth["inbox"] = _inbox(ws, rng, inbox_per_class)
    truth.update(counts=LIBRARY_COUNTS, added_class=ADDED_CLASS, inbox_only=INBOX_ONLY,
                 lookalikes=["leopard", "cheetah"], seed=seed)
    (ws.root / "demo_truth.json").write_text(json.dumps(truth, indent=2))
    return ws


def _rel(ws: Workspace, p: Path) -> str:
    return p.relative_to(ws.library).as_posix()


def _plant_problems(ws: Workspace, files: dict[str, list[Path]], rng: random.Random) -> dict:
    lib = ws.library
    dup = lib / "lion" / "lion_0003_copy.jpg"
    shutil.copyfile(files["lion"][3], dup)
    cross = lib / "leopard" / "cheetah_0005.jpg"  # a cheetah filed under leopard too
    shutil.copyfile(files["cheetah"][5], cross)
    near = lib / "elephant" / "elephant_0007_small.jpg"
    with Image.open(files["elephant"][7]) as im:
        _save(im.resize((48, 48), Image.BILINEAR), near, quality=60)
    broken = lib / "zebra" / "zebra_broken.jpg"
    broken.write_bytes(bytes(rng.getrandbits(8) for _ in range(600)))
    empty = lib / "penguin" / "penguin_empty.jpg"
    empty.write_bytes(b"")
    rotated = files["flamingo"][4]
    with Image.open(rotated) as im:
        turned = im.rotate(90, expand=True)
    _save(turned, rotated)
    return {"exact_duplicates": [[_rel(ws, files["lion"][3]), _rel(ws, dup)],
                                 [_rel(ws, files["cheetah"][5]), _rel(ws, cross)]],
            "near_duplicates": [[_rel(ws, files["elephant"][7]), _rel(ws, near)]],
            "unreadable": [_rel(ws, broken), _rel(ws, empty)],
            "rotated": [_rel(ws, rotated)]}


def _write_meta(ws: Workspace, files: dict[str, list[Path]], rng: random.Random) -> dict:
    """Provenance: flamingo mostly staged, penguin half synthetic, a few others staged."""
    rows = []
    for name, paths in files.items():
        for p in paths:
            share = {"flamingo": ("staged", 0.8), "penguin": ("synthetic", 0.5)}.get(
                name, ("staged", 0.05))
            if rng.random() < share[1]:
                rows.append((_rel(ws, p), share[0], "demo"))
    lines = ["path,source,notes"] + [",".join(r) for r in rows]
    ws.meta_csv.write_text("\n".join(lines) + "\n")
    return {src: sum(1 for r in rows if r[1] == src) for src in ("staged", "synthetic")}


def _unknown(ws: Workspace, rng: random.Random) -> list[str]:
    """Animals the keeper could not identify: small, blurred, of any species."""
    out = []
    for i in range(8):
        img = draw(SPECIES[rng.choice(list(LIBRARY_COUNTS))], rng).filter(
            ImageFilter.GaussianBlur(2.5))
        path = ws.library / "Unknown" / f"unknown_{i:04d}.jpg"
        _save(img, path)
        out.append(_rel(ws, path))
    return out


def _inbox(ws: Workspace, rng: random.Random, per_class: int) -> dict[str, str]:
    """Unlabelled images in nested folders: every species, junk and broken files."""
    truth = {}
    names = list(LIBRARY_COUNTS) + [ADDED_CLASS, INBOX_ONLY]
    for i in range(per_class * len(names)):
        name = names[i % len(names)]
        path = ws.inbox / f"camera{i % 3}" / f"day{i % 5}" / f"img_{i:05d}.jpg"
        _save(draw(SPECIES[name], rng), path)
        truth[path.relative_to(ws.inbox).as_posix()] = name
    for i in range(per_class):
        path = ws.inbox / "camera0" / f"junk_{i:04d}.jpg"
        _save(_junk(rng), path)
        truth[path.relative_to(ws.inbox).as_posix()] = "junk"
    (ws.inbox / "camera1" / "truncated.jpg").write_bytes(
        (ws.inbox / "camera0" / "junk_0000.jpg").read_bytes()[:300])
    (ws.inbox / "camera2" / "notes.txt").write_text("not an image\n")
    truth.update({"camera1/truncated.jpg": "unreadable", "camera2/notes.txt": "unreadable"})
    return truth


def add_class(workspace: Workspace, name: str = ADDED_CLASS, count: int = 50,
              seed: int = 1) -> list[Path]:
    """Label a new class into the library (the demo's step between generations)."""
    return _draw_class(workspace.library / name, name, count, random.Random(seed))


def _recent_generations(ws: Workspace, n: int = 2) -> list[str]:
    """The newest `n` generations that are not throw-away runs, oldest first."""
    from . import models

    names = [g for g in models.generation_names(ws)
             if not models.read_info(ws, g).get("throwaway", False)]
    if not names:
        raise ZoolibError(f"{ws.models} holds no generation to serve")
    return names[-n:]


def simulate_traffic(workspace, labels: dict[str, str], generations: list[str] | None = None,
                     per_generation: int = 60, eval_share: float = 0.4, days: int = 21,
                     reviewer: str = "demo-reviewer", seed: int = 0) -> dict:
    """Serve inbox images through the Predictor for several generations and review some.

    Real predictions and log rows, on a simulated clock: the generations serve
    one after the other over the last `days` days (oldest generation first), so
    the report has days and weeks to show. Reviews come 1-48 hours after the
    prediction, with the true class from `labels`. deployed.json is not touched:
    each generation is pinned.

    Args:
        workspace: the workspace.
        labels: inbox-relative image path -> true class (the demo's
            `demo_truth.json["inbox"]`); entries that are not images are skipped.
        generations: generations to serve, in order; the last two by default.
        per_generation: predictions per generation.
        eval_share: share of predictions that get a manual evaluation.
        days: length of the simulated period, ending now.
        reviewer: name stored with the evaluations.
        seed: random seed.

    Returns:
        Counts per generation: {"gen-0001": {"predictions": n, "evaluations": m}, ...}.

    Raises:
        ZoolibError: no generation to serve, or no labelled inbox image.
    """
    # Imported here: building the demo workspace needs neither torch nor the log.
    from . import translog
    from .serving import Predictor

    ws = open_workspace(workspace)
    rng = random.Random(seed)
    generations = generations or _recent_generations(ws)
    images = sorted(p for p, c in labels.items() if c != "unreadable"
                    and (ws.inbox / p).is_file())
    if not images:
        raise ZoolibError(f"no labelled inbox image of {ws.inbox} is in `labels`")
    end = translog.now()
    span = timedelta(days=days) / len(generations)
    summary = {}
    for k, gen in enumerate(generations):
        start = end - span * (len(generations) - k)
        times = iter(sorted(start + span * rng.random() for _ in range(per_generation)))
        predictor = Predictor(ws, generation=gen, source="demo-traffic", clock=lambda: next(times))
        n_eval = 0
        try:
            for _ in range(per_generation):
                path = rng.choice(images)
                pred = predictor.predict(ws.inbox / path)
                if rng.random() < eval_share:
                    when = min(datetime.fromisoformat(pred.time) +
                               timedelta(hours=rng.uniform(1, 48)), end)
                    translog.record_evaluation(ws, pred.transaction_id, reviewer,
                                               true_class=labels[path], time=when)
                    n_eval += 1
        finally:
            predictor.close()
        summary[gen] = {"predictions": per_generation, "evaluations": n_eval}
    return summary


def main(argv: list[str] | None = None) -> None:
    """Command line: `python -m zoolib.demo build PATH [--seed N]`.

    The whole demo job is `python -m zoolib.pipeline demo` (`make demo`).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write the demo workspace")
    b.add_argument("path")
    b.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"demo workspace written to {build(args.path, args.seed).root}")


if __name__ == "__main__":
    main()

"""Data and runs for bench_openset.py: the cases, their "others" and their models.

Every case is a run trained by graft itself plus folders of images of none of its classes:

- ``demo``: runs/demo (five Pokémon, `make demo`); others: artwork and first sprite frame
  of Pokémon 152-386 from the demo's npm package, scikit-image photos, synthetic textures;
- ``many100``: 100 classes (Pokémon 152-251, 24 sprite frames each, bench_generalize's
  folder); others: artwork and first sprite frame of Pokémon 252-386;
- ``fashion``: Fashion-MNIST classes 0-5 (t-shirt ... sandal), 200 images each; others: the
  200 test images of each of classes 6-9 (shirt, sneaker, bag, ankle boot), one set each;
- ``digits``: scikit-learn's digits 0-5 (bench_split's training part); others: every 6, 7,
  8 and 9 (both parts), one set each.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "bench-openset"
RUNS = Path("/tmp/openset-runs")
GENERALIZE = ROOT / ".cache" / "bench-generalize"
SPLIT = ROOT / ".cache" / "bench_split"
FASHION_KNOWN = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal")
FASHION_OTHERS = ("shirt", "sneaker", "bag", "ankle-boot")


@dataclass
class Case:
    """A trained run, its own images from elsewhere (or none) and folders of others."""

    name: str
    run: Path
    unseen: Path | None
    others: dict[str, list[Path]] = field(default_factory=dict)
    train_cmd: list[str] = field(default_factory=list)


def build_pokemon_others(cache: Path, numbers: range) -> dict[str, Path]:
    """Artwork and first sprite frame of the Pokémon ``numbers``, as flat folders."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import demo_data

    out = {k: cache / k for k in ("others-artwork", "others-sprites")}
    if (cache / ".built-pokemon").exists():
        return out
    tgz = demo_data.fetch_package(ROOT / ".cache" / "demo")
    for folder in out.values():
        folder.mkdir(parents=True, exist_ok=True)
    front = demo_data.ANIMATED
    with tarfile.open(tgz) as tar:
        for member in tar:
            name, stem = member.name, Path(member.name).stem
            if not stem.isdigit() or int(stem) not in numbers:
                continue
            if name.startswith(demo_data.ARTWORK) and name.endswith(".svg"):
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                demo_data.svg_on_white(data).save(out["others-artwork"] / f"{stem}.png")
            elif name == f"{front}{stem}.gif":
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                demo_data.frames_on_white(data)[0].save(out["others-sprites"] / f"{stem}.png")
    (cache / ".built-pokemon").touch()
    return out


def build_photos_textures(cache: Path) -> dict[str, Path]:
    """scikit-image's bundled sample photos and 40 seeded synthetic textures."""
    from PIL import Image

    out = {k: cache / k for k in ("photos", "textures")}
    if (cache / ".built-photos").exists():
        return out
    for folder in out.values():
        folder.mkdir(parents=True, exist_ok=True)
    import skimage.data as sk

    for name in ("astronaut", "coffee", "chelsea", "rocket", "cat", "hubble_deep_field",
                 "immunohistochemistry", "retina", "colorwheel", "logo", "motorcycle_left",
                 "page", "camera", "coins", "moon", "text", "clock", "horse", "brick", "grass",
                 "gravel", "rough_wall"):  # fmt: skip
        try:
            im = getattr(sk, name)()
        except Exception:  # some need pooch (a download): skipped
            continue
        Image.fromarray(np.asarray(im)).convert("RGB").save(out["photos"] / f"{name}.png")
    rng = np.random.default_rng(0)
    for i in range(40):
        kind = i % 4
        if kind == 0:
            a = rng.integers(0, 256, (128, 128, 3))
        elif kind == 1:
            x = np.linspace(0, rng.uniform(4, 30), 128)
            a = (np.sin(x)[None, :, None] * 127 + 128) * np.ones((128, 1, 3))
            a = a * rng.uniform(0.3, 1.0, 3)
        elif kind == 2:
            k = int(rng.integers(4, 32))
            a = ((np.indices((128, 128)).sum(0) // k) % 2)[..., None] * rng.integers(0, 256, 3)
        else:
            a = np.ones((128, 128, 3)) * rng.integers(0, 256, 3)
            a += rng.normal(0, 20, a.shape)
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(out["textures"] / f"t{i}.png")
    (cache / ".built-photos").touch()
    return out


def _copy_classes(src: Path, dst: Path, classes: tuple[str, ...], per_class: int | None) -> None:
    for c in classes:
        files = sorted(p for p in (src / c).iterdir() if p.suffix == ".png")[:per_class]
        (dst / c).mkdir(parents=True, exist_ok=True)
        for p in files:
            shutil.copy2(p, dst / c / p.name)


def _pngs(*folders: Path) -> list[Path]:
    return sorted(p for f in folders for p in f.rglob("*.png"))


def demo_case() -> Case:
    pk = build_pokemon_others(CACHE / "demo", range(152, 387))
    misc = build_photos_textures(CACHE / "demo")
    others = {k: _pngs(v) for k, v in {**pk, **misc}.items()}
    return Case("demo", ROOT / "runs" / "demo", ROOT / ".cache/demo/artwork-1-4-7-25-150",
                others, ["make", "demo"])  # fmt: skip


def many100_case() -> Case:
    pk = build_pokemon_others(CACHE / "many100", range(252, 387))
    data, unseen = GENERALIZE / "sprites-152-251-24", GENERALIZE / "artwork-152-251"
    run = RUNS / "many100"
    cmd = ["graft", "train", str(data), "--out", str(run), "--unseen", str(unseen)]
    return Case("many100", run, unseen, {k: _pngs(v) for k, v in pk.items()}, cmd)


def fashion_case() -> Case:
    data = CACHE / "fashion" / "data"
    if not (CACHE / "fashion" / ".built").exists():
        _copy_classes(SPLIT / "fashion-train", data, FASHION_KNOWN, 200)
        (CACHE / "fashion" / ".built").touch()
    others = {c: _pngs(SPLIT / "fashion-test" / c) for c in FASHION_OTHERS}
    run = RUNS / "fashion"
    return Case("fashion", run, None, others, ["graft", "train", str(data), "--out", str(run)])


def digits_case() -> Case:
    data = CACHE / "digits" / "data"
    known, rest = tuple("012345"), tuple("6789")
    if not (CACHE / "digits" / ".built").exists():
        _copy_classes(SPLIT / "digits-train", data, known, None)
        (CACHE / "digits" / ".built").touch()
    others = {c: _pngs(*(SPLIT / s / c for s in ("digits-train", "digits-test"))) for c in rest}
    run = RUNS / "digits"
    return Case("digits", run, None, others,
                ["graft", "train", str(data), "--out", str(run)])  # fmt: skip


CASES = {"demo": demo_case, "many100": many100_case, "fashion": fashion_case,
         "digits": digits_case}  # fmt: skip


def ensure_run(case: Case) -> None:
    """Train the case's run with graft's defaults when it is not there yet."""
    if (case.run / "model.safetensors").exists():
        return
    if case.train_cmd[0] != "graft":
        raise SystemExit(f"{case.run} is missing: build it with {' '.join(case.train_cmd)}")
    cmd = ["nice", "-n", "10", str(ROOT / ".venv/bin/graft"), *case.train_cmd[1:]]
    print("$", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)

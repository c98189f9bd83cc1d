#!/usr/bin/env bash
# graft installed as a user would: its wheel, with pip, into a fresh virtual environment
# holding the LOWER bounds of pyproject.toml (not constraints.txt, the lock `make` uses).
# Then, from that environment and outside the source tree: `graft --help`, a tiny train
# (two classes of drawn images, one epoch per stage, with --track mlflow,tensorboard),
# `graft predict` and one request to `graft serve`. `make check-install` runs it; CI too.
#
#   PY      builds the wheel and writes the lower bounds (default .venv/bin/python)
#   PYTHON  the interpreter of the fresh environment (default python3.11, else python3)
#   KEEP=1  keeps the temporary folder (its path is printed) to look into afterwards
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-.venv/bin/python}
case $PY in /*) ;; *) PY=$ROOT/$PY ;; esac
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/graft-check-install.XXXXXX")
SERVER=""
cleanup() {
  if [ -n "$SERVER" ]; then kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; fi
  if [ "${KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
start=$(date +%s)
step() { echo; echo "== check-install: $* ($(($(date +%s) - start)) s)"; }

step "build the wheel"
# from the files a clone would have (tracked, plus new ones not ignored), so no build/,
# .venv or runs/ of this checkout end up in it
mkdir "$WORK/src"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git ls-files -z --cached --others --exclude-standard | tar --null -T - -c | tar -x -C "$WORK/src"
else
  tar --exclude=.venv --exclude=.git --exclude=runs --exclude=build -c . | tar -x -C "$WORK/src"
fi
(cd "$WORK/src" && "$PY" -m pip wheel --quiet --no-deps . -w "$WORK/dist")
WHEEL=$(ls "$WORK"/dist/graft-*.whl)
"$PY" -c 'import sys, zipfile; print(*zipfile.ZipFile(sys.argv[1]).namelist(), sep="\n")' \
  "$WHEEL" >"$WORK/wheel.txt"
for f in graft/py.typed graft/web/index.html graft/templates/report.html.j2 \
  graft/templates/model_card.md.j2 graft/static/swagger-ui.css graft/static/swagger-ui-bundle.js; do
  grep -qx "$f" "$WORK/wheel.txt" || { echo "the wheel lacks $f" >&2; exit 1; }
done
echo "$(basename "$WHEEL"): the web page, templates and static files are in it"

step "the lower bounds of pyproject.toml"
"$PY" scripts/constraints.py lower --extras track >"$WORK/lower.txt"
tr '\n' ' ' <"$WORK/lower.txt"; echo

step "a fresh environment ($("$PYTHON" --version)) with those versions"
"$PYTHON" -m venv "$WORK/venv"
BIN=$WORK/venv/bin
# --no-compile: Python compiles what graft imports as it imports it; compiling all of torch
# up front took half of this step
"$BIN/python" -m pip install --quiet --no-compile --constraint "$WORK/lower.txt" "$WHEEL[track]"
"$BIN/python" -m pip check

step "graft --help, from the installed wheel"
mkdir "$WORK/try" && cd "$WORK/try"  # nothing here can shadow the installed package
"$BIN/graft" --help >/dev/null
"$BIN/python" - <<'EOF'
import graft

where = graft.__file__
assert "/site-packages/" in where, f"graft was imported from {where}, not the installed wheel"
print(f"graft {graft.__version__} from {where}")
EOF

step "a tiny train (2 classes, 8 drawn images each, 1 epoch per stage)"
"$BIN/python" - <<'EOF'
import random
from pathlib import Path

from PIL import Image, ImageDraw

rng = random.Random(0)
for shape in ("circle", "square"):
    folder = Path("data") / shape
    folder.mkdir(parents=True)
    for i in range(8):
        im = Image.new("RGB", (64, 64), tuple(rng.randint(200, 255) for _ in range(3)))
        r, x, y = rng.randint(10, 18), rng.randint(20, 44), rng.randint(20, 44)
        box = [x - r, y - r, x + r, y + r]
        colour = tuple(rng.randint(0, 150) for _ in range(3))
        (ImageDraw.Draw(im).ellipse if shape == "circle" else ImageDraw.Draw(im).rectangle)(
            box, fill=colour
        )
        im.save(folder / f"{shape}_{i}.png")
EOF
export GRAFT_CACHE_DIR=$WORK/cache  # a run of its own, never the user's feature cache
"$BIN/graft" train data --out run --img-size 64 --epochs 1 --fine-tune-epochs 1 --views 1 \
  --batch-size 16 --fine-tune-batch-size 8 --workers 0 --track mlflow,tensorboard 2>&1 | tail -n 4
test -s run/model.safetensors && test -d run/tensorboard && test -d mlruns

step "graft predict"
"$BIN/graft" predict run data/circle/circle_0.png data/square/square_0.png --json >predictions.json
"$BIN/python" - <<'EOF'
import json

preds = json.load(open("predictions.json"))
best = [p["top"][0] for p in preds]
assert len(preds) == 2 and all(b["class"] in ("circle", "square") for b in best), preds
print("; ".join(f"{p['path']}: {p['label']} (best {b['class']} {b['probability']:.0%})" for p, b in zip(preds, best)))
EOF

step "graft serve: one request"
PORT=$("$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$BIN/graft" serve run --port "$PORT" >serve.log 2>&1 &
SERVER=$!
"$BIN/python" - "http://127.0.0.1:$PORT" <<'EOF' || { cat serve.log >&2; exit 1; }
import json
import sys
import time
import urllib.error
import urllib.request

base = sys.argv[1]
deadline = time.monotonic() + 120
while True:  # the server answers once the model is loaded; nothing to wait on but that
    try:
        with urllib.request.urlopen(base + "/health", timeout=5) as r:
            if r.status == 200:
                break
    except (OSError, urllib.error.HTTPError):
        pass
    if time.monotonic() > deadline:
        sys.exit("graft serve did not answer /health within 120 s")
    time.sleep(0.5)
image = open("data/square/square_1.png", "rb").read()
head = (
    '--graftcheck\r\nContent-Disposition: form-data; name="file"; filename="square_1.png"\r\n'
    "Content-Type: image/png\r\n\r\n"
)
body = head.encode() + image + b"\r\n--graftcheck--\r\n"
request = urllib.request.Request(
    base + "/predict",
    data=body,
    headers={"Content-Type": "multipart/form-data; boundary=graftcheck"},
)
with urllib.request.urlopen(request, timeout=60) as r:
    answer = json.load(r)
text = json.dumps(answer)
assert "circle" in text or "square" in text, text
print("POST /predict:", text[:200])
EOF
kill "$SERVER" && wait "$SERVER" 2>/dev/null || true
SERVER=""

step "done: graft installs and runs with the lower bounds of pyproject.toml"

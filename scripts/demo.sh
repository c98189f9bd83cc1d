#!/usr/bin/env bash
# The seed workflow on five Pokémon, end to end: build data, scan, train (frozen + fine-tune),
# evaluate on the held-out split and on artwork from elsewhere, predict the artwork.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
GRAFT=.venv/bin/graft
OUT=${DEMO_OUT:-runs/demo}
start=$(date +%s)

mapfile -t dirs < <($PY scripts/demo_data.py --cache .cache/demo)
TRAIN=${dirs[0]}
ART=${dirs[1]}

echo; echo "== graft scan $TRAIN"
mkdir -p "$(dirname "$OUT")"
$GRAFT scan "$TRAIN" --plot "$OUT-scan.png"

echo; echo "== graft train (defaults; $OUT is the demo's own folder and is replaced)"
echo "   (--unseen: the artwork is watched after every epoch, never used for choices)"
$GRAFT train "$TRAIN" --out "$OUT" --force --unseen "$ART"

echo; echo "== graft evaluate: held-out test split"
$GRAFT evaluate "$OUT"

echo; echo "== graft evaluate: dream-world artwork (images from elsewhere)"
$GRAFT evaluate "$OUT" "$ART"

echo; echo "== graft predict: the five artworks"
$GRAFT predict "$OUT" "$ART" --grid "$OUT/unseen_predictions.png"

echo; echo "== graft report"
$GRAFT report "$OUT"

end=$(date +%s)
cat <<MSG

Demo finished in $((end - start)) s. Results:
  report (open this)  $OUT/report.html
  run folder          $OUT/
  learning curves     $OUT/learning_curves.png
  confusion matrix    $OUT/confusion_matrix.png
  unseen predictions  $OUT/unseen_predictions.png
  summary             $OUT/summary.json
  artwork evaluation  $OUT/eval-$(basename "$ART")/
  duplicate audit     $OUT/audit.json, $OUT/leakage_pairs.png
MSG

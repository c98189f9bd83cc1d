#!/usr/bin/env bash
# The seed workflow on five Pokémon, end to end: build data, scan, train (frozen + fine-tune),
# evaluate on the held-out split and on artwork from elsewhere, predict the artwork, and check
# that other Pokémon's artwork is answered "unknown".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
GRAFT=.venv/bin/graft
OUT=${DEMO_OUT:-runs/demo}
start=$(date +%s)

mapfile -t dirs < <($PY scripts/demo_data.py --cache .cache/demo)
TRAIN=${dirs[0]}
ART=${dirs[1]}
OTHERS=${dirs[2]}

echo; echo "== graft scan $TRAIN"
mkdir -p "$(dirname "$OUT")"
$GRAFT scan "$TRAIN" --plot "$OUT-scan.png"

echo; echo "== graft train (defaults; $OUT is the demo's own folder and is replaced)"
echo "   (--unseen: the artwork is watched after every epoch and sets the 'unknown' threshold,"
echo "   never any other choice)"
$GRAFT train "$TRAIN" --out "$OUT" --force --unseen "$ART"

echo; echo "== graft evaluate: held-out test split, and 100 other Pokémon's artwork (--others:"
echo "   none of the five classes, so every one should be answered 'unknown')"
$GRAFT evaluate "$OUT" --others "$OTHERS"

echo; echo "== graft evaluate: dream-world artwork (images from elsewhere)"
$GRAFT evaluate "$OUT" "$ART"

echo; echo "== graft predict: the five artworks"
$GRAFT predict "$OUT" "$ART" --grid "$OUT/unseen_predictions.png"

echo; echo "== graft predict: five other Pokémon (the answer should be 'unknown')"
$GRAFT predict "$OUT" "$OTHERS/152.png" "$OTHERS/155.png" "$OTHERS/158.png" \
  "$OTHERS/172.png" "$OTHERS/249.png"

echo; echo "== graft report"
$GRAFT report "$OUT"

end=$(date +%s)
# leakage_pairs.png exists only when near-copies straddle the split (graft keeps them on
# one side by default); the scan's picture shows the duplicates it found either way.
PAIRS="$OUT-scan_duplicates.png"
[ -f "$OUT/leakage_pairs.png" ] && PAIRS="$OUT/leakage_pairs.png"
cat <<MSG

Demo finished in $((end - start)) s. Results:
  report (open this)  $OUT/report.html
  run folder          $OUT/
  learning curves     $OUT/learning_curves.png
  confusion matrix    $OUT/confusion_matrix.png
  unseen predictions  $OUT/unseen_predictions.png
  summary             $OUT/summary.json
  artwork evaluation  $OUT/eval-$(basename "$ART")/
  duplicate audit     $OUT/audit.json, $PAIRS
MSG

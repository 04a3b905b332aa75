#!/usr/bin/env bash
# Load test of `kiln serve` (a benchmark, not a test): drives the server from a second process
# on 127.0.0.1 with `oha` (installed from crates.io into .cache/tools, git-ignored, when
# missing) for a fixed number of requests at 1, 8 and 64 concurrent clients, and prints
# throughput and p50 / p99 latency:
#   - /v1/classify on the quickstart's fine-tuned classifier (out/sentiment; run
#     scripts/quickstart.sh first), with dynamic batching on and off;
#   - /v1/completions on SmolLM2-135M, with continuous batching of generations on and off
#     (tokens/s from the server's own token counter over each level's wall time).
#
#   scripts/load_test.sh [-n REQUESTS] [-g GEN_REQUESTS] [-c "1 8 64"] [--classifier DIR]
#                        [--lm FILE] [--max-tokens N] [--skip-lm] [--skip-classifier]
#
# Defaults: 2000 classify requests and 64 completion requests per concurrency level,
# max_tokens 32. KILN overrides the binary (default target/release/kiln, built when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

N=2000
GEN_N=64
CONCURRENCY="1 8 64"
CLASSIFIER="${KILN_OUT:-out/sentiment}"
LM="${KILN_MODEL_DIR:-.cache/models}/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_TOKENS=32
SKIP_LM=0
SKIP_CLF=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        -n) N="$2"; shift 2 ;;
        -g) GEN_N="$2"; shift 2 ;;
        -c) CONCURRENCY="$2"; shift 2 ;;
        --classifier) CLASSIFIER="$2"; shift 2 ;;
        --lm) LM="$2"; shift 2 ;;
        --max-tokens) MAX_TOKENS="$2"; shift 2 ;;
        --skip-lm) SKIP_LM=1; shift ;;
        --skip-classifier) SKIP_CLF=1; shift ;;
        *) echo "load_test: unknown option $1" >&2; exit 2 ;;
    esac
done

KILN="${KILN:-target/release/kiln}"
TOOLS=".cache/tools"
OHA="$TOOLS/bin/oha"
if ! [[ -x "$OHA" ]]; then
    if command -v oha >/dev/null; then
        OHA="$(command -v oha)"
    else
        echo "load_test: installing oha into $TOOLS (cargo install oha --locked)" >&2
        cargo install oha --locked --root "$TOOLS" >&2
    fi
fi
if ! [[ -x "$KILN" ]]; then
    cargo build --release --bin kiln >&2
fi

PORT="${PORT:-18089}"
SERVER_PID=""
stop_server() {
    if [[ -n "$SERVER_PID" ]]; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
    fi
}
trap stop_server EXIT

start_server() { # model, extra flags...
    local model="$1"
    shift
    "$KILN" serve --model "$model" --port "$PORT" --quiet "$@" &
    SERVER_PID=$!
    for _ in $(seq 1 300); do
        if curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; then return 0; fi
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            echo "load_test: the server exited" >&2
            exit 1
        fi
        sleep 0.1
    done
    echo "load_test: the server did not answer /health within 30 s" >&2
    exit 1
}

# Runs oha and prints "rps p50_ms p99_ms success_rate".
drive() { # path, body, requests, concurrency
    "$OHA" --no-tui --output-format json -n "$3" -c "$4" -m POST \
        -H "content-type: application/json" -d "$2" "http://127.0.0.1:$PORT$1" |
        python3 -c '
import json, sys
r = json.load(sys.stdin)
s, p = r["summary"], r["latencyPercentiles"]
print("%.2f %.1f %.1f %.3f" % (s["requestsPerSec"], p["p50"] * 1e3, p["p99"] * 1e3, s["successRate"]))'
}

# The server's count of generated tokens (Prometheus counter).
generated_tokens() {
    curl -s "http://127.0.0.1:$PORT/metrics" | awk '$1 == "kiln_generated_tokens_total" { v = $2 } END { print v + 0 }'
}

if [[ $SKIP_CLF == 0 ]]; then
    if ! [[ -f "$CLASSIFIER/config.json" ]]; then
        echo "load_test: no classifier in $CLASSIFIER; run scripts/quickstart.sh first (or pass --classifier DIR)" >&2
        exit 1
    fi
    BODY='{"input": "a moving, beautifully made film with a dull, lifeless second half"}'
    for mode in on off; do
        flags=()
        [[ $mode == off ]] && flags=(--no-batching)
        start_server "$CLASSIFIER" "${flags[@]}"
        echo "== /v1/classify ($CLASSIFIER), dynamic batching $mode, $N requests"
        printf "%-12s %10s %10s %10s %8s\n" clients "req/s" "p50 ms" "p99 ms" "ok"
        for c in $CONCURRENCY; do
            read -r rps p50 p99 ok < <(drive /v1/classify "$BODY" "$N" "$c")
            printf "%-12s %10s %10s %10s %8s\n" "$c" "$rps" "$p50" "$p99" "$ok"
        done
        stop_server
    done
fi

if [[ $SKIP_LM == 0 ]]; then
    if ! [[ -f "$LM" ]]; then
        scripts/fetch_models.sh smollm2
    fi
    BODY="{\"prompt\": \"Here is a long story about a lighthouse keeper:\", \"max_tokens\": $MAX_TOKENS, \"temperature\": 0.8, \"seed\": 1}"
    for mode in on off; do
        flags=()
        [[ $mode == off ]] && flags=(--no-batching)
        start_server "$LM" --max-tokens "$MAX_TOKENS" "${flags[@]}"
        echo "== /v1/completions ($LM), batching $mode, max_tokens $MAX_TOKENS, $GEN_N requests"
        printf "%-12s %10s %10s %10s %10s %8s\n" clients "req/s" "tokens/s" "p50 ms" "p99 ms" "ok"
        for c in $CONCURRENCY; do
            before=$(generated_tokens)
            read -r rps p50 p99 ok < <(drive /v1/completions "$BODY" "$GEN_N" "$c")
            after=$(generated_tokens)
            # Tokens the server generated during this level (an answer may end before
            # max_tokens), over the level's wall time (requests / rate).
            tps=$(python3 -c "print('%.1f' % (($after - $before) * $rps / $GEN_N))")
            printf "%-12s %10s %10s %10s %10s %8s\n" "$c" "$rps" "$tps" "$p50" "$p99" "$ok"
        done
        stop_server
    done
fi

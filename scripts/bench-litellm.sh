#!/usr/bin/env bash
# Chat throughput of pifleet and of a peer, the LiteLLM proxy, measured in the
# same run with the same client (`pifleet bench chat`, `--openai` for the
# proxy) against identical simulators (`pifleet ollama-sim`, answering at once).
# Three runs of each size; prints every JSON line, then the medians of the
# figures and the errors of the worst run (a median would hide a bad run).
#
#   scripts/bench-litellm.sh            # 1, 50 and 1,000 clients, 10 s each
#   SECONDS_PER_RUN=30 RUNS=3 scripts/bench-litellm.sh
#   STREAM=1 scripts/bench-litellm.sh   # streamed completions (bench chat --stream)
#   STREAM=1 TOKENS_PER_SEC=20 SIZES=1000 scripts/bench-litellm.sh
#
# pifleet: 10 agents on 2 nodes for 1 client, 1,000 agents on 10 nodes for
# 50 and 1,000 clients (docs/BENCHMARKS.md). LiteLLM: `ollama/llama3.2` on the
# simulator, 2 workers, no database, installed in its own virtualenv.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${SECONDS_PER_RUN:-10}
runs=${RUNS:-3}
sizes=${SIZES:-"1 50 1000"}
# Streamed answers, and the simulators' pace (default: at once).
stream=()
[ -n "${STREAM:-}" ] && stream=(--stream)
rate=${TOKENS_PER_SEC:-100000}
cache=${XDG_CACHE_HOME:-$HOME/.cache}/pifleet
venv=$cache/litellm-proxy-venv
out=$(mktemp -d /tmp/pifleet-litellm.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

if ! "$venv/bin/litellm" --version >/dev/null 2>&1; then
  echo "==> installing the LiteLLM proxy in $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r benches/peers/litellm-proxy.txt
fi
echo "==> building pifleet (release)" >&2
cargo build --release -q
pifleet=target/release/pifleet

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
sim_port=$(free_port)
$pifleet ollama-sim --listen "127.0.0.1:$sim_port" --first-token-ms 0 --tokens-per-sec "$rate" --max-parallel 0 \
  >"$out/sim.log" 2>&1 &
pids+=($!)
proxy_port=$(free_port)
cat >"$out/litellm.yaml" <<YAML
model_list:
  - model_name: llama3.2
    litellm_params:
      model: ollama/llama3.2
      api_base: http://127.0.0.1:$sim_port
YAML
LITELLM_LOCAL_MODEL_COST_MAP=True "$venv/bin/litellm" --config "$out/litellm.yaml" \
  --host 127.0.0.1 --port "$proxy_port" --num_workers 2 >"$out/litellm.log" 2>&1 &
pids+=($!)
for _ in $(seq 120); do
  curl -fs "http://127.0.0.1:$proxy_port/health/liveliness" >/dev/null 2>&1 && break
  sleep 0.5
done
curl -fs "http://127.0.0.1:$proxy_port/health/liveliness" >/dev/null \
  || { echo "LiteLLM did not start; see $out/litellm.log" >&2; exit 1; }
echo "==> LiteLLM proxy on :$proxy_port, simulator on :$sim_port; results in $out" >&2

for c in $sizes; do
  if [ "$c" = 1 ]; then fleet=(--agents 10 --nodes 2); else fleet=(--agents 1000 --nodes 10); fi
  for r in $(seq "$runs"); do
    echo "==> $c clients, run $r: pifleet" >&2
    $pifleet bench chat "${fleet[@]}" "${stream[@]}" --tokens-per-sec "$rate" --concurrency "$c" --seconds "$secs" \
      | sed "s/^{/{\"system\":\"pifleet\",/" | tee -a "$out/results.jsonl"
    echo "==> $c clients, run $r: LiteLLM proxy" >&2
    $pifleet bench chat --openai "http://127.0.0.1:$proxy_port" --model llama3.2 "${stream[@]}" \
      --concurrency "$c" --seconds "$secs" \
      | sed "s/^{/{\"system\":\"litellm\",/" | tee -a "$out/results.jsonl"
  done
done

python3 - "$out/results.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("\nmedians of %d runs" % max(1, len(rows) // (2 * len({r["concurrency"] for r in rows}))))
print("%-8s %7s %9s %9s %9s %10s %10s %12s" % ("system", "clients", "rps", "p50 ms", "p99 ms", "ttft p50", "ttft p99", "worst errors"))
for c in sorted({r["concurrency"] for r in rows}):
    for system in ("pifleet", "litellm"):
        rs = [r for r in rows if r["concurrency"] == c and r["system"] == system]
        if rs:
            m = lambda k: statistics.median(r[k] for r in rs)
            worst = max(r["errors"] for r in rs)
            ttft = lambda k: "%10.1f" % m(k) if k in rs[0] else "%10s" % "-"
            print("%-8s %7d %9.0f %9.1f %9.1f %s %s %12d" % (system, c, m("rps"), m("p50_ms"), m("p99_ms"),
                                                          ttft("ttft_p50_ms"), ttft("ttft_p99_ms"), worst))
PY

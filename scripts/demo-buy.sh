#!/usr/bin/env bash
# The buyer's side of the demo: fund a buyer on the run's ledger, start the encrypted
# prediction service, buy a few predictions (single and batch layouts), stop the service
# (which records the fee settlement) and show the fee settlement entry.
#   scripts/demo-buy.sh RUN_DIR [ROWS]
set -euo pipefail
run=$(realpath "${1:?usage: $0 RUN_DIR [ROWS]}")
rows=${2:-8}
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
POI=${POI:-$here/.venv/bin/poi}
PY=${PY:-$here/.venv/bin/python}
port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
key="$run/buyer.pem"
input="$run/buyer-input.csv"
"$PY" - "$input" "$rows" <<'PY'
import csv, sys
from client.task import digits_split
path, rows = sys.argv[1], int(sys.argv[2])
test = digits_split().test
with open(path, "w", newline="") as handle:
    writer = csv.writer(handle)
    writer.writerow([f"p{i}" for i in range(64)] + ["label"])
    for x, y in zip(test.x[:rows], test.y[:rows]):
        writer.writerow([f"{v:.4f}" for v in x] + [int(y)])
PY
"$POI" buyer fund "$run" --key "$key" --amount 1000
"$POI" serve "$run" --port "$port" --workers 2 &
server=$!
stop() { kill -INT "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; }
trap stop EXIT
for _ in $(seq 600); do
  "$PY" -c "import httpx,sys; sys.exit(httpx.get('http://127.0.0.1:$port/v1/model').status_code != 200)" 2>/dev/null && break
  kill -0 "$server" 2>/dev/null || { echo "poi serve exited" >&2; exit 1; }
  sleep 0.2
done
echo "one encrypted prediction (single layout), then $rows in one batch:"
head -2 "$input" > "$run/buyer-one.csv"
"$POI" buy --url "http://127.0.0.1:$port" --input "$run/buyer-one.csv" --key "$key" --layout single
"$POI" buy --url "http://127.0.0.1:$port" --input "$input" --key "$key" --layout batch
"$PY" -c "
import httpx
from ledger.keys import Signer
print('account:', httpx.get('http://127.0.0.1:$port/v1/accounts/' + Signer.load('$key').key_id).json())"
stop
trap - EXIT
"$POI" ledger show "$run" --kind fee_settlement

#!/usr/bin/env bash
# bench/clients.sh — one wsp server holding N idle client sessions (default
# 10000), simulated from one process speaking the real protocol: connect
# time, server memory per idle session, and a request served by one of them.
#
# Usage: make bench-clients N=10000
set -euo pipefail
N=${N:-10000}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$ROOT/bench/out
mkdir -p "$OUT"
cd "$ROOT"
go build -o bin/wsp ./cmd/wsp
go build -o "$OUT/clients" ./bench/clients
ulimit -n $((N * 2 + 1000)) 2>/dev/null || ulimit -n "$(ulimit -Hn)"

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
./bin/wsp server -port "$PORT" -admin "" -logformat json -timeout 5s >"$OUT/server-clients.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 100); do
	curl -sf "http://127.0.0.1:$PORT/status" >/dev/null && break
	sleep 0.1
done
"$OUT/clients" -server "127.0.0.1:$PORT" -pid "$SERVER" -n "$N"

#!/usr/bin/env bash
# bench/run.sh — throughput and latency of wsp against going direct.
#
# Starts a tiny backend (bench/backend), a wsp server and a wsp client on free
# loopback ports, then measures with wrk, for each point, the backend directly
# and through wsp (`GET /request` + X-PROXY-DESTINATION) in the same run:
#
#   small GETs (~100 B)   at c=1, 16, 64
#   10 MiB download       at c=1, 8
#
# Each point runs DURATION seconds, RUNS times (direct and wsp interleaved so
# that machine drift hits both alike); the table shows the median req/s.
# Also: added p50 latency at c=1, CPU per request of server+client at c=64, and
# RSS of both processes after load. Results go to bench/out/results.json.
#
# Usage: make bench   or   DURATION=2 RUNS=1 ./bench/run.sh
set -euo pipefail

DURATION=${DURATION:-5}
RUNS=${RUNS:-3}

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=$ROOT/bench/out
WORK=$OUT/run      # configs, logs and raw wrk output of the last run
RESULTS=$OUT/results.json

# The points: name, backend path, connections.
POINTS=(
	"small_c1    /small  1"
	"small_c16   /small  16"
	"small_c64   /small  64"
	"10m_c1      /10m    1"
	"10m_c8      /10m    8"
)
CPU_POINT=small_c64 # where CPU per request is measured
P50_POINT=small_c1  # where the added p50 latency is measured

declare -a PIDS=()     # every process we started, killed on exit
declare -A RPS=()      # "$point/$mode" -> space-separated req/s of each run
declare -A P50=()      # "$point/$mode" -> space-separated p50 (µs) of each run
declare -A ERRS=()     # "$point/$mode" -> non-2xx + socket errors, all runs
CPU_TICKS_SERVER=0
CPU_TICKS_CLIENT=0
CPU_REQUESTS=0

log() { printf '[bench] %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

# ---------------------------------------------------------------- lifecycle

# cleanup kills everything we started, on success, failure or Ctrl-C. TERM
# first (wsp drains gracefully and has nothing in flight by then), KILL after
# a bounded wait.
cleanup() {
	local rc=$? pid i
	trap - EXIT INT TERM
	for pid in "${PIDS[@]}"; do
		kill -TERM "$pid" 2>/dev/null || true
	done
	for pid in "${PIDS[@]}"; do
		for ((i = 0; i < 50; i++)); do
			kill -0 "$pid" 2>/dev/null || break
			sleep 0.1
		done
		kill -KILL "$pid" 2>/dev/null || true
		wait "$pid" 2>/dev/null || true
	done
	if ((rc != 0)); then
		log "failed (exit $rc); logs are in $WORK"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

check_args() {
	[[ $DURATION =~ ^[1-9][0-9]*$ ]] || die "DURATION must be a positive integer (seconds), got '$DURATION'"
	[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer, got '$RUNS'"
}

# ensure_wrk installs wrk from Debian's packages when it is not there, so the
# bench works on a fresh machine.
ensure_wrk() {
	command -v wrk >/dev/null 2>&1 && return
	log "wrk not found; installing it with apt-get"
	local sudo=""
	((EUID == 0)) || sudo="sudo"
	$sudo apt-get update -qq >/dev/null && $sudo apt-get install -y -qq wrk >/dev/null ||
		die "could not install wrk (apt-get install wrk)"
	command -v wrk >/dev/null 2>&1 || die "wrk still not found after install"
}

build() {
	log "building bin/wsp and the backend"
	(cd "$ROOT" && go build -o bin/wsp ./cmd/wsp && go build -o "$OUT/backend" ./bench/backend)
}

# wait_for_line FILE PATTERN TIMEOUT_S: print the first line of FILE matching
# PATTERN (extended regex), polling every 0.1 s for at most TIMEOUT_S seconds.
wait_for_line() {
	local file=$1 pattern=$2 tries=$(($3 * 10)) i line
	for ((i = 0; i < tries; i++)); do
		line=$(grep -m1 -E "$pattern" "$file" 2>/dev/null || true)
		if [[ -n $line ]]; then
			printf '%s\n' "$line"
			return 0
		fi
		sleep 0.1
	done
	return 1
}

# alive PID NAME: fail with the tail of its log if a process we need died.
alive() {
	kill -0 "$1" 2>/dev/null && return
	log "$2 exited; last lines of $WORK/$2.log:"
	tail -n 20 "$WORK/$2.log" >&2 || true
	die "$2 is not running"
}

# start_backend sets BACKEND (host:port). It listens on port 0 and prints the
# address it got, so there is no race for a "free" port.
start_backend() {
	"$OUT/backend" -addr 127.0.0.1:0 >"$WORK/backend.out" 2>"$WORK/backend.log" &
	BACKEND_PID=$!
	PIDS+=("$BACKEND_PID")
	BACKEND=$(wait_for_line "$WORK/backend.out" '^127\.0\.0\.1:[0-9]+$' 10) ||
		die "backend did not print its address"
	log "backend on $BACKEND (pid $BACKEND_PID)"
}

# start_server sets SERVER (host:port). Port 0 again; the address is read
# from the server's "listening" log line. Access logging stays on (the
# default, one INFO line per request) and goes to a file, as in production,
# not to a terminal.
start_server() {
	{
		echo "host: 127.0.0.1"
		echo "port: 0"
		echo "logformat: text"
		# The admin listener (dashboard, pprof) defaults to a fixed port;
		# turn it off when this build has it, so a second wsp on the machine
		# cannot make the bench fail.
		if "$ROOT/bin/wsp" server -h 2>&1 | grep -q -- '-admin'; then
			echo 'admin: ""'
		fi
	} >"$WORK/server.yaml"
	"$ROOT/bin/wsp" server -config "$WORK/server.yaml" 2>"$WORK/server.log" &
	SERVER_PID=$!
	PIDS+=("$SERVER_PID")
	local line
	line=$(wait_for_line "$WORK/server.log" 'listening.*127\.0\.0\.1:[0-9]+' 10) || {
		alive "$SERVER_PID" server
		die "server did not log its listen address"
	}
	SERVER=$(grep -oE '127\.0\.0\.1:[0-9]+' <<<"$line" | head -n1)
	log "wsp server on $SERVER (pid $SERVER_PID)"
}

# start_client connects one wsp client, allowed to reach the backend only,
# with room for every wrk connection (poolmaxsize bounds concurrent streams).
start_client() {
	cat >"$WORK/client.yaml" <<-EOF
		id: bench
		targets: [ws://$SERVER/register]
		poolmaxsize: 1000
		logformat: text
		whitelist:
		  - url: "^http://$BACKEND/"
	EOF
	"$ROOT/bin/wsp" client -config "$WORK/client.yaml" 2>"$WORK/client.log" &
	CLIENT_PID=$!
	PIDS+=("$CLIENT_PID")
	log "wsp client started (pid $CLIENT_PID)"
}

# wait_relay polls a request through the relay until it answers 200, i.e.
# the client's session is registered and usable; at most 10 s.
wait_relay() {
	local i code
	for ((i = 0; i < 100; i++)); do
		code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 \
			-H "X-PROXY-DESTINATION: http://$BACKEND/small" "http://$SERVER/request" || true)
		[[ $code == 200 ]] && return 0
		alive "$SERVER_PID" server
		alive "$CLIENT_PID" client
		sleep 0.1
	done
	die "no 200 through the relay after 10 s (last status $code)"
}

# ------------------------------------------------------------------ measure

# to_us VALUE: convert a wrk duration ("32.00us", "1.22ms", "2.00s", "1.00m") to µs.
to_us() {
	awk -v v="$1" 'BEGIN {
		if (match(v, /[a-z]+$/)) { n = substr(v, 1, RSTART - 1); u = substr(v, RSTART) } else { n = v; u = "s" }
		f = (u == "us") ? 1 : (u == "ms") ? 1e3 : (u == "s") ? 1e6 : (u == "m") ? 6e7 : (u == "h") ? 3.6e9 : -1
		if (f < 0) exit 1
		printf "%.1f", n * f
	}'
}

# cpu_ticks PID: utime+stime (fields 14 and 15 of /proc/PID/stat, all
# threads, in clock ticks). Fields are counted after the ")" closing the
# command name, which may itself contain spaces.
cpu_ticks() {
	local stat
	stat=$(<"/proc/$1/stat")
	stat=${stat##*) }
	awk '{ print $12 + $13 }' <<<"$stat"
}

# status_kib PID KEY: a "kB" field of /proc/PID/status, e.g. VmRSS.
status_kib() {
	awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"
}

# run_wrk FILE CONNS URL [HEADER]: one wrk run, raw output kept in FILE.
# Sets W_RPS, W_P50_US, W_REQUESTS, W_ERRORS. wrk's own --timeout is generous
# (a 10 MiB body may take a while at c=8 on a loaded box); the outer timeout
# bounds the whole run in case wrk hangs.
run_wrk() {
	local file=$1 conns=$2 url=$3 header=${4:-} threads=2
	((conns == 1)) && threads=1
	local args=(-t"$threads" -c"$conns" -d"${DURATION}s" --timeout 10s --latency)
	[[ -n $header ]] && args+=(-H "$header")
	timeout -k 5 $((DURATION + 30)) wrk "${args[@]}" "$url" >"$file" 2>&1 || {
		cat "$file" >&2
		die "wrk failed: $url"
	}
	W_RPS=$(awk '/^Requests\/sec:/ { print $2 }' "$file")
	W_REQUESTS=$(awk '/ requests in / { print $1 }' "$file")
	W_P50_US=$(to_us "$(awk '$1 == "50%" { print $2 }' "$file")")
	# Failed requests would inflate req/s; count them so they show.
	W_ERRORS=$(awk '
		/Non-2xx or 3xx responses:/ { e += $NF }
		/Socket errors:/ { gsub(/,/, ""); e += $4 + $6 + $8 + $10 }
		END { print e + 0 }' "$file")
	[[ -n $W_RPS && -n $W_REQUESTS && -n $W_P50_US ]] || {
		cat "$file" >&2
		die "could not parse wrk output in $file"
	}
}

# measure_point NAME PATH CONNS: RUNS × (direct, then through wsp).
measure_point() {
	local name=$1 path=$2 conns=$3 run s0 c0
	log "$name: $RUNS × ${DURATION}s direct and through wsp"
	for ((run = 1; run <= RUNS; run++)); do
		run_wrk "$WORK/wrk-$name-direct-$run.txt" "$conns" "http://$BACKEND$path"
		record "$name/direct"

		alive "$SERVER_PID" server
		alive "$CLIENT_PID" client
		s0=$(cpu_ticks "$SERVER_PID")
		c0=$(cpu_ticks "$CLIENT_PID")
		run_wrk "$WORK/wrk-$name-wsp-$run.txt" "$conns" "http://$SERVER/request" \
			"X-PROXY-DESTINATION: http://$BACKEND$path"
		record "$name/wsp"
		if [[ $name == "$CPU_POINT" ]]; then
			# Summed over runs, then divided once: ticks are 10 ms coarse,
			# so the total is a better estimate than a median of small parts.
			CPU_TICKS_SERVER=$((CPU_TICKS_SERVER + $(cpu_ticks "$SERVER_PID") - s0))
			CPU_TICKS_CLIENT=$((CPU_TICKS_CLIENT + $(cpu_ticks "$CLIENT_PID") - c0))
			CPU_REQUESTS=$((CPU_REQUESTS + W_REQUESTS))
		fi
	done
}

record() {
	RPS[$1]="${RPS[$1]:-} $W_RPS"
	P50[$1]="${P50[$1]:-} $W_P50_US"
	ERRS[$1]=$((${ERRS[$1]:-0} + W_ERRORS))
}

# median N...: the middle value (mean of the two middle ones for even N).
median() {
	printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 }
		END { if (NR % 2) print a[(NR + 1) / 2]; else printf "%.2f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

# calc EXPR: floating-point arithmetic (awk), e.g. calc '%.2f' '1/3'.
calc() { awk "BEGIN { printf \"$1\", $2 }"; }

# ------------------------------------------------------------------- report

report() {
	local clk rss_s rss_c hwm_s hwm_c
	clk=$(getconf CLK_TCK)
	rss_s=$(status_kib "$SERVER_PID" VmRSS)
	rss_c=$(status_kib "$CLIENT_PID" VmRSS)
	hwm_s=$(status_kib "$SERVER_PID" VmHWM)
	hwm_c=$(status_kib "$CLIENT_PID" VmHWM)

	local cpu_s=0 cpu_c=0 cpu_t=0
	if ((CPU_REQUESTS > 0)); then
		cpu_s=$(calc '%.1f' "$CPU_TICKS_SERVER * 1e6 / $clk / $CPU_REQUESTS")
		cpu_c=$(calc '%.1f' "$CPU_TICKS_CLIENT * 1e6 / $clk / $CPU_REQUESTS")
		cpu_t=$(calc '%.1f' "($CPU_TICKS_SERVER + $CPU_TICKS_CLIENT) * 1e6 / $clk / $CPU_REQUESTS")
	fi

	local p50_d p50_w p50_add
	# shellcheck disable=SC2086 # word splitting of the run lists is intended
	p50_d=$(median ${P50[$P50_POINT/direct]})
	# shellcheck disable=SC2086
	p50_w=$(median ${P50[$P50_POINT/wsp]})
	p50_add=$(calc '%.0f' "$p50_w - $p50_d")

	local entry name path conns d w ratio json_points="" ratios=()
	echo
	echo "wsp bench: ${DURATION}s per run, median of $RUNS run(s), $(nproc) CPU(s), $(wrk --version 2>&1 | head -n1 | awk '{ print $1, $2 }')"
	echo "wsp server access logging: on (INFO, one line per request, to $WORK/server.log)"
	echo
	printf '%-12s %14s %14s %8s %10s\n' point "direct req/s" "wsp req/s" ratio "errors d/w"
	for entry in "${POINTS[@]}"; do
		read -r name path conns <<<"$entry"
		# shellcheck disable=SC2086
		d=$(median ${RPS[$name/direct]})
		# shellcheck disable=SC2086
		w=$(median ${RPS[$name/wsp]})
		ratio=$(calc '%.4f' "($d > 0) ? $w / $d : 0")
		# Rounded once, so the table and the issue-8 row agree.
		ratios+=("$(calc '%.2f' "($d > 0) ? $w / $d : 0")")
		printf '%-12s %14.0f %14.0f %8s %10s\n' "$name" "$d" "$w" "${ratios[-1]}" \
			"${ERRS[$name/direct]}/${ERRS[$name/wsp]}"
		json_points+="${json_points:+,}
    {\"name\": \"$name\", \"path\": \"$path\", \"connections\": $conns, \"threads\": $(((conns == 1) ? 1 : 2)),
     \"direct_rps\": $d, \"wsp_rps\": $w, \"ratio\": $ratio,
     \"direct_rps_runs\": [$(join_csv ${RPS[$name/direct]})], \"wsp_rps_runs\": [$(join_csv ${RPS[$name/wsp]})],
     \"direct_p50_us_runs\": [$(join_csv ${P50[$name/direct]})], \"wsp_p50_us_runs\": [$(join_csv ${P50[$name/wsp]})],
     \"direct_errors\": ${ERRS[$name/direct]}, \"wsp_errors\": ${ERRS[$name/wsp]}}"
	done
	echo
	printf 'added p50 at c=1 (small): +%s µs  (direct %s µs, wsp %s µs)\n' "$p50_add" "$p50_d" "$p50_w"
	printf 'CPU per request at c=64 (small): %s µs  (server %s + client %s; %d requests)\n' \
		"$cpu_t" "$cpu_s" "$cpu_c" "$CPU_REQUESTS"
	printf 'RSS after load: server %.1f MiB, client %.1f MiB  (peak: server %.1f, client %.1f MiB)\n' \
		"$(calc '%.2f' "$rss_s / 1024")" "$(calc '%.2f' "$rss_c / 1024")" \
		"$(calc '%.2f' "$hwm_s / 1024")" "$(calc '%.2f' "$hwm_c / 1024")"
	echo
	echo "issue-8 row: ${ratios[0]} / ${ratios[1]} / ${ratios[2]} | +$p50_add µs | ${ratios[3]} / ${ratios[4]} | $cpu_t µs | $(calc '%.0f' "$rss_s / 1024") MiB"
	echo

	cat >"$RESULTS" <<-EOF
		{
		  "generated": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
		  "commit": "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)",
		  "machine": {"cpus": $(nproc), "cpu_model": "$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)", "kernel": "$(uname -r)"},
		  "duration_s": $DURATION,
		  "runs": $RUNS,
		  "statistic": "median of runs",
		  "access_log": true,
		  "points": [$json_points
		  ],
		  "added_p50_c1_us": {"direct": $p50_d, "wsp": $p50_w, "added": $p50_add},
		  "cpu_us_per_request_c64": {"total": $cpu_t, "server": $cpu_s, "client": $cpu_c, "requests": $CPU_REQUESTS, "clk_tck": $clk},
		  "rss_after_load_kib": {"server": $rss_s, "client": $rss_c, "server_peak": $hwm_s, "client_peak": $hwm_c}
		}
	EOF
	log "wrote $RESULTS"
}

join_csv() {
	local IFS=,
	echo "$*"
}

# --------------------------------------------------------------------- main

main() {
	check_args
	mkdir -p "$OUT"
	rm -rf "$WORK"
	mkdir -p "$WORK"
	ensure_wrk
	build
	start_backend
	start_server
	start_client
	wait_relay

	local entry name path conns
	for entry in "${POINTS[@]}"; do
		read -r name path conns <<<"$entry"
		measure_point "$name" "$path" "$conns"
	done
	alive "$SERVER_PID" server
	alive "$CLIENT_PID" client
	report
}

main "$@"

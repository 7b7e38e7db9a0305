#!/usr/bin/env bash
# bench/run.sh — throughput and latency of wsp against going direct.
#
# Starts a tiny backend (bench/backend), a wsp server, a wsp client and a
# `wsp forward` on free loopback ports, then measures with wrk, for each point,
# the backend in three ways in the same run:
#
#   direct    wrk -> backend
#   request   wrk -> server `GET /request` + X-PROXY-DESTINATION -> client -> backend
#   connect   wrk -> `wsp forward` -> CONNECT tunnel through server and client -> backend
#             (one tunnel per accepted connection; wrk keeps its connections
#             alive, so each wrk connection is one tunnel for the whole run)
#
# at these points:
#
#   small GETs (~100 B)   at c=1, 16, 64
#   10 MiB download       at c=1, 8
#
# Each point runs DURATION seconds, RUNS times (direct, request and connect
# interleaved so that machine drift hits all alike); the table shows the
# median req/s and the ratios to direct. Also: added p50 latency at c=1, CPU
# per request at c=64 (server+client for request; server+client+forward for
# connect), and RSS of the processes after load. Results go to
# bench/out/results.json (the /request mode keeps its historical key "wsp";
# the CONNECT mode's fields are named "connect").
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

# Modes ("wsp" is /request) and the wsp processes whose CPU each one costs.
declare -A MODE_PROCS=([wsp]="server client" [connect]="server client forward")

declare -a PIDS=()     # every process we started, killed on exit
declare -A PID_OF=()   # "server"/"client"/"forward" -> pid
declare -A RPS=()      # "$point/$mode" -> space-separated req/s of each run
declare -A P50=()      # "$point/$mode" -> space-separated p50 (µs) of each run
declare -A ERRS=()     # "$point/$mode" -> non-2xx + socket errors, all runs
declare -A TUNNELS=()  # "$point" -> tunnels the forward closed, all runs
declare -A CPU=()      # "$mode/$proc" -> clock ticks at CPU_POINT, all runs; "$mode/requests"
declare -A CPU0=()     # "$proc" -> ticks when the current measured run started

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
	PID_OF[server]=$SERVER_PID
	local line
	line=$(wait_for_line "$WORK/server.log" 'listening.*127\.0\.0\.1:[0-9]+' 10) || {
		alive "$SERVER_PID" server
		die "server did not log its listen address"
	}
	SERVER=$(grep -oE '127\.0\.0\.1:[0-9]+' <<<"$line" | head -n1)
	log "wsp server on $SERVER (pid $SERVER_PID)"
}

# start_client connects one wsp client, allowed to reach the backend only
# (HTTP requests to it, and CONNECT to its host:port), with room for every
# wrk connection (poolmaxsize bounds concurrent streams).
start_client() {
	local backend_re=${BACKEND//./\\.} # single-quoted in YAML: backslashes stay
	cat >"$WORK/client.yaml" <<-EOF
		id: bench
		targets: [ws://$SERVER/register]
		poolmaxsize: 1000
		logformat: text
		whitelist:
		  - url: "^http://$BACKEND/"
		  - method: "^CONNECT\$"
		    url: '^$backend_re\$'
	EOF
	"$ROOT/bin/wsp" client -config "$WORK/client.yaml" 2>"$WORK/client.log" &
	CLIENT_PID=$!
	PIDS+=("$CLIENT_PID")
	PID_OF[client]=$CLIENT_PID
	log "wsp client started (pid $CLIENT_PID)"
}

# start_forward sets FORWARD (host:port): `wsp forward` to the backend through
# the server, one CONNECT tunnel per accepted connection. -listen on port 0;
# the address is read from its "forwarding" log line. Its stderr, one line per
# closed tunnel, goes to forward.log.
start_forward() {
	"$ROOT/bin/wsp" forward -server "http://$SERVER" -listen 127.0.0.1:0 -to "$BACKEND" \
		2>"$WORK/forward.log" &
	FORWARD_PID=$!
	PIDS+=("$FORWARD_PID")
	PID_OF[forward]=$FORWARD_PID
	local line
	line=$(wait_for_line "$WORK/forward.log" 'forwarding.*listen=127\.0\.0\.1:[0-9]+' 10) || {
		alive "$FORWARD_PID" forward
		die "wsp forward did not log its listen address"
	}
	FORWARD=$(grep -oE 'listen=127\.0\.0\.1:[0-9]+' <<<"$line" | head -n1)
	FORWARD=${FORWARD#listen=}
	log "wsp forward on $FORWARD to $BACKEND (pid $FORWARD_PID)"
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

# wait_tunnel checks one request through a CONNECT tunnel (wsp forward) answers
# 200; at most 10 s.
wait_tunnel() {
	local i code
	for ((i = 0; i < 100; i++)); do
		code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://$FORWARD/small" || true)
		[[ $code == 200 ]] && return 0
		relay_alive
		sleep 0.1
	done
	die "no 200 through a CONNECT tunnel after 10 s (last status $code; see $WORK/forward.log)"
}

# relay_alive fails if the server, the client or the forward has died.
relay_alive() {
	alive "$SERVER_PID" server
	alive "$CLIENT_PID" client
	alive "$FORWARD_PID" forward
}

# tunnel_count closed|refused: tunnels `wsp forward` has logged so far.
tunnel_count() {
	grep -c "msg=\"tunnel $1\"" "$WORK/forward.log" || true
}

# open_tunnels: connections the forward has accepted and not yet closed,
# i.e. sockets on its listen port other than the listener (0A) and TIME_WAIT
# (06). It closes its side after the tunnel ended and was logged.
open_tunnels() {
	awk -v p="$(printf ':%04X' "${FORWARD##*:}")" '
		NR > 1 && substr($2, length($2) - 4) == p && $4 != "0A" && $4 != "06" { n++ }
		END { print n + 0 }' /proc/net/tcp
}

# wait_tunnels_closed: wait (at most 10 s) until every tunnel of the last run
# has ended, so that their teardown is counted with that run and not the next.
wait_tunnels_closed() {
	local i
	for ((i = 0; i < 100; i++)); do
		(($(open_tunnels) == 0)) && return 0
		sleep 0.1
	done
	log "warning: $(open_tunnels) tunnel(s) still open 10 s after wrk ended"
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

# measure_point NAME PATH CONNS: RUNS × (direct, through /request, through
# a CONNECT tunnel).
measure_point() {
	local name=$1 path=$2 conns=$3 run t0
	log "$name: $RUNS × ${DURATION}s direct, through /request and through CONNECT"
	for ((run = 1; run <= RUNS; run++)); do
		run_wrk "$WORK/wrk-$name-direct-$run.txt" "$conns" "http://$BACKEND$path"
		record "$name/direct"

		relay_alive
		cpu_start wsp
		run_wrk "$WORK/wrk-$name-wsp-$run.txt" "$conns" "http://$SERVER/request" \
			"X-PROXY-DESTINATION: http://$BACKEND$path"
		record "$name/wsp"
		if [[ $name == "$CPU_POINT" ]]; then cpu_end wsp; fi

		relay_alive
		t0=$(($(tunnel_count closed) + $(tunnel_count refused)))
		cpu_start connect
		run_wrk "$WORK/wrk-$name-connect-$run.txt" "$conns" "http://$FORWARD$path"
		record "$name/connect"
		# wrk has closed its connections; wait for their tunnels to end so
		# the teardown is counted here and not in the next run. (wrk opens
		# one extra connection per run to check the address: tunnels =
		# connections + 1.)
		wait_tunnels_closed
		TUNNELS[$name]=$((${TUNNELS[$name]:-0} + $(tunnel_count closed) + $(tunnel_count refused) - t0))
		if [[ $name == "$CPU_POINT" ]]; then cpu_end connect; fi
	done
}

# cpu_start MODE / cpu_end MODE: add the CPU ticks the mode's processes spent
# in between (and the run's requests) to CPU. Summed over runs, then divided
# once: ticks are 10 ms coarse, so the total is a better estimate than a
# median of small parts.
cpu_start() {
	local proc
	for proc in ${MODE_PROCS[$1]}; do
		CPU0[$proc]=$(cpu_ticks "${PID_OF[$proc]}")
	done
}
cpu_end() {
	local proc
	for proc in ${MODE_PROCS[$1]}; do
		CPU[$1/$proc]=$((${CPU[$1/$proc]:-0} + $(cpu_ticks "${PID_OF[$proc]}") - ${CPU0[$proc]}))
	done
	CPU[$1/requests]=$((${CPU[$1/requests]:-0} + W_REQUESTS))
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
	local clk proc
	clk=$(getconf CLK_TCK)
	local -A rss=() hwm=()
	for proc in server client forward; do
		rss[$proc]=$(status_kib "${PID_OF[$proc]}" VmRSS)
		hwm[$proc]=$(status_kib "${PID_OF[$proc]}" VmHWM)
	done

	# CPU per request (µs) at CPU_POINT: cpu[$mode/$proc] and cpu[$mode/total].
	local -A cpu=()
	local mode ticks reqs total
	for mode in wsp connect; do
		reqs=${CPU[$mode/requests]:-0}
		total=0
		for proc in ${MODE_PROCS[$mode]}; do
			ticks=${CPU[$mode/$proc]:-0}
			total=$((total + ticks))
			cpu[$mode/$proc]=$(calc '%.1f' "($reqs > 0) ? $ticks * 1e6 / $clk / $reqs : 0")
		done
		cpu[$mode/total]=$(calc '%.1f' "($reqs > 0) ? $total * 1e6 / $clk / $reqs : 0")
	done
	# The relay+client part of connect, comparable with /request's total.
	reqs=${CPU[connect/requests]:-0}
	cpu[connect/relay]=$(calc '%.1f' "($reqs > 0) ? (${CPU[connect/server]:-0} + ${CPU[connect/client]:-0}) * 1e6 / $clk / $reqs : 0")

	# Added p50 at P50_POINT.
	local -A p50=() added=()
	for mode in direct wsp connect; do
		# shellcheck disable=SC2086 # word splitting of the run lists is intended
		p50[$mode]=$(median ${P50[$P50_POINT/$mode]})
	done
	for mode in wsp connect; do
		added[$mode]=$(calc '%.0f' "${p50[$mode]} - ${p50[direct]}")
	done

	local entry name path conns d w c rw rc json_points="" ratios_w=() ratios_c=()
	echo
	echo "wsp bench: ${DURATION}s per run, median of $RUNS run(s), $(nproc) CPU(s), $(wrk --version 2>&1 | head -n1 | awk '{ print $1, $2 }')"
	echo "request = GET /request on the server; connect = wsp forward, one CONNECT tunnel per wrk connection"
	echo "wsp server access logging: on (INFO, one line per request, to $WORK/server.log)"
	echo
	printf '%-10s %10s %10s %6s %10s %6s %10s\n' "" direct request "" connect "" errors
	printf '%-10s %10s %10s %6s %10s %6s %10s\n' point "req/s" "req/s" ratio "req/s" ratio "d/r/c"
	for entry in "${POINTS[@]}"; do
		read -r name path conns <<<"$entry"
		# shellcheck disable=SC2086
		d=$(median ${RPS[$name/direct]})
		# shellcheck disable=SC2086
		w=$(median ${RPS[$name/wsp]})
		# shellcheck disable=SC2086
		c=$(median ${RPS[$name/connect]})
		rw=$(calc '%.4f' "($d > 0) ? $w / $d : 0")
		rc=$(calc '%.4f' "($d > 0) ? $c / $d : 0")
		# Rounded once, so the table and the issue-8 rows agree.
		ratios_w+=("$(calc '%.2f' "$rw")")
		ratios_c+=("$(calc '%.2f' "$rc")")
		printf '%-10s %10.0f %10.0f %6s %10.0f %6s %10s\n' "$name" "$d" "$w" "${ratios_w[-1]}" \
			"$c" "${ratios_c[-1]}" "${ERRS[$name/direct]}/${ERRS[$name/wsp]}/${ERRS[$name/connect]}"
		json_points+="${json_points:+,}
    {\"name\": \"$name\", \"path\": \"$path\", \"connections\": $conns, \"threads\": $(((conns == 1) ? 1 : 2)),
     \"direct_rps\": $d, \"wsp_rps\": $w, \"ratio\": $rw, \"connect_rps\": $c, \"connect_ratio\": $rc,
     \"direct_rps_runs\": [$(join_csv ${RPS[$name/direct]})], \"wsp_rps_runs\": [$(join_csv ${RPS[$name/wsp]})], \"connect_rps_runs\": [$(join_csv ${RPS[$name/connect]})],
     \"direct_p50_us_runs\": [$(join_csv ${P50[$name/direct]})], \"wsp_p50_us_runs\": [$(join_csv ${P50[$name/wsp]})], \"connect_p50_us_runs\": [$(join_csv ${P50[$name/connect]})],
     \"direct_errors\": ${ERRS[$name/direct]}, \"wsp_errors\": ${ERRS[$name/wsp]}, \"connect_errors\": ${ERRS[$name/connect]},
     \"connect_tunnels\": ${TUNNELS[$name]:-0}}"
	done
	local refused
	refused=$(tunnel_count refused)
	echo
	printf 'added p50 at c=1 (small):         request +%s µs, connect +%s µs  (p50: direct %s, request %s, connect %s µs)\n' \
		"${added[wsp]}" "${added[connect]}" "${p50[direct]}" "${p50[wsp]}" "${p50[connect]}"
	printf 'CPU per request at c=64 (small):  request %s µs  (server %s + client %s; %d requests)\n' \
		"${cpu[wsp/total]}" "${cpu[wsp/server]}" "${cpu[wsp/client]}" "${CPU[wsp/requests]:-0}"
	printf '                                  connect %s µs  (server %s + client %s + forward %s; %d requests)\n' \
		"${cpu[connect/total]}" "${cpu[connect/server]}" "${cpu[connect/client]}" "${cpu[connect/forward]}" "${CPU[connect/requests]:-0}"
	printf 'RSS after load: server %.1f, client %.1f, forward %.1f MiB  (peak: %.1f, %.1f, %.1f MiB)\n' \
		"$(calc '%.2f' "${rss[server]} / 1024")" "$(calc '%.2f' "${rss[client]} / 1024")" "$(calc '%.2f' "${rss[forward]} / 1024")" \
		"$(calc '%.2f' "${hwm[server]} / 1024")" "$(calc '%.2f' "${hwm[client]} / 1024")" "$(calc '%.2f' "${hwm[forward]} / 1024")"
	printf 'CONNECT tunnels: %d closed, %d refused (%s)\n' "$(tunnel_count closed)" "$refused" "$WORK/forward.log"
	echo
	echo "issue-8 rows (small c=1/16/64 | added p50 | 10 MiB c=1/8 | CPU per request c=64 | server RSS):"
	echo "  /request: ${ratios_w[0]} / ${ratios_w[1]} / ${ratios_w[2]} | +${added[wsp]} µs | ${ratios_w[3]} / ${ratios_w[4]} | ${cpu[wsp/total]} µs | $(calc '%.0f' "${rss[server]} / 1024") MiB"
	echo "  CONNECT:  ${ratios_c[0]} / ${ratios_c[1]} / ${ratios_c[2]} | +${added[connect]} µs | ${ratios_c[3]} / ${ratios_c[4]} | ${cpu[connect/total]} µs (server+client ${cpu[connect/relay]}, forward ${cpu[connect/forward]}) |"
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
		  "modes": {"direct": "wrk to the backend", "wsp": "GET /request + X-PROXY-DESTINATION", "connect": "wsp forward: one CONNECT tunnel per wrk connection"},
		  "points": [$json_points
		  ],
		  "added_p50_c1_us": {"direct": ${p50[direct]}, "wsp": ${p50[wsp]}, "added": ${added[wsp]}, "connect": ${p50[connect]}, "connect_added": ${added[connect]}},
		  "cpu_us_per_request_c64": {"total": ${cpu[wsp/total]}, "server": ${cpu[wsp/server]}, "client": ${cpu[wsp/client]}, "requests": ${CPU[wsp/requests]:-0}, "clk_tck": $clk},
		  "connect_cpu_us_per_request_c64": {"total": ${cpu[connect/total]}, "server": ${cpu[connect/server]}, "client": ${cpu[connect/client]}, "forward": ${cpu[connect/forward]}, "server_plus_client": ${cpu[connect/relay]}, "requests": ${CPU[connect/requests]:-0}, "clk_tck": $clk},
		  "rss_after_load_kib": {"server": ${rss[server]}, "client": ${rss[client]}, "forward": ${rss[forward]}, "server_peak": ${hwm[server]}, "client_peak": ${hwm[client]}, "forward_peak": ${hwm[forward]}},
		  "connect_tunnels": {"closed": $(tunnel_count closed), "refused": $refused}
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
	start_forward
	wait_tunnel

	local entry name path conns
	for entry in "${POINTS[@]}"; do
		read -r name path conns <<<"$entry"
		measure_point "$name" "$path" "$conns"
	done
	relay_alive
	report
}

main "$@"

#!/bin/sh
# Cached BuildImage against `imagebuilder serve` on loopback: latency p50,
# p99 and p99.9 and requests per second with 1 and with 64 concurrent
# keep-alive clients (bench/loadgen.c, built here), for each way
# libmicrohttpd can wait for sockets (epoll, poll) and 1 or N http threads.
# Target: p99 < 5 ms at 64 clients.
#
#   bench/serve-bench.sh [BUILD]
#
# Environment: SERVE_BENCH_SECONDS (per run, default 5), SERVE_BENCH_CACHE
# (cache dir; default BUILD/test-cache, where `make test` left the
# debian_amd64 base: without it the first build bootstraps Debian).
# Auth is on (a bearer token) and the daemon logs every request, as it
# would in production; the log goes to a file.
set -eu
BUILD=${1:-build}
top=$(cd "$(dirname "$0")/.." && pwd)
IB="$top/$BUILD/imagebuilder"
LG="$top/$BUILD/bench/loadgen"
SECS=${SERVE_BENCH_SECONDS:-5}
C=${SERVE_BENCH_CACHE:-$top/$BUILD/test-cache}
NCPU=$(nproc)
W=$(mktemp -d "${TMPDIR:-/tmp}/ib-serve-bench.XXXXXX")
PID=""

cleanup() {
	if [ -n "$PID" ]; then kill -TERM "$PID" 2>/dev/null; wait "$PID" 2>/dev/null || true; fi
	rm -rf "$W"
}
trap cleanup EXIT INT TERM

[ -x "$IB" ] || { echo "serve-bench: build $IB first (make)" >&2; exit 1; }
mkdir -p "$top/$BUILD/bench"
cc -std=c11 -D_GNU_SOURCE -O2 -Wall -Wextra -include "$top/lib/banned.h" -o "$LG" "$top/bench/loadgen.c"

head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$W/token"
printf '{"spec": {"base": "debian_amd64", "steps": [{"env": {"IMAGEBUILDER_BENCH": "serve"}}]}}' > "$W/body.json"
AUTH="Authorization: Bearer $(cat "$W/token")"

start() { # start MODE THREADS
	rm -f "$W/port"
	"$IB" serve --cache-dir "$C" --listen 127.0.0.1:0 --port-file "$W/port" --token-file "$W/token" \
		--http-mode "$1" --http-threads "$2" --jobs 1 2>>"$W/serve.log" &
	PID=$!
	i=0
	while [ ! -s "$W/port" ]; do
		i=$((i + 1))
		if [ $i -gt 200 ] || ! kill -0 "$PID" 2>/dev/null; then
			echo "serve-bench: the daemon did not start: $(tail -3 "$W/serve.log")" >&2
			exit 1
		fi
		sleep 0.05
	done
	URL="http://127.0.0.1:$(cat "$W/port")"
}
stop() { kill -TERM "$PID"; wait "$PID" || true; PID=""; }

rpc() { # rpc METHOD BODY-FILE
	curl -s -X POST -H 'Content-Type: application/json' -H "$AUTH" --data-binary @"$2" \
		"$URL/imagebuilder.v1.ImageBuilder/$1"
}
field() { python3 -c "import json,sys; print(json.load(sys.stdin).get('$1', ''))"; }

echo "imagebuilder serve bench on $NCPU cores, $(uname -r), $(date -u +%F); ${SECS}s per run, loadgen on the same machine"

# Make sure the image is built: the bench measures the cached answer.
start epoll "$NCPU"
rpc BuildImage "$W/body.json" > "$W/first.json"
bid=$(field build_id < "$W/first.json")
[ -n "$bid" ] || { echo "serve-bench: BuildImage failed: $(cat "$W/first.json")" >&2; exit 1; }
printf '{"build_id": "%s"}' "$bid" > "$W/get.json"
t0=$(date +%s)
while :; do
	st=$(rpc GetBuild "$W/get.json" | field status)
	case "$st" in
	READY) break ;;
	FAILED|CANCELLED|TIMEOUT) echo "serve-bench: the image build ended $st" >&2; exit 1 ;;
	esac
	[ $(( $(date +%s) - t0 )) -lt 1800 ] || { echo "serve-bench: the image build takes too long" >&2; exit 1; }
	sleep 0.5
done
[ "$(rpc BuildImage "$W/body.json" | field cached)" = True ] || { echo "serve-bench: not a cache hit" >&2; exit 1; }
stop

printf '\n%-6s %7s %7s %9s %8s %8s %9s %8s\n' mode threads clients 'req/s' 'p50 ms' 'p99 ms' 'p99.9 ms' 'max ms'
worst=0
for mode in epoll poll; do
	for threads in $(printf '1\n%s\n' "$NCPU" | sort -un); do
		start "$mode" "$threads"
		for clients in 1 64; do
			out=$("$LG" -c "$clients" -d "$SECS" -w 1 -H 'Content-Type: application/json' -H "$AUTH" \
				-b "$W/body.json" -e '"cached":true' "$URL/imagebuilder.v1.ImageBuilder/BuildImage") || {
				echo "serve-bench: errors: $out" >&2
				exit 1
			}
			v() { echo "$out" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
			printf '%-6s %7s %7s %9s %8s %8s %9s %8s\n' "$mode" "$threads" "$clients" "$(v rps)" "$(v p50_ms)" \
				"$(v p99_ms)" "$(v p999_ms)" "$(v max_ms)"
			if [ "$clients" = 64 ] && [ "$mode" = epoll ] && [ "$threads" = "$NCPU" ]; then worst=$(v p99_ms); fi
		done
		stop
	done
done
echo
if [ "$(echo "$worst < 5" | bc)" = 1 ]; then
	echo "target p99 < 5 ms at 64 clients (default: epoll, $NCPU threads): met (${worst} ms)"
else
	echo "target p99 < 5 ms at 64 clients (default: epoll, $NCPU threads): MISSED (${worst} ms)"
fi

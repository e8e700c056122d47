#!/bin/sh
# Cached BuildImage against `imagebuilder serve` on loopback: latency p50,
# p99 and p99.9 and requests per second with 1 and with 64 concurrent
# keep-alive clients (bench/loadgen.c, built here), for each way
# libmicrohttpd can wait for sockets (epoll, poll) and 1 or N http threads.
# Then Connect+JSON, Connect+proto and gRPC side by side on the default
# daemon.  Target: p99 < 5 ms at 64 clients, for each.
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

# The protocols side by side on the default daemon (epoll, one HTTP thread a
# core): Connect with JSON and with binary Protobuf over HTTP/1.1
# (loadgen), gRPC over h2c (h2load from nghttp2-client: one connection a
# client, one stream at a time, the same closed loop).
PYG=/usr/bin/python3
mkdir -p "$W/stubs"
$PYG -m grpc_tools.protoc -I "$top/proto" -I /usr/include --python_out="$W/stubs" imagebuilder/v1/imagebuilder.proto
$PYG - "$W" <<'PYEOF'
import struct, sys
sys.path.insert(0, sys.argv[1] + "/stubs")
from google.protobuf import json_format
from imagebuilder.v1 import imagebuilder_pb2 as pb
msg = json_format.Parse(open(sys.argv[1] + "/body.json").read(), pb.BuildImageRequest()).SerializeToString()
open(sys.argv[1] + "/body.bin", "wb").write(msg)
open(sys.argv[1] + "/body.grpc", "wb").write(b"\0" + struct.pack(">I", len(msg)) + msg)
PYEOF
start epoll "$NCPU"
# the cached answer over each, checked once: READY, cached
curl -s -X POST -H 'Content-Type: application/proto' -H "$AUTH" --data-binary @"$W/body.bin" \
	"$URL/imagebuilder.v1.ImageBuilder/BuildImage" > "$W/answer.bin"
# status = READY (field 3, 3), cached = true (field 4, 1)
python3 -c 'import sys; sys.exit(b"\x18\x03\x20\x01" not in open(sys.argv[1], "rb").read())' "$W/answer.bin" ||
	{ echo "serve-bench: the Connect+proto answer is not READY, cached" >&2; exit 1; }
curl -s --http2-prior-knowledge -X POST -H 'Content-Type: application/grpc' -H 'TE: trailers' -H "$AUTH" \
	--data-binary @"$W/body.grpc" -D "$W/grpc.hdr" -o /dev/null "$URL/imagebuilder.v1.ImageBuilder/BuildImage"
grep -qi '^grpc-status: 0' "$W/grpc.hdr" || { echo "serve-bench: gRPC BuildImage failed: $(cat "$W/grpc.hdr")" >&2; exit 1; }

printf '\n%-14s %7s %9s %8s %8s %9s %8s\n' protocol clients 'req/s' 'p50 ms' 'p99 ms' 'p99.9 ms' 'max ms'
pworst=""
for proto in connect+json connect+proto grpc; do
	for clients in 1 64; do
		case "$proto" in
		connect+json)
			out=$("$LG" -c "$clients" -d "$SECS" -w 1 -H 'Content-Type: application/json' -H "$AUTH" \
				-b "$W/body.json" -e '"cached":true' "$URL/imagebuilder.v1.ImageBuilder/BuildImage") ;;
		connect+proto)
			out=$("$LG" -c "$clients" -d "$SECS" -w 1 -H 'Content-Type: application/proto' -H "$AUTH" \
				-b "$W/body.bin" "$URL/imagebuilder.v1.ImageBuilder/BuildImage") ;;
		grpc)
			rm -f "$W/h2load.log"
			h2load -c "$clients" -m 1 -D "$SECS" --warm-up-time=1 -H 'Content-Type: application/grpc' \
				-H 'TE: trailers' -H "$AUTH" -d "$W/body.grpc" --log-file="$W/h2load.log" \
				"$URL/imagebuilder.v1.ImageBuilder/BuildImage" > "$W/h2load.out" 2>&1 || {
				echo "serve-bench: h2load: $(tail -5 "$W/h2load.out")" >&2
				exit 1
			}
			out=$(python3 - "$W/h2load.log" "$SECS" <<'PYEOF'
import sys
rows = [l.split("\t") for l in open(sys.argv[1]) if l.strip()]
bad = sum(1 for r in rows if r[1] != "200")
ms = sorted(int(r[2]) / 1000 for r in rows)
q = lambda p: ms[min(len(ms) - 1, int(p * len(ms)))]
print("requests=%d errors=%d rps=%.0f p50_ms=%.3f p99_ms=%.3f p999_ms=%.3f max_ms=%.3f"
      % (len(ms), bad, len(ms) / float(sys.argv[2]), q(0.5), q(0.99), q(0.999), ms[-1]))
PYEOF
) ;;
		esac
		v() { echo "$out" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
		[ "$(v errors)" = 0 ] || { echo "serve-bench: $proto: errors: $out" >&2; exit 1; }
		printf '%-14s %7s %9s %8s %8s %9s %8s\n' "$proto" "$clients" "$(v rps)" "$(v p50_ms)" "$(v p99_ms)" \
			"$(v p999_ms)" "$(v max_ms)"
		[ "$clients" = 64 ] && pworst="$pworst $proto=$(v p99_ms)"
	done
done
stop

echo
for p in $pworst; do
	if [ "$(echo "${p#*=} < 5" | bc)" = 1 ]; then
		echo "target p99 < 5 ms at 64 clients, ${p%%=*}: met (${p#*=} ms)"
	else
		echo "target p99 < 5 ms at 64 clients, ${p%%=*}: MISSED (${p#*=} ms)"
	fi
done
if [ "$(echo "$worst < 5" | bc)" = 1 ]; then
	echo "target p99 < 5 ms at 64 clients (default: epoll, $NCPU threads): met (${worst} ms)"
else
	echo "target p99 < 5 ms at 64 clients (default: epoll, $NCPU threads): MISSED (${worst} ms)"
fi

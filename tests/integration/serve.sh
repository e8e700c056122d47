# Helpers for the BuildImage service tests (t08*-serve-*.sh), sourced after
# lib.sh.  Each test runs its own daemon on a free loopback port and stops
# it on exit (SIGTERM, then SIGKILL after 20 s).
SERVE_PID=""
SERVE_LOG="$T/serve.log"
TOKEN=""

serve_cleanup() {
	if [ -n "$SERVE_PID" ] && kill -0 "$SERVE_PID" 2>/dev/null; then
		kill -TERM "$SERVE_PID" 2>/dev/null
		i=0
		while kill -0 "$SERVE_PID" 2>/dev/null && [ $i -lt 200 ]; do sleep 0.1; i=$((i + 1)); done
		kill -KILL "$SERVE_PID" 2>/dev/null
		wait "$SERVE_PID" 2>/dev/null
	fi
	SERVE_PID=""
	cleanup
}
trap serve_cleanup EXIT INT TERM

# serve_start [ARGS...]: start the daemon on $C; sets SERVE_PID, URL
serve_start() {
	rm -f "$T/port"
	"$IB" serve --cache-dir "$C" --listen 127.0.0.1:0 --port-file "$T/port" "$@" 2>>"$SERVE_LOG" &
	SERVE_PID=$!
	i=0
	while [ ! -s "$T/port" ]; do
		kill -0 "$SERVE_PID" 2>/dev/null || fail "serve exited: $(tail -5 "$SERVE_LOG")"
		i=$((i + 1)); [ $i -gt 200 ] && fail "serve did not start: $(tail -5 "$SERVE_LOG")"
		sleep 0.05
	done
	URL="http://127.0.0.1:$(cat "$T/port")"
}

# serve_stop [SIGNAL]: signal the daemon (TERM) and wait; sets SERVE_RC
serve_stop() {
	kill -"${1:-TERM}" "$SERVE_PID"
	wait "$SERVE_PID"
	SERVE_RC=$?
	SERVE_PID=""
}

# rpc METHOD JSON: POST a Connect call; the body goes to $T/out.json, the
# HTTP status to $T/status (and stdout)
rpc() {
	curl -s -o "$T/out.json" -w '%{http_code}' -X POST -H 'Content-Type: application/json' \
		${TOKEN:+-H "Authorization: Bearer $TOKEN"} --data-binary "$2" "$URL/imagebuilder.v1.ImageBuilder/$1" >"$T/status"
	cat "$T/status"
}

# out EXPR: a value of the last rpc's answer (python expression on d)
out() { json_get "$T/out.json" "$1"; }

# build_image SPEC_FILE [EXTRA_JSON]: BuildImage; sets BID, IID
build_image() {
	extra=${2:-}
	[ -n "$extra" ] && extra=", $extra"
	st=$(rpc BuildImage "{\"spec\": $(cat "$1")$extra}")
	[ "$st" = 200 ] || fail "BuildImage $1: HTTP $st $(cat "$T/out.json")"
	BID=$(out 'd["build_id"]')
	IID=$(out 'd["image_id"]')
}

# build_status ID: the status GetBuild reports
build_status() {
	rpc GetBuild "{\"build_id\": \"$1\"}" >/dev/null
	out 'd.get("status", "?")'
}

# wait_build ID STATUS [SECONDS]: poll until the build has STATUS
wait_build() {
	n=$(( ${3:-120} * 10 ))
	i=0
	while :; do
		s=$(build_status "$1")
		[ "$s" = "$2" ] && return 0
		case "$s" in READY|FAILED|CANCELLED|TIMEOUT)
			fail "build $1 ended $s, expected $2: $(cat "$T/out.json")" ;;
		esac
		i=$((i + 1)); [ $i -gt $n ] && fail "build $1 still $s after ${3:-120}s, expected $2"
		sleep 0.1
	done
}

# metric NAME: a sample's value from /metrics (NAME with its labels)
metric() {
	curl -s ${TOKEN:+-H "Authorization: Bearer $TOKEN"} "$URL/metrics" | awk -v n="$1" '$1 == n { print $2 }'
}

# wait_pgrep PATTERN: until a process matches (30 s)
wait_pgrep() {
	i=0
	until pgrep -f "$1" >/dev/null; do
		i=$((i + 1)); [ $i -gt 300 ] && fail "no process '$1' appeared"
		sleep 0.1
	done
}

# no_pgrep PATTERN: within 5 s no process matches
no_pgrep() {
	i=0
	while pgrep -f "$1" >/dev/null; do
		i=$((i + 1)); [ $i -gt 50 ] && fail "processes '$1' survive: $(pgrep -af "$1")"
		sleep 0.1
	done
}

# A word no earlier run used, so specs that contain it are not cached.
NONCE=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
# The same as decimal digits, for commands like `sleep 1000.$DNONCE` that pgrep can tell apart.
DNONCE=$(od -An -N4 -tu4 /dev/urandom | tr -d ' \n')

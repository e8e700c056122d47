# Timeouts and cancels in the service: timeout_s ends a build TIMEOUT,
# CancelBuild ends a running one CANCELLED and a queued one before it
# starts; either way the step's whole process tree dies and nothing of it
# is cached.  A client following the log by offsets while the build runs
# reassembles the log exactly.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/serve.sh"
C="$SHARED_CACHE"

serve_start --jobs 1

# -- timeout --
cat > "$T/slow.json" <<JSON
{"base": "debian_amd64", "steps": [{"run_commands": ["echo slow; sleep 1000.$DNONCE & sleep 1001.$DNONCE; echo T$NONCE"]}]}
JSON
start=$(date +%s)
build_image "$T/slow.json" '"timeout_s": 3'
wait_pgrep "T$NONCE"
wait_build "$BID" TIMEOUT 60
[ $(( $(date +%s) - start )) -lt 30 ] || fail "the timeout did not stop the build promptly"
[ "$(out 'd["error"]["step"]')" = 1 ] || fail "error.step: $(out 'd["error"]')"
out 'd["error"]["message"]' | grep -q 'timed out' || fail "error.message: $(out 'd["error"]["message"]')"
[ "$(out 'd["steps"][1]["state"]')" = failed ] || fail "step state: $(out 'd["steps"][1]')"
key=$(out 'd["steps"][1]["key"]')
no_pgrep "T$NONCE"
no_pgrep "sleep 100[01].$DNONCE"
[ ! -e "$C/layers/$key" ] || fail "the timed-out step's layer was committed"
[ "$(rpc CancelBuild "{\"build_id\": \"$BID\"}")" = 200 ] && [ "$(out 'd["status"]')" = TIMEOUT ] ||
	fail "CancelBuild of a finished build: $(cat "$T/out.json")"
ok "timeout_s 3: TIMEOUT within seconds, error names step 1, process tree gone, no layer; cancel after: TIMEOUT"

# -- cancel: one running, one queued behind it (--jobs 1) --
cat > "$T/ticks.json" <<JSON
{"base": "debian_amd64", "steps": [{"run_commands": ["for i in \$(seq 1 3000); do echo tick-\$i; sleep 0.05; done; echo A$NONCE"]}]}
JSON
sed "s/A$NONCE/B$NONCE/" "$T/ticks.json" > "$T/queued.json"
build_image "$T/ticks.json"; ba=$BID
build_image "$T/queued.json"; bq=$BID
[ "$(build_status "$bq")" = QUEUED ] || fail "second build not queued: $(cat "$T/out.json")"
[ "$(out 'd["queue_position"]')" = 1 ] || fail "queue_position: $(out 'd["queue_position"]')"
wait_pgrep "A$NONCE"

# follow the log from offsets while it grows
(
	off=0 chunks=0
	: > "$T/follow.txt"
	while :; do
		curl -s -D "$T/f.hdr" "$URL/v1/builds/$ba/logs?offset=$off" > "$T/chunk" || exit 1
		size=$(tr -d '\r' < "$T/f.hdr" | awk -F': ' 'tolower($1) == "x-log-size" { print $2 }')
		status=$(tr -d '\r' < "$T/f.hdr" | awk -F': ' 'tolower($1) == "x-build-status" { print $2 }')
		[ "$(stat -c %s "$T/chunk")" = $((size - off)) ] || exit 2
		[ -s "$T/chunk" ] && chunks=$((chunks + 1))
		cat "$T/chunk" >> "$T/follow.txt"
		off=$size
		case "$status" in READY|FAILED|CANCELLED|TIMEOUT)
			[ "$(curl -s "$URL/v1/builds/$ba/logs?offset=$off" | wc -c)" = 0 ] && break ;;
		esac
		sleep 0.2
	done
	echo "$chunks" > "$T/chunks"
) &
follower=$!

i=0
until curl -s "$URL/v1/builds/$ba/logs" | grep -q tick-40; do
	i=$((i + 1)); [ $i -gt 300 ] && fail "the build printed no ticks"
	sleep 0.1
done

[ "$(rpc CancelBuild "{\"build_id\": \"$bq\"}")" = 200 ] && [ "$(out 'd["status"]')" = CANCELLED ] ||
	fail "cancel queued: $(cat "$T/out.json")"
[ "$(build_status "$bq")" = CANCELLED ] || fail "queued build now $(build_status "$bq")"
out 'd["error"]["message"]' | grep -q 'before it started' || fail "queued cancel message: $(out 'd["error"]')"
ok "CancelBuild of a queued build: CANCELLED at once, never started"

t0=$(date +%s)
[ "$(rpc CancelBuild "{\"build_id\": \"$ba\"}")" = 200 ] || fail "CancelBuild: $(cat "$T/out.json")"
[ "$(out 'd["status"]')" = CANCELLED ] || fail "CancelBuild answered $(out 'd["status"]')"
[ $(( $(date +%s) - t0 )) -lt 8 ] || fail "CancelBuild took too long"
no_pgrep "A$NONCE"
[ "$(build_status "$ba")" = CANCELLED ] || fail "GetBuild after cancel: $(cat "$T/out.json")"
[ "$(out 'd["error"]["step"]')" = 1 ] || fail "error.step: $(out 'd["error"]')"
out 'd["error"]["log_tail"]' | grep 'tick-' >/dev/null || fail "log_tail lacks the step's output"
[ ! -e "$C/layers/$(out 'd["steps"][1]["key"]')" ] || fail "the cancelled step's layer was committed"
[ "$(rpc CancelBuild "{\"build_id\": \"$ba\"}")" = 200 ] && [ "$(out 'd["status"]')" = CANCELLED ] ||
	fail "repeated CancelBuild: $(cat "$T/out.json")"
ok "CancelBuild of a running build: answers CANCELLED once stopped, tree killed, log_tail, no layer; repeatable"

wait "$follower" || fail "the log follower failed ($?)"
curl -s "$URL/v1/builds/$ba/logs" > "$T/full.txt"
cmp -s "$T/full.txt" "$T/follow.txt" || fail "the log read by offsets differs from the whole log"
[ "$(cat "$T/chunks")" -ge 3 ] || fail "the follower saw only $(cat "$T/chunks") chunks"
ok "log followed by offsets while building ($(cat "$T/chunks") chunks) equals the whole log"

[ "$(metric 'imagebuilder_builds_total{status="CANCELLED"}')" = 2 ] || fail "cancelled builds metric"
[ "$(metric 'imagebuilder_builds_total{status="TIMEOUT"}')" = 1 ] || fail "timeout builds metric"
serve_stop TERM
[ "$SERVE_RC" = 0 ] || fail "exit $SERVE_RC"
cache_sound "$C"
ok "metrics count them; SIGTERM exit 0; cache verifies"

# The service across stops: kill -9 mid-build, then a restart marks the
# build FAILED (interrupted), keeps its log, leaves no scratch, the cache
# verifies and the same spec builds again; SIGTERM stops accepting and
# lets the running build finish (exit 0), or with --cancel-on-shutdown
# cancels it; one daemon per cache dir.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/serve.sh"
C="$SHARED_CACHE"

# -- kill -9 in the middle of a step --
cat > "$T/spec.json" <<JSON
{"base": "debian_amd64", "steps": [{"run_commands": ["echo before-the-kill; sleep 120; echo K$NONCE > /k.txt"]}]}
JSON
serve_start --jobs 2
build_image "$T/spec.json"
b1=$BID
wait_pgrep "K$NONCE"
i=0
until grep -q before-the-kill "$C/logs/$b1.log" 2>/dev/null; do
	i=$((i + 1)); [ $i -gt 100 ] && fail "the step's output never reached the log"
	sleep 0.1
done
kill -9 "$SERVE_PID"
wait "$SERVE_PID" 2>/dev/null
SERVE_PID=""
no_pgrep "K$NONCE"
[ -n "$(ls "$C/tmp" | grep -v '\.lock$')" ] || fail "the killed build left no scratch (the test would prove nothing)"
ok "kill -9 mid-build: the step's processes die with the daemon, its scratch stays behind"

serve_start --jobs 2
[ "$(build_status "$b1")" = FAILED ] || fail "after restart: $(cat "$T/out.json")"
out 'd["error"]["message"]' | grep -q '^interrupted' || fail "error.message: $(out 'd["error"]')"
out 'd["error"]["log_tail"]' | grep before-the-kill >/dev/null || fail "log_tail lacks the output before the kill"
curl -s "$URL/v1/builds/$b1/logs" > "$T/log1.txt"
grep -q before-the-kill "$T/log1.txt" && grep -q 'interrupted' "$T/log1.txt" || fail "log after restart: $(cat "$T/log1.txt")"
grep -q '"recovered_builds":1' "$SERVE_LOG" || fail "the restart did not report one recovered build"
left=$(ls "$C/tmp" | grep -v '\.lock$' || true)
[ -z "$left" ] || fail "scratch left after restart: $left"
"$IB" cache verify --cache-dir "$C" >"$T/verify.log" 2>&1 || fail "cache verify: $(cat "$T/verify.log")"
ok "restart: FAILED (interrupted), log and log_tail kept; scratch removed; cache verify passes"

# the same step, but for its sleep (long above, so that a step outliving the daemon is caught)
sed 's/sleep 120/sleep 1/' "$T/spec.json" > "$T/spec2.json"
build_image "$T/spec2.json"
[ "$BID" != "$b1" ] || fail "the interrupted build was joined"
wait_build "$BID" READY 120
curl -s -o "$T/k.ext4" "$URL/v1/images/$IID/rootfs.ext4"
[ "$(img_cat "$T/k.ext4" /k.txt)" = "K$NONCE" ] || fail "the rebuilt image lacks /k.txt"
ok "the same step builds again to READY"

# -- SIGTERM: finish the running build, refuse new connections --
cat > "$T/term.json" <<JSON
{"base": "debian_amd64", "steps": [{"run_commands": ["sleep 4; echo T$NONCE > /t.txt"]}]}
JSON
build_image "$T/term.json"
bt=$BID
wait_pgrep "T$NONCE"
kill -TERM "$SERVE_PID"
sleep 0.5
kill -0 "$SERVE_PID" 2>/dev/null || fail "the daemon exited before its build finished"
if curl -s -m 2 -o /dev/null "$URL/healthz"; then fail "a new connection was accepted while draining"; fi
wait "$SERVE_PID"
rc=$?
SERVE_PID=""
[ "$rc" = 0 ] || fail "SIGTERM: exit $rc"
grep -q '"event":"draining"' "$SERVE_LOG" || fail "no draining event"
serve_start --jobs 2
[ "$(build_status "$bt")" = READY ] || fail "the build running at SIGTERM ended $(cat "$T/out.json")"
ok "SIGTERM: new connections refused, the running build finished READY, exit 0"

# -- SIGTERM with --cancel-on-shutdown --
serve_stop TERM
serve_start --jobs 1 --cancel-on-shutdown
sed "s/T$NONCE/X$NONCE/; s/sleep 4/sleep 600/" "$T/term.json" > "$T/cancel.json"
build_image "$T/cancel.json"
bx=$BID
sed "s/X$NONCE/Y$NONCE/" "$T/cancel.json" > "$T/queued.json"
build_image "$T/queued.json"
by=$BID
wait_pgrep "X$NONCE"
t0=$(date +%s)
serve_stop TERM
[ "$SERVE_RC" = 0 ] || fail "exit $SERVE_RC"
[ $(( $(date +%s) - t0 )) -lt 15 ] || fail "--cancel-on-shutdown took $(( $(date +%s) - t0 ))s"
no_pgrep "X$NONCE"

# -- one daemon per cache dir --
serve_start --jobs 1
"$IB" serve --cache-dir "$C" --listen 127.0.0.1:0 2>"$T/second.log"
[ $? = 1 ] && grep -q 'another' "$T/second.log" || fail "a second daemon on the same cache: $(cat "$T/second.log")"
[ "$(build_status "$bx")" = CANCELLED ] || fail "running build at shutdown: $(cat "$T/out.json")"
out 'd["error"]["message"]' | grep -q 'server shut down' || fail "message: $(out 'd["error"]')"
[ "$(build_status "$by")" = CANCELLED ] || fail "queued build at shutdown: $(cat "$T/out.json")"
ok "--cancel-on-shutdown: running and queued builds CANCELLED (server shut down), exit 0; a second daemon is refused"

serve_stop TERM
cache_sound "$C"
ok "cache verifies"

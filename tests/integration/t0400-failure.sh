# Failing, timed-out and interrupted builds: exit 1, the step's output shown,
# no layer committed for the failed step, the cache still verifies.
. "$(dirname "$0")/lib.sh"
C="$SHARED_CACHE"
nlayers() { ls "$C/layers" | wc -l; }

cat > "$T/fail.json" <<'JSON'
{"base": "debian_amd64", "steps": [
  {"run_commands": ["echo first-command-ran > /first.txt"]},
  {"run_commands": ["echo this-goes-to-stderr-4711 >&2; exit 3", "echo never > /never.txt"]}
]}
JSON
# Warm the base (shared) so the layer count below covers only this spec.
"$IB" build --cache-dir "$C" --json "$T/fail.json" >"$T/f.json" 2>"$T/f.log"
rc=$?
[ "$rc" = 1 ] || fail "failing build exited $rc, expected 1"
grep -q this-goes-to-stderr-4711 "$T/f.log" || fail "the command's stderr was not shown"
grep -q 'exited with status 3' "$T/f.log" || fail "no message naming the exit status: $(tail -3 "$T/f.log")"
[ "$(json_get "$T/f.json" 'd["status"]')" = failed ] || fail "status not failed"
[ "$(json_get "$T/f.json" 'd["error"]["step"]')" = 2 ] || fail "error.step should be 2"
json_get "$T/f.json" 'd["error"]["log_tail"]' | grep -q this-goes-to-stderr-4711 || fail "log_tail lacks the output"
failed_key=$(json_get "$T/f.json" 'd["layers"][2]["key"]')
[ ! -e "$C/layers/$failed_key" ] || fail "the failed step's layer was committed"
[ -e "$C/layers/$(json_get "$T/f.json" 'd["layers"][1]["key"]')" ] || fail "the step before the failure was not kept"
cache_sound "$C"
ok "failing command: exit 1, stderr shown, no layer for it, cache verifies"

before=$(nlayers)
cat > "$T/slow.json" <<'JSON'
{"base": "debian_amd64", "steps": [{"run_commands": ["sleep 1000 & sleep 1001; echo done"]}]}
JSON
start=$(date +%s)
"$IB" build --cache-dir "$C" --json --timeout 3 "$T/slow.json" >"$T/t.json" 2>"$T/t.log"
rc=$?
[ "$rc" = 1 ] || fail "timed-out build exited $rc"
[ "$(json_get "$T/t.json" 'd["status"]')" = timeout ] || fail "status $(json_get "$T/t.json" 'd["status"]'), expected timeout"
[ $(( $(date +%s) - start )) -lt 60 ] || fail "the timeout did not stop the build promptly"
sleep 0.5
if pgrep -f 'sleep 100[01]' >/dev/null; then fail "processes of the timed-out step survive"; fi
[ "$(nlayers)" = "$before" ] || fail "a layer was committed by a timed-out build"
cache_sound "$C"
ok "timeout: status timeout, the step's whole process tree killed, nothing cached"

"$IB" build --cache-dir "$C" "$T/slow.json" >/dev/null 2>"$T/c.log" &
pid=$!
i=0
until pgrep -f 'sleep 1001' >/dev/null; do
	i=$((i + 1)); [ $i -gt 600 ] && fail "the slow step never started"
	sleep 0.1
done
kill -TERM "$pid"
wait "$pid"
rc=$?
[ "$rc" = 1 ] || fail "interrupted build exited $rc"
grep -q cancel "$T/c.log" || fail "no cancel message: $(tail -2 "$T/c.log")"
sleep 0.5
if pgrep -f 'sleep 100[01]' >/dev/null; then fail "processes of the cancelled step survive"; fi
[ "$(nlayers)" = "$before" ] || fail "a layer was committed by a cancelled build"
cache_sound "$C"
ok "SIGTERM: cancelled, process tree killed, nothing cached, cache verifies"

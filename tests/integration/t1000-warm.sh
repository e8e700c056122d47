# warm from a local git repository: builds exactly the specs under --path at
# a tag (sharing their common layer), a second warm is all cached, --check
# passes then and fails at a ref where a spec changed (naming it and why),
# and the source repository is never changed.
. "$(dirname "$0")/lib.sh"
C="$SHARED_CACHE"
nonce=$(date +%s%N)
R="$T/src"

git init -q -b main "$R"
git -C "$R" config user.email t@example.invalid
git -C "$R" config user.name test
mkdir -p "$R/specs/more" "$R/other"
spec() { printf '{"base":"debian_amd64","steps":[{"run_commands":["echo shared-%s > /shared"]},{"run_commands":["echo %s > /which"]}]}\n' "$nonce" "$1"; }
spec a > "$R/specs/a.json"
spec b > "$R/specs/more/b.json"
spec c > "$R/other/c.json"
echo "not a spec" > "$R/specs/README"
git -C "$R" add -A && git -C "$R" commit -qm one && git -C "$R" tag v1
spec b-changed > "$R/specs/more/b.json"
git -C "$R" commit -qam two && git -C "$R" tag v2
git -C "$R" for-each-ref > "$T/refs.before"
v1=$(git -C "$R" rev-parse v1)

"$IB" warm --cache-dir "$C" --jobs 2 --git "$R" --ref v1 --path specs >"$T/w1.out" 2>"$T/w1.err" ||
	fail "warm failed: $(cat "$T/w1.out" "$T/w1.err")"
[ "$(wc -l < "$T/w1.out")" = 2 ] || fail "expected 2 lines: $(cat "$T/w1.out")"
grep -q '^specs/a.json  [0-9a-f]\{64\}  built in' "$T/w1.out" || fail "specs/a.json not built: $(cat "$T/w1.out")"
grep -q '^specs/more/b.json  [0-9a-f]\{64\}  built in' "$T/w1.out" || fail "specs/more/b.json not built"
if grep -q other/c.json "$T/w1.out"; then fail "warmed a spec outside --path"; fi
ok "warm --git at v1 --path specs built exactly specs/a.json and specs/more/b.json"

ida=$(awk '$1 == "specs/a.json" {print $2}' "$T/w1.out")
"$IB" inspect --cache-dir "$C" "$ida" > "$T/inspect.json"
[ "$(json_get "$T/inspect.json" 'd["warmed_from"][0]["commit"]')" = "$v1" ] || fail "inspect lacks the commit"
[ "$(json_get "$T/inspect.json" 'd["warmed_from"][0]["path"]')" = specs/a.json ] || fail "inspect lacks the path"
shared=$(json_get "$T/inspect.json" 'd["layers"][1]["key"]')
built=$(cat "$C"/logs/warm-*.log | grep -c "run_commands: done in .*(${shared%"${shared#????????????}"})")
[ "$built" = 1 ] || fail "the layer both specs share was built $built times"
ok "inspect shows the commit and path; the shared layer was built once"

"$IB" warm --cache-dir "$C" --git "file://$R" --ref v1 --path specs/ >"$T/w2.out" 2>"$T/w2.err" || fail "second warm failed"
[ "$(grep -c '  cached$' "$T/w2.out")" = 2 ] || fail "second warm not all cached: $(cat "$T/w2.out")"
"$IB" warm --cache-dir "$C" --check --git "$R" --ref v1 --path specs >"$T/c1.out" 2>&1 || fail "--check failed when all cached: $(cat "$T/c1.out")"
ok "a second warm (file:// URL) is all cached; --check passes"

"$IB" warm --cache-dir "$C" --check --git "$R" --ref v2 --path specs >"$T/c2.out" 2>&1 && fail "--check passed at v2"
grep -q '^specs/more/b.json  [0-9a-f]\{64\}  not cached: layer 2 (run_commands) misses' "$T/c2.out" ||
	fail "--check does not name the changed spec and step: $(cat "$T/c2.out")"
grep -q 'nearest cached ancestor is layer 1' "$T/c2.out" || fail "--check does not say why"
grep -q '^specs/a.json  .*  cached$' "$T/c2.out" || fail "--check: a.json should be cached"
n=$(ls "$C/layers" | wc -l)
[ "$n" = "$(ls "$C/layers" | wc -l)" ] || fail "--check built something"
ok "--check at v2 fails naming specs/more/b.json, its first missing step and the nearest cached ancestor"

git -C "$R" for-each-ref > "$T/refs.after"
cmp -s "$T/refs.before" "$T/refs.after" || fail "refs of the source repository changed"
[ -z "$(git -C "$R" status --porcelain)" ] || fail "the source work tree changed"
[ "$(git -C "$R" rev-parse HEAD)" = "$(git -C "$R" rev-parse v2)" ] || fail "HEAD moved"
ok "the source repository is untouched"

expect_status 1 "$IB" warm --cache-dir "$C" --git "$R" --ref no-such-ref 2>/dev/null
expect_status 2 "$IB" warm --cache-dir "$C" --ref v1 2>/dev/null
ok "an unknown ref fails; --ref without --git is bad usage"
cache_sound "$C"

# gc: frees space down to a budget, never removes a layer in use, leaves a
# cache that verifies (also when killed at any moment), and what it evicted
# is built again by the next warm.
. "$(dirname "$0")/lib.sh"
C="$SHARED_CACHE"
nonce=$(date +%s%N)

for i in 1 2; do
	printf '{"base":"debian_amd64","steps":[{"run_commands":["echo gc-%s-%s > /f"]}]}' "$nonce" "$i" > "$T/s$i.json"
done
"$IB" warm --cache-dir "$C" "$T/s1.json" "$T/s2.json" >/dev/null 2>&1 || fail "warm failed"

"$IB" gc --cache-dir "$C" --max-bytes 1 --dry-run > "$T/dry.out" || fail "gc --dry-run failed"
grep -q '^would evict image' "$T/dry.out" || fail "dry run lists nothing: $(cat "$T/dry.out")"
"$IB" warm --cache-dir "$C" --check "$T/s1.json" "$T/s2.json" >/dev/null 2>&1 || fail "--dry-run evicted something"
ok "gc --dry-run lists what it would evict and evicts nothing"

# An image's compact forms count with it and go with it.
id1=$("$IB" build --cache-dir "$C" "$T/s1.json" 2>/dev/null) || fail "build of s1 failed"
"$IB" export --cache-dir "$C" "$id1" --zstd "$T/s1.zst" && "$IB" export --cache-dir "$C" "$id1" --bmap "$T/s1.bmap" ||
	fail "export --zstd/--bmap failed"
ls "$C/images/$id1"*.zst "$C/images/$id1"*.bmap >/dev/null 2>&1 || fail "the compact forms are not kept with the image"

# A running build keeps its layers: start one and gc while it runs.
printf '{"base":"debian_amd64","steps":[{"run_commands":["sleep 600 # %s"]}]}' "$nonce" > "$T/slow.json"
"$IB" build --cache-dir "$C" "$T/slow.json" >/dev/null 2>&1 &
slow=$!
CLEANUP="$CLEANUP $slow"
i=0
until pgrep -f "sleep 600 # $nonce" >/dev/null; do
	i=$((i + 1)); [ $i -gt 600 ] && fail "the slow build never started"
	sleep 0.1
done
before=$(du -sc -B1 "$C/layers" "$C/images" | tail -1 | cut -f1)
"$IB" gc --cache-dir "$C" --max-bytes 1 > "$T/gc.out" 2>&1 || fail "gc failed: $(cat "$T/gc.out")"
grep -q '^freed [1-9]' "$T/gc.out" || fail "gc freed nothing: $(cat "$T/gc.out")"
after=$(du -sc -B1 "$C/layers" "$C/images" | tail -1 | cut -f1)
[ "$after" -lt "$before" ] || fail "no space freed ($before -> $after)"
[ -z "$("$IB" ls --cache-dir "$C")" ] || fail "images left after gc to 1 byte"
[ -z "$(ls "$C/images")" ] || fail "files left in images/ after gc to 1 byte: $(ls "$C/images")"
base=$(ls "$C/layers" | head -1)
[ "$(ls "$C/layers" | wc -l)" = 1 ] || fail "expected only the in-use base layer left: $(ls "$C/layers")"
grep -q "layers in use were kept" "$T/gc.out" || fail "gc did not say it kept layers in use"
cache_sound "$C"
kill "$slow"; wait "$slow" 2>/dev/null
ok "gc to 1 byte: freed $((before - after)) bytes, kept the base layer a running build uses, cache verifies"

"$IB" warm --cache-dir "$C" "$T/s1.json" > "$T/w.out" 2>&1 || fail "warm after gc failed"
grep -q 'built in' "$T/w.out" || fail "warm after gc did not rebuild: $(cat "$T/w.out")"
ok "warming again rebuilds what was evicted (base kept)"

# kill -9 at some moment of a gc: the cache still verifies.
for round in 1 2 3; do
	printf '{"base":"debian_amd64","steps":[{"run_commands":["echo %s-%s"]}]}' "$nonce" "$round" > "$T/k.json"
	"$IB" build --cache-dir "$C" "$T/k.json" >/dev/null 2>&1 || fail "build for the kill test failed"
	"$IB" gc --cache-dir "$C" --keep-days 0 >/dev/null 2>&1 &
	gc=$!
	sleep "0.0$round"
	kill -9 "$gc" 2>/dev/null; wait "$gc" 2>/dev/null
	cache_sound "$C"
done
ok "kill -9 during gc leaves a cache that verifies (3 rounds)"

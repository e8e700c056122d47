# Single flight in the service: 20 concurrent BuildImage calls for one new
# spec get one build id and run one build; two different specs that share
# a missing layer build that layer once (both images hold the very same
# random bytes written by it).
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/serve.sh"
C="$SHARED_CACHE"

serve_start --jobs 2

cat > "$T/spec.json" <<JSON
{"base": "debian_amd64", "steps": [{"run_commands": ["sleep 2", "echo flight-$NONCE > /flight.txt"]}]}
JSON
i=0 pids=""
while [ $i -lt 20 ]; do
	curl -s -o "$T/c$i.json" -X POST -H 'Content-Type: application/json' \
		--data-binary "{\"spec\": $(cat "$T/spec.json")}" "$URL/imagebuilder.v1.ImageBuilder/BuildImage" &
	pids="$pids $!"
	i=$((i + 1))
done
for p in $pids; do wait "$p" || fail "a BuildImage call failed"; done
ids=$(for f in "$T"/c*.json; do json_get "$f" 'd["build_id"]'; done | sort -u)
[ "$(echo "$ids" | wc -l)" = 1 ] || fail "20 calls got $(echo "$ids" | wc -l) build ids: $ids"
for f in "$T"/c*.json; do
	case "$(json_get "$f" 'd["status"]')" in QUEUED|BUILDING) ;; *) fail "a call answered $(cat "$f")" ;; esac
done
wait_build "$ids" READY 300
[ "$(metric 'imagebuilder_builds_total{status="READY"}')" = 1 ] || fail "builds: $(metric 'imagebuilder_builds_total{status="READY"}')"
[ "$(metric 'imagebuilder_layer_cache_misses_total{kind="run_commands"}')" = 1 ] || fail "the step ran more than once"
[ "$(metric 'imagebuilder_image_cache_misses_total')" = 20 ] || fail "misses: $(metric 'imagebuilder_image_cache_misses_total')"
[ "$(grep -c '"event":"build".*"status":"QUEUED"' "$SERVE_LOG")" = 1 ] || fail "more than one build was queued"
[ "$(grep -c 'run_commands {' "$C/logs/$ids.log")" = 1 ] || fail "the build log shows the step more than once"
ok "20 concurrent identical BuildImage calls: one build id, one build, READY"

# Two specs, one shared missing first step that writes random bytes.
shared='{"run_commands": ["head -c 16 /dev/urandom | od -An -tx1 > /shared.txt", "sleep 2"]}'
printf '{"base": "debian_amd64", "steps": [%s, {"run_commands": ["echo a-%s > /a.txt"]}]}' "$shared" "$NONCE" > "$T/a.json"
printf '{"base": "debian_amd64", "steps": [%s, {"run_commands": ["echo b-%s > /b.txt"]}]}' "$shared" "$NONCE" > "$T/b.json"
sed -i "s/sleep 2/sleep 2; true $NONCE/" "$T/a.json" "$T/b.json"
build_image "$T/a.json"; ba=$BID; ia=$IID
build_image "$T/b.json"; bb=$BID; ib=$IID
[ "$ba" != "$bb" ] || fail "two specs joined one build"
wait_build "$ba" READY 300
wait_build "$bb" READY 300
rpc GetBuild "{\"build_id\": \"$ba\"}" >/dev/null; ka=$(out 'd["steps"][1]["key"]'); ca=$(out 'd["steps"][1]["cached"]')
rpc GetBuild "{\"build_id\": \"$bb\"}" >/dev/null; kb=$(out 'd["steps"][1]["key"]'); cb=$(out 'd["steps"][1]["cached"]')
[ "$ka" = "$kb" ] || fail "the shared step has two keys"
[ "$ca$cb" = "FalseTrue" ] || [ "$ca$cb" = "TrueFalse" ] || fail "shared step cached flags: $ca $cb (one builds, one waits)"
[ "$(metric 'imagebuilder_layer_cache_misses_total{kind="run_commands"}')" = 4 ] ||
	fail "run_commands layers built: $(metric 'imagebuilder_layer_cache_misses_total{kind="run_commands"}'), expected 1+3"
curl -s -o "$T/a.ext4" "$URL/v1/images/$ia/rootfs.ext4"
curl -s -o "$T/b.ext4" "$URL/v1/images/$ib/rootfs.ext4"
sa=$(img_cat "$T/a.ext4" /shared.txt); sb=$(img_cat "$T/b.ext4" /shared.txt)
[ -n "$sa" ] && [ "$sa" = "$sb" ] || fail "/shared.txt differs: '$sa' vs '$sb' (the layer was built twice)"
[ "$(img_cat "$T/a.ext4" /a.txt)" = "a-$NONCE" ] && [ "$(img_cat "$T/b.ext4" /b.txt)" = "b-$NONCE" ] ||
	fail "the specs' own steps are missing"
ok "two specs sharing a missing layer: built once (same random bytes in both images), one waited"

# The same between the daemon and a CLI build on the same cache dir.
sed "s/true $NONCE/true cli-$NONCE/" "$T/a.json" > "$T/a2.json"
sed "s/true $NONCE/true cli-$NONCE/; s/echo b-/echo c-/" "$T/b.json" > "$T/c.json"
build_image "$T/a2.json"; b2=$BID; i2=$IID
"$IB" build --cache-dir "$C" -o "$T/c.ext4" "$T/c.json" >/dev/null 2>"$T/cli.log" || fail "CLI build: $(tail -3 "$T/cli.log")"
wait_build "$b2" READY 300
curl -s -o "$T/a2.ext4" "$URL/v1/images/$i2/rootfs.ext4"
sa=$(img_cat "$T/a2.ext4" /shared.txt); sc=$(img_cat "$T/c.ext4" /shared.txt)
[ -n "$sa" ] && [ "$sa" = "$sc" ] || fail "daemon and CLI built the shared layer twice: '$sa' vs '$sc'"
ok "a daemon build and a CLI build sharing a missing layer: built once"

serve_stop TERM
[ "$SERVE_RC" = 0 ] || fail "exit $SERVE_RC"
cache_sound "$C"
ok "cache verifies"

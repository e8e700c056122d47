# Builder nodes sharing layers through a real OCI registry (Debian's
# docker-registry on loopback, storage in the test's dir):
#   - node A builds and pushes every layer (one artifact manifest a key,
#     listed and inspected by skopeo);
#   - node B, with a fresh cache, builds the same spec: every layer comes
#     from the remote, no step runs, and the ext4 bytes are node A's;
#   - node C builds the spec with one more step: the prefix is pulled, the
#     last step built;
#   - a blob with one byte changed in the registry's storage is refused,
#     with a warning naming the layer; the layer is built here and the
#     cache verifies;
#   - with the registry stopped, a build succeeds with a warning;
#   - kill -9 during a pull leaves a cache that verifies.
. "$(dirname "$0")/lib.sh"
C="$SHARED_CACHE"
command -v docker-registry >/dev/null || fail "docker-registry is not installed (scripts/install-deps.sh installs it)"
command -v skopeo >/dev/null || fail "skopeo is not installed (scripts/install-deps.sh installs it)"
nonce=$(date +%s%N)

port=$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat > "$T/registry.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $T/registry
http:
  addr: 127.0.0.1:$port
EOF
reg_start() {
	docker-registry serve "$T/registry.yml" >>"$T/registry.log" 2>&1 &
	REG_PID=$!
	CLEANUP="$CLEANUP $REG_PID"
	i=0
	until curl -sf "http://127.0.0.1:$port/v2/" >/dev/null; do
		i=$((i + 1)); [ $i -gt 100 ] && fail "the registry did not start: $(tail -3 "$T/registry.log")"
		sleep 0.1
	done
}
reg_start
REMOTE="http://127.0.0.1:$port/imagebuilder/layers"

spec() { # NAME EXTRA-STEP-JSON: a spec file
	printf '{"base": "debian_amd64", "disk_size": "256M", "steps": [{"run_commands": ["echo shared %s > /shared.txt"]}, {"env": {"SHARED": "1"}}%s]}\n' \
		"$nonce" "$2" > "$T/$1.json"
}
node() { # CACHE SPEC OUT [ARGS]: a build with --remote; --json to $T/out.json, the log to $T/log
	cache=$1 s=$2 o=$3; shift 3
	"$IB" build --cache-dir "$cache" --remote "$REMOTE" --json -o "$o" "$@" "$s" > "$T/out.json" 2>"$T/log"
}
sources() { json_get "$T/out.json" '",".join(l["source"] for l in d["layers"])'; }

# -- node A builds and pushes --
spec one ""
node "$C" "$T/one.json" "$T/a.ext4" || fail "node A: $(tail -5 "$T/log")"
[ "$(grep -c 'pushed to the remote (' "$T/log")" = 3 ] || fail "node A pushed: $(grep -i 'push\|warn' "$T/log")"
skopeo list-tags --tls-verify=false "docker://127.0.0.1:$port/imagebuilder/layers" > "$T/tags.json" ||
	fail "skopeo list-tags"
for key in $(json_get "$T/out.json" '" ".join(l["key"] for l in d["layers"])'); do
	grep -q "\"layer-$key\"" "$T/tags.json" || fail "no tag layer-$key: $(cat "$T/tags.json")"
done
last=$(json_get "$T/out.json" 'd["layers"][-1]["key"]')
skopeo inspect --raw --tls-verify=false "docker://127.0.0.1:$port/imagebuilder/layers:layer-$last" > "$T/m.json" ||
	fail "skopeo inspect"
[ "$(json_get "$T/m.json" 'd["artifactType"]')" = application/vnd.imagebuilder.layer.v1 ] &&
	[ "$(json_get "$T/m.json" 'd["annotations"]["dev.imagebuilder.layer.key"]')" = "$last" ] ||
	fail "the layer's manifest: $(cat "$T/m.json")"
ok "node A built and pushed 3 layers; skopeo lists layer-<key> tags and inspects an artifact manifest"

# -- the image, for workers: imagebuilder pull, and stock tools --
iid=$(json_get "$T/out.json" 'd["image_id"]')
grep -q "\"image-$iid\"" "$T/tags.json" || fail "no tag image-$iid: $(cat "$T/tags.json")"
skopeo inspect --raw --tls-verify=false "docker://127.0.0.1:$port/imagebuilder/layers:image-$iid" > "$T/im.json" ||
	fail "skopeo inspect the image"
[ "$(json_get "$T/im.json" 'd["annotations"]["dev.imagebuilder.image.ext4_sha256"]')" = "$(sha256sum "$T/a.ext4" | cut -d' ' -f1)" ] ||
	fail "the image manifest's ext4_sha256: $(cat "$T/im.json")"
"$IB" pull --remote "$REMOTE" "$iid" -o "$T/pulled.ext4" > /dev/null 2>"$T/pull.log" || fail "pull: $(cat "$T/pull.log")"
cmp -s "$T/a.ext4" "$T/pulled.ext4" || fail "the pulled image differs from node A's"
expect_status 1 "$IB" pull --remote "$REMOTE" "$(printf '%064d' 0)" -o "$T/none.ext4" 2>"$T/pull.log"
grep -q "has no image" "$T/pull.log" || fail "pull of an unknown image: $(cat "$T/pull.log")"
ok "image-<id> pushed (skopeo inspects its ext4_sha256); imagebuilder pull gives node A's bytes; an unknown id fails"

# -- node B: a fresh cache, the same spec: nothing runs, the same bytes --
node "$T/cacheB" "$T/one.json" "$T/b.ext4" || fail "node B: $(tail -5 "$T/log")"
[ "$(sources)" = remote,remote,remote ] || fail "node B's layers came from $(sources)"
! grep -q ': done in' "$T/log" || fail "node B ran a step: $(grep ': done in' "$T/log")"
cmp -s "$T/a.ext4" "$T/b.ext4" || fail "node B's ext4 differs from node A's"
"$IB" cache verify --cache-dir "$T/cacheB" > "$T/v.log" 2>&1 || fail "node B's cache: $(cat "$T/v.log")"
ok "node B (fresh cache): every layer from the remote, no step run, the same ext4 bytes, cache verifies"

# -- node C: one more step: the prefix pulled, one step built --
spec two ', {"run_commands": ["echo more > /more.txt"]}'
node "$T/cacheC" "$T/two.json" "$T/c.ext4" || fail "node C: $(tail -5 "$T/log")"
[ "$(sources)" = remote,remote,remote,built ] || fail "node C's layers came from $(sources)"
ok "node C: the prefix pulled, the new step built"

# -- a corrupt blob in the registry's storage: refused, built here --
key=$(json_get "$T/out.json" 'd["layers"][1]["key"]')
skopeo inspect --raw --tls-verify=false "docker://127.0.0.1:$port/imagebuilder/layers:layer-$key" > "$T/m1.json"
blob=$(json_get "$T/m1.json" 'd["layers"][0]["digest"]' | sed 's/^sha256://')
data="$T/registry/docker/registry/v2/blobs/sha256/$(echo "$blob" | cut -c1-2)/$blob/data"
[ -f "$data" ] || fail "no blob file $data"
$PY -c 'import sys
p = sys.argv[1]
b = bytearray(open(p, "rb").read())
b[len(b) // 2] ^= 0xff
open(p, "wb").write(bytes(b))' "$data"
node "$T/cacheD" "$T/one.json" "$T/d.ext4" || fail "node D: $(tail -5 "$T/log")"
grep -q "warning: layer $(echo "$key" | cut -c1-12) from .*corrupt" "$T/log" ||
	fail "no warning naming the corrupt layer: $(grep warning "$T/log")"
[ "$(sources)" = remote,built,remote ] || fail "node D's layers came from $(sources)"
cmp -s "$T/a.ext4" "$T/d.ext4" || fail "node D's ext4 differs"
"$IB" cache verify --cache-dir "$T/cacheD" > "$T/v.log" 2>&1 || fail "node D's cache: $(cat "$T/v.log")"
ok "a blob with one byte changed: refused with a warning naming the layer, built here; the cache verifies"

# -- kill -9 during a pull: the cache verifies, and the next build is whole --
"$IB" build --cache-dir "$T/cacheE" --remote "$REMOTE" -o "$T/e.ext4" "$T/one.json" 2>"$T/e.log" &
pid=$!
sleep 1.5
kill -9 "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
"$IB" cache verify --cache-dir "$T/cacheE" > "$T/v.log" 2>&1 || fail "after kill -9 during a pull: $(cat "$T/v.log")"
node "$T/cacheE" "$T/one.json" "$T/e.ext4" || fail "the build after kill -9: $(tail -5 "$T/log")"
cmp -s "$T/a.ext4" "$T/e.ext4" || fail "the build after kill -9 gave other bytes"
ok "kill -9 during a pull: the cache verifies; the next build gives node A's bytes"

# -- a node whose image is cached pushes what the remote lacks (a remote that lost everything) --
kill "$REG_PID"
wait "$REG_PID" 2>/dev/null
rm -rf "$T/registry"
reg_start
node "$T/cacheB" "$T/one.json" "$T/b2.ext4" || fail "node B again: $(tail -5 "$T/log")"
[ "$(grep -c 'pushed to the remote' "$T/log")" = 4 ] || fail "a cached image pushed: $(grep -i 'push\|warn' "$T/log")"
ok "a node with the image cached pushes its 3 layers and the image to a remote that lacks them"

# -- the registry down: a warning, the build goes on --
kill "$REG_PID"
wait "$REG_PID" 2>/dev/null
spec three ', {"run_commands": ["echo offline > /offline.txt"]}'
node "$C" "$T/three.json" "$T/f.ext4" || fail "with the registry down: $(tail -5 "$T/log")"
grep -q '^warning: .*127.0.0.1' "$T/log" || fail "no warning with the registry down: $(tail -5 "$T/log")"
ok "the registry stopped: the build succeeds, with a warning"

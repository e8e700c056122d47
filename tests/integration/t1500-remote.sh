# Builder nodes sharing layers through a real OCI registry (Debian's
# docker-registry on loopback, storage in the test's dir):
#   - node A builds and pushes every layer (one artifact manifest a key,
#     listed and inspected by skopeo); blobs over the chunk size go up in
#     chunks (PATCH with Content-Range);
#   - node B, with a fresh cache, builds the same spec: every layer comes
#     from the remote, no step runs, and the ext4 bytes are node A's;
#   - node C builds the spec with one more step: the prefix is pulled, the
#     last step built;
#   - two fresh nodes building one spec at once both succeed, and a third
#     pulls all of it back, byte for byte;
#   - a blob with one byte changed in the registry's storage is refused,
#     with a warning naming the layer; the layer is built here and the
#     cache verifies;
#   - kill -9 during a pull leaves a cache that verifies;
#   - warm --push leaves the remote with everything a spec needs, or fails;
#   - registries that want credentials: HTTP basic (htpasswd) and the
#     bearer-token flow (a token service on loopback signs JWTs that the
#     registry checks); wrong credentials are a warning, never a failure;
#   - with the registry stopped, a build succeeds with a warning.
. "$(dirname "$0")/lib.sh"
C="$SHARED_CACHE"
command -v docker-registry >/dev/null || fail "docker-registry is not installed (scripts/install-deps.sh installs it)"
command -v skopeo >/dev/null || fail "skopeo is not installed (scripts/install-deps.sh installs it)"
nonce=$(date +%s%N)

free_port() { $PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# reg_config NAME PORT [AUTH-YAML]: a registry's config, its storage in $T/NAME
reg_config() {
	printf 'version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:%s\n%s\n' \
		"$T/$1" "$2" "${3:-}" > "$T/$1.yml"
}
# reg_start NAME PORT: start it (REG_PID) and wait until it answers
reg_start() {
	docker-registry serve "$T/$1.yml" >>"$T/$1.log" 2>&1 &
	REG_PID=$!
	CLEANUP="$CLEANUP $REG_PID"
	i=0
	until [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$2/v2/")" != 000 ]; do
		i=$((i + 1)); [ $i -gt 100 ] && fail "registry $1 did not start: $(tail -3 "$T/$1.log")"
		sleep 0.1
	done
}
reg_stop() { kill "$REG_PID"; wait "$REG_PID" 2>/dev/null; }
port=$(free_port)
reg_config registry "$port"
reg_start registry "$port"
REMOTE="http://127.0.0.1:$port/imagebuilder/layers"
tags() { skopeo list-tags --tls-verify=false "docker://127.0.0.1:$port/imagebuilder/layers"; }

spec() { # NAME EXTRA-STEP-JSON: a spec file
	printf '{"base": "debian_amd64", "disk_size": "256M", "steps": [{"run_commands": ["echo shared %s > /shared.txt"]}, {"env": {"SHARED": "1"}}%s]}\n' \
		"$nonce" "$2" > "$T/$1.json"
}
node() { # CACHE SPEC OUT [ARGS]: a build with --remote; --json to $T/out.json, the log to $T/log
	cache=$1 s=$2 o=$3; shift 3
	"$IB" build --cache-dir "$cache" --remote "$REMOTE" --json -o "$o" "$@" "$s" > "$T/out.json" 2>"$T/log"
}
sources() { json_get "$T/out.json" '",".join(l["source"] for l in d["layers"])'; }

# -- node A builds and pushes; blobs over 1 MiB go up in chunks --
spec one ""
IMAGEBUILDER_REMOTE_CHUNK_SIZE=1M node "$C" "$T/one.json" "$T/a.ext4" || fail "node A: $(tail -5 "$T/log")"
[ "$(grep -c 'pushed to the remote (' "$T/log")" = 3 ] || fail "node A pushed: $(grep -i 'push\|warn' "$T/log")"
tags > "$T/tags.json" || fail "skopeo list-tags"
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
base=$(json_get "$T/out.json" 'd["layers"][0]["key"]')
skopeo inspect --raw --tls-verify=false "docker://127.0.0.1:$port/imagebuilder/layers:layer-$base" > "$T/m0.json" ||
	fail "skopeo inspect the base"
base_size=$(json_get "$T/m0.json" 'd["layers"][0]["size"]')
patches=$(grep -c 'http.request.method=PATCH.*http.response.status=202' "$T/registry.log")
[ "$base_size" -gt $((4 << 20)) ] && [ "$patches" -ge $((base_size >> 20)) ] ||
	fail "the base's blob ($base_size bytes) went up in $patches chunks"
ok "the base's blob ($base_size bytes) went up in chunks of 1 MiB ($patches PATCHes with Content-Range)"

# -- the image, for workers: imagebuilder pull, and stock tools --
iid=$(json_get "$T/out.json" 'd["image_id"]')
grep -q "\"image-$iid\"" "$T/tags.json" || fail "no tag image-$iid: $(cat "$T/tags.json")"
skopeo inspect --raw --tls-verify=false "docker://127.0.0.1:$port/imagebuilder/layers:image-$iid" > "$T/im.json" ||
	fail "skopeo inspect the image"
[ "$(json_get "$T/im.json" 'd["annotations"]["dev.imagebuilder.image.ext4_sha256"]')" = "$(sha256sum "$T/a.ext4" | cut -d' ' -f1)" ] ||
	fail "the image manifest's ext4_sha256: $(cat "$T/im.json")"
"$IB" pull --remote "$REMOTE" "$iid" -o "$T/pulled.ext4" > /dev/null 2>"$T/pull.log" || fail "pull: $(cat "$T/pull.log")"
cmp -s "$T/a.ext4" "$T/pulled.ext4" || fail "the pulled image differs from node A's"
"$IB" pull --remote "$REMOTE" "$iid" -o "$T/pulled.ext4.zst" > /dev/null 2>"$T/pull.log" || fail "pull .zst: $(cat "$T/pull.log")"
zstd -q -d "$T/pulled.ext4.zst" -o "$T/unzstd.ext4" && cmp -s "$T/a.ext4" "$T/unzstd.ext4" ||
	fail "pull -o X.zst is not node A's image compressed"
expect_status 1 "$IB" pull --remote "$REMOTE" "$(printf '%064d' 0)" -o "$T/none.ext4" 2>"$T/pull.log"
grep -q "has no image" "$T/pull.log" || fail "pull of an unknown image: $(cat "$T/pull.log")"
ok "image-<id> pushed (skopeo inspects its ext4_sha256); imagebuilder pull gives node A's bytes (ext4 or .zst); an unknown id fails"

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

# -- two fresh nodes build one spec at the same time: both succeed, the remote stays whole --
spec four ', {"run_commands": ["echo both > /both.txt"]}'
"$IB" build --cache-dir "$T/cacheF" --remote "$REMOTE" -o "$T/f1.ext4" "$T/four.json" >/dev/null 2>"$T/f1.log" &
f1=$!
"$IB" build --cache-dir "$T/cacheG" --remote "$REMOTE" -o "$T/f2.ext4" "$T/four.json" >/dev/null 2>"$T/f2.log" &
f2=$!
wait "$f1" || fail "the first of two nodes at once: $(tail -5 "$T/f1.log")"
wait "$f2" || fail "the second of two nodes at once: $(tail -5 "$T/f2.log")"
! grep -q warning "$T/f1.log" "$T/f2.log" || fail "two nodes at once: $(grep warning "$T/f1.log" "$T/f2.log")"
cmp -s "$T/f1.ext4" "$T/f2.ext4" || fail "two nodes at once made different images"
node "$T/cacheH" "$T/four.json" "$T/f3.ext4" || fail "node H: $(tail -5 "$T/log")"
[ "$(sources)" = remote,remote,remote,remote ] || fail "node H's layers came from $(sources)"
cmp -s "$T/f1.ext4" "$T/f3.ext4" || fail "node H's image differs from those of the two nodes at once"
ok "two fresh nodes building one spec at once both succeed with one image; a third pulls it all back, byte for byte"

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
zblob=$(json_get "$T/im.json" '[l for l in d["layers"] if l["mediaType"].endswith("ext4+zstd")][0]["digest"]' | sed 's/^sha256://')
zdata="$T/registry/docker/registry/v2/blobs/sha256/$(echo "$zblob" | cut -c1-2)/$zblob/data"
cp "$zdata" "$T/zdata.good"
$PY -c 'import sys
p = sys.argv[1]
b = bytearray(open(p, "rb").read())
b[len(b) // 3] ^= 0x01
open(p, "wb").write(bytes(b))' "$zdata"
expect_status 1 "$IB" pull --remote "$REMOTE" "$iid" -o "$T/bad.ext4" 2>"$T/pull.log"
grep -q corrupt "$T/pull.log" && [ ! -e "$T/bad.ext4" ] && [ -z "$(ls "$T" | grep '\.part$')" ] ||
	fail "a corrupt image blob: $(cat "$T/pull.log"); $(ls "$T")"
cp "$T/zdata.good" "$zdata"
node "$T/cacheD" "$T/one.json" "$T/d.ext4" || fail "node D: $(tail -5 "$T/log")"
grep -q "warning: layer $(echo "$key" | cut -c1-12) from .*corrupt" "$T/log" ||
	fail "no warning naming the corrupt layer: $(grep warning "$T/log")"
[ "$(sources)" = remote,built,remote ] || fail "node D's layers came from $(sources)"
cmp -s "$T/a.ext4" "$T/d.ext4" || fail "node D's ext4 differs"
"$IB" cache verify --cache-dir "$T/cacheD" > "$T/v.log" 2>&1 || fail "node D's cache: $(cat "$T/v.log")"
ok "a blob with one byte changed: refused with a warning naming the layer, built here; the cache verifies; a corrupt image blob fails pull and leaves no file"

# -- kill -9 during a pull: the cache verifies, and the next build is whole --
"$IB" build --cache-dir "$T/cacheE" --remote "$REMOTE" -o "$T/e.ext4" "$T/one.json" >/dev/null 2>"$T/e.log" &
pid=$!
sleep 1.5
kill -9 "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
"$IB" cache verify --cache-dir "$T/cacheE" > "$T/v.log" 2>&1 || fail "after kill -9 during a pull: $(cat "$T/v.log")"
node "$T/cacheE" "$T/one.json" "$T/e.ext4" || fail "the build after kill -9: $(tail -5 "$T/log")"
cmp -s "$T/a.ext4" "$T/e.ext4" || fail "the build after kill -9 gave other bytes"
ok "kill -9 during a pull: the cache verifies; the next build gives node A's bytes"

# -- a node whose image is cached pushes what the remote lacks (a remote that lost everything) --
reg_stop
rm -rf "$T/registry"
reg_start registry "$port"
node "$T/cacheB" "$T/one.json" "$T/b2.ext4" || fail "node B again: $(tail -5 "$T/log")"
[ "$(grep -c 'pushed to the remote' "$T/log")" = 4 ] || fail "a cached image pushed: $(grep -i 'push\|warn' "$T/log")"
ok "a node with the image cached pushes its 3 layers and the image to a remote that lacks them"

# -- warm --push: everything the spec needs, even a layer gc took here --
expect_status 2 "$IB" warm --push --cache-dir "$T/cacheB" "$T/one.json" 2>/dev/null
reg_stop
rm -rf "$T/registry"
reg_start registry "$port"
$PY -c 'import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
db.execute("DELETE FROM layers WHERE key = ?", (sys.argv[2],))
db.commit()' "$T/cacheB/index.db" "$key" || fail "cannot drop layer $key from node B's index"
"$IB" warm --push --cache-dir "$T/cacheB" --remote "$REMOTE" "$T/one.json" > "$T/warm.out" 2>"$T/warm.log" ||
	fail "warm --push: $(cat "$T/warm.out" "$T/warm.log")"
cat "$T"/cacheB/logs/warm-*.log > "$T/warm.log"
grep -q 'neither cached nor in the remote' "$T/warm.log" || fail "warm --push did not see the missing layer: $(cat "$T/warm.log")"
tags > "$T/tags.json" || fail "skopeo list-tags after warm --push"
for tag in $(json_get "$T/out.json" '" ".join("layer-" + l["key"] for l in d["layers"])') "image-$iid"; do
	grep -q "\"$tag\"" "$T/tags.json" || fail "warm --push left no $tag: $(cat "$T/tags.json")"
done
node "$T/cacheI" "$T/one.json" "$T/i.ext4" || fail "node I after warm --push: $(tail -5 "$T/log")"
[ "$(sources)" = remote,remote,remote ] && cmp -s "$T/a.ext4" "$T/i.ext4" ||
	fail "node I after warm --push: $(sources)"
ok "warm --push fills an empty remote with every layer (one gc took here made again) and the image"
reg_stop # the shared registry is down from here on

# -- registries that want credentials --
auth_file() { # HOST:PORT USER PASSWORD
	printf '{"auths": {"%s": {"auth": "%s"}}}\n' "$1" "$(printf '%s:%s' "$2" "$3" | base64 -w0)" > "$T/auth.json"
}
hport=$(free_port)
$PY -c 'import crypt, sys; print("builder:" + crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH)))' \
	"secret-$nonce" 2>/dev/null > "$T/htpasswd" || fail "cannot make the htpasswd file"
reg_config basic "$hport" "auth:
  htpasswd:
    realm: ib-test
    path: $T/htpasswd"
reg_start basic "$hport"
auth_file "127.0.0.1:$hport" builder "secret-$nonce"
REGISTRY_AUTH_FILE="$T/auth.json" "$IB" build --cache-dir "$T/cacheB" --remote "http://127.0.0.1:$hport/ib/basic" \
	-o "$T/h.ext4" "$T/one.json" >/dev/null 2>"$T/log" || fail "basic auth: $(tail -5 "$T/log")"
[ "$(grep -c 'pushed to the remote' "$T/log")" = 4 ] && ! grep -q warning "$T/log" ||
	fail "basic auth pushes: $(grep -i 'push\|warn' "$T/log")"
REGISTRY_AUTH_FILE="$T/auth.json" "$IB" pull --remote "http://127.0.0.1:$hport/ib/basic" "$iid" -o "$T/hp.ext4" >/dev/null \
	2>"$T/pull.log" && cmp -s "$T/a.ext4" "$T/hp.ext4" || fail "pull with basic auth: $(cat "$T/pull.log")"
auth_file "127.0.0.1:$hport" builder wrong
REGISTRY_AUTH_FILE="$T/auth.json" "$IB" build --cache-dir "$T/cacheB" --remote "http://127.0.0.1:$hport/ib/basic" \
	-o "$T/h2.ext4" "$T/one.json" >/dev/null 2>"$T/log" || fail "basic auth, wrong password: $(tail -5 "$T/log")"
grep -q '^warning: .*authentication failed' "$T/log" || fail "basic auth, wrong password: $(tail -5 "$T/log")"
reg_stop
ok "HTTP basic (htpasswd): pushed and pulled with the credentials file; a wrong password is a warning"

openssl req -x509 -newkey rsa:2048 -nodes -keyout "$T/token.key" -out "$T/token.crt" -days 1 \
	-subj /CN=ib-test-token 2>/dev/null || fail "cannot make the token key"
$PY "$TOP/tests/fixtures/registry/token-server.py" "$T/token.key" "$T/token.crt" "$T/token.port" builder \
	"secret-$nonce" ib-test ib-test-issuer "$T/token.log" 2>"$T/token.err" &
CLEANUP="$CLEANUP $!"
wait_file "$T/token.port" "the token service" "$T/token.err"
tport=$(free_port)
reg_config bearer "$tport" "auth:
  token:
    realm: http://127.0.0.1:$(cat "$T/token.port")/token
    service: ib-test
    issuer: ib-test-issuer
    rootcertbundle: $T/token.crt"
reg_start bearer "$tport"
[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$tport/v2/ib/bearer/tags/list")" = 401 ] ||
	fail "the bearer registry lets anyone in"
auth_file "127.0.0.1:$tport" builder "secret-$nonce"
REGISTRY_AUTH_FILE="$T/auth.json" "$IB" build --cache-dir "$T/cacheB" --remote "http://127.0.0.1:$tport/ib/bearer" \
	-o "$T/t.ext4" "$T/one.json" >/dev/null 2>"$T/log" || fail "bearer auth: $(tail -5 "$T/log")"
[ "$(grep -c 'pushed to the remote' "$T/log")" = 4 ] && ! grep -q warning "$T/log" ||
	fail "bearer pushes: $(grep -i 'push\|warn' "$T/log")"
# (the registry names the actions in either order)
grep -Eq '^granted repository:ib/bearer:(pull,push|push,pull)$' "$T/token.log" ||
	fail "no push token was asked for: $(cat "$T/token.log")"
REMOTE="http://127.0.0.1:$tport/ib/bearer"
REGISTRY_AUTH_FILE="$T/auth.json" node "$T/cacheK" "$T/one.json" "$T/k.ext4" ||
	fail "node K through the bearer registry: $(tail -5 "$T/log")"
[ "$(sources)" = remote,remote,remote ] && cmp -s "$T/a.ext4" "$T/k.ext4" || fail "node K: $(sources)"
auth_file "127.0.0.1:$tport" builder wrong
REGISTRY_AUTH_FILE="$T/auth.json" "$IB" build --cache-dir "$T/cacheB" --remote "http://127.0.0.1:$tport/ib/other" \
	-o "$T/t2.ext4" "$T/one.json" >/dev/null 2>"$T/log" || fail "bearer, wrong password: $(tail -5 "$T/log")"
grep -q '^warning: .*token service .* answered HTTP 401' "$T/log" || fail "bearer, wrong password: $(tail -5 "$T/log")"
grep -q '^refused' "$T/token.log" || fail "the token service refused nothing"
reg_stop
REMOTE="http://127.0.0.1:$port/imagebuilder/layers"
ok "bearer tokens (the registry checks JWTs a token service signs): pushed, a fresh node pulled it all; a wrong password is a warning"

# -- the registry down (stopped above): a warning, the build goes on; warm --push fails --
spec three ', {"run_commands": ["echo offline > /offline.txt"]}'
node "$C" "$T/three.json" "$T/f.ext4" || fail "with the registry down: $(tail -5 "$T/log")"
grep -q '^warning: .*127.0.0.1' "$T/log" || fail "no warning with the registry down: $(tail -5 "$T/log")"
expect_status 1 "$IB" warm --push --cache-dir "$C" --remote "$REMOTE" "$T/three.json" > "$T/warm.out" 2>"$T/warm.log"
grep -q 'failed: .*to the remote failed' "$T/warm.out" || fail "warm --push, registry down: $(cat "$T/warm.out")"
ok "the registry stopped: the build succeeds, with a warning; warm --push fails"

# A remote that attacks: what it sends never hangs a build, never takes
# the user's credentials elsewhere, and never enters the cache.
#   - a bearer challenge whose realm is another host over plain http: no
#     credentials go there (a warning; the build goes on);
#   - an upload Location on another origin: no blob goes there;
#   - a layer blob whose archive fails at once and then goes on for
#     megabytes (its digest right, the registry made it): the unpacker
#     stops, the download stops with it, the layer is built here.
. "$(dirname "$0")/lib.sh"
C="$SHARED_CACHE"
command -v docker-registry >/dev/null || fail "docker-registry is not installed (scripts/install-deps.sh installs it)"
nonce=$(date +%s%N)

spec() { # NAME WORD: a spec with one run_commands step of its own
	printf '{"base": "debian_amd64", "disk_size": "256M", "steps": [{"run_commands": ["echo %s %s > /hostile.txt"]}]}\n' \
		"$2" "$nonce" > "$T/$1.json"
}
hostile() { # MODE: start hostile.py; sets HPORT and OTHER
	rm -f "$T/ports" "$T/elsewhere.log"
	touch "$T/elsewhere.log"
	$PY "$TOP/tests/fixtures/registry/hostile.py" "$1" "$T/ports" "$T/elsewhere.log" 2>"$T/hostile.err" &
	HPID=$!
	CLEANUP="$CLEANUP $HPID"
	wait_file "$T/ports" hostile.py "$T/hostile.err"
	HPORT=$(sed -n 1p "$T/ports")
	OTHER=$(sed -n 2p "$T/ports")
}

# -- a realm elsewhere, over http: the credentials stay home --
hostile realm
printf '{"auths": {"127.0.0.1:%s": {"auth": "%s"}}}\n' "$HPORT" "$(printf 'builder:secret-%s' "$nonce" | base64 -w0)" \
	> "$T/auth.json"
spec realm realm
REGISTRY_AUTH_FILE="$T/auth.json" timeout -k 10 300 "$IB" build --cache-dir "$C" --remote "http://127.0.0.1:$HPORT/r" \
	-o "$T/realm.ext4" "$T/realm.json" >/dev/null 2>"$T/log" || fail "the build: $(tail -5 "$T/log")"
! grep -q 'auth=Basic' "$T/elsewhere.log" || fail "the credentials went to the realm elsewhere: $(cat "$T/elsewhere.log")"
grep -q "^warning: .*token realm .* neither https nor on the registry's host" "$T/log" ||
	fail "no warning about the realm: $(grep warning "$T/log")"
kill "$HPID"; wait "$HPID" 2>/dev/null
ok "a bearer realm on another host over http gets no credentials; the build warns and goes on"

# -- an upload Location elsewhere: nothing goes there --
hostile location
spec location location
timeout -k 10 300 "$IB" build --cache-dir "$C" --remote "http://127.0.0.1:$HPORT/r" -o "$T/location.ext4" "$T/location.json" \
	>/dev/null 2>"$T/log" || fail "the build: $(tail -5 "$T/log")"
[ ! -s "$T/elsewhere.log" ] || fail "the upload went elsewhere: $(cat "$T/elsewhere.log")"
grep -q "^warning: .*sends the upload to .*not its own origin" "$T/log" ||
	fail "no warning about the upload's Location: $(grep warning "$T/log")"
kill "$HPID"; wait "$HPID" 2>/dev/null
ok "an upload Location on another origin gets no bytes; the build warns and goes on"

# -- a layer blob that breaks the unpacker at once, then goes on --
port=$($PY -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
printf 'version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:%s\n' \
	"$T/registry" "$port" > "$T/registry.yml"
docker-registry serve "$T/registry.yml" >"$T/registry.log" 2>&1 &
CLEANUP="$CLEANUP $!"
i=0
until curl -sf "http://127.0.0.1:$port/v2/" >/dev/null; do
	i=$((i + 1)); [ $i -gt 100 ] && fail "the registry did not start: $(tail -3 "$T/registry.log")"
	sleep 0.1
done
R="http://127.0.0.1:$port/v2/hostile/layers"
spec long long
"$IB" build --cache-dir "$C" --remote "http://127.0.0.1:$port/hostile/layers" --json -o "$T/a.ext4" "$T/long.json" \
	> "$T/out.json" 2>"$T/log" || fail "node A: $(tail -5 "$T/log")"
key=$(json_get "$T/out.json" 'd["layers"][1]["key"]')
# an entry not below ./ (the unpacker refuses it at once), then 8 MiB that do not compress
$PY -c 'import io, os, sys, tarfile
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
    for name, size in (("evil", 0), ("./filler", 8 << 20)):
        info = tarfile.TarInfo(name)
        info.size = size
        t.addfile(info, io.BytesIO(os.urandom(size)))
open(sys.argv[1], "wb").write(buf.getvalue())' "$T/evil.tar"
zstd -q -1 "$T/evil.tar" -o "$T/evil.tar.zst" || fail "zstd"
digest=sha256:$(sha256sum "$T/evil.tar.zst" | cut -d' ' -f1)
loc=$(curl -sf -D - -o /dev/null -X POST "$R/blobs/uploads/" | tr -d '\r' | sed -n 's/^Location: //Ip')
case $loc in /*) loc="http://127.0.0.1:$port$loc" ;; esac
case $loc in *\?*) sep='&' ;; *) sep='?' ;; esac
curl -sf -X PUT -H 'Content-Type: application/octet-stream' --data-binary "@$T/evil.tar.zst" "$loc${sep}digest=$digest" \
	>/dev/null || fail "cannot upload the hostile blob"
curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' "$R/manifests/layer-$key" > "$T/m.json" ||
	fail "no manifest layer-$key"
$PY -c 'import json, os, sys
m = json.load(open(sys.argv[1]))
m["layers"][0]["digest"] = sys.argv[2]
m["layers"][0]["size"] = os.path.getsize(sys.argv[3])
print(json.dumps(m))' "$T/m.json" "$digest" "$T/evil.tar.zst" > "$T/evil.json"
curl -sf -X PUT -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' --data-binary "@$T/evil.json" \
	"$R/manifests/layer-$key" >/dev/null || fail "cannot put the hostile manifest"
timeout -k 10 300 "$IB" build --cache-dir "$T/cacheB" --remote "http://127.0.0.1:$port/hostile/layers" --json \
	-o "$T/b.ext4" "$T/long.json" > "$T/out.json" 2>"$T/log"
rc=$?
[ $rc = 124 ] && fail "node B hung on the hostile blob (killed after 300 s): $(tail -3 "$T/log")"
[ $rc = 0 ] || fail "node B: $(tail -5 "$T/log")"
grep -q "^warning: layer $(echo "$key" | cut -c1-12) from .*not below" "$T/log" ||
	fail "no warning naming the hostile layer: $(grep warning "$T/log")"
[ "$(json_get "$T/out.json" '",".join(l["source"] for l in d["layers"])')" = remote,built ] ||
	fail "node B's layers: $(cat "$T/out.json")"
cmp -s "$T/a.ext4" "$T/b.ext4" || fail "node B's image differs from node A's"
"$IB" cache verify --cache-dir "$T/cacheB" > "$T/v.log" 2>&1 || fail "node B's cache: $(cat "$T/v.log")"
ok "a blob that breaks the unpacker and goes on for 8 MiB: refused at once, the layer built here, the cache verifies"

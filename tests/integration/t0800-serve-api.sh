# The BuildImage service's API on a real daemon: bearer auth, Connect
# errors and their HTTP statuses, a real build followed through GetBuild
# and its log, the cached answer, GetImage, and the image download (HEAD,
# Range, ETag), /metrics.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/serve.sh"
C="$SHARED_CACHE"

TOKEN="tok-$NONCE"
printf '%s\n' "$TOKEN" > "$T/token"
chmod 600 "$T/token"
serve_start --token-file "$T/token" --jobs 2

# -- auth --
[ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/healthz")" = 200 ] || fail "/healthz needs no token"
st=$(curl -s -o "$T/noauth.json" -w '%{http_code}' -D "$T/noauth.hdr" -X POST -H 'Content-Type: application/json' \
	-d '{"build_id":"00000000000000000000000000000000"}' "$URL/imagebuilder.v1.ImageBuilder/GetBuild")
[ "$st" = 401 ] || fail "no token: HTTP $st"
[ "$(json_get "$T/noauth.json" 'd["code"]')" = unauthenticated ] || fail "no token: $(cat "$T/noauth.json")"
grep -qi '^WWW-Authenticate: Bearer' "$T/noauth.hdr" || fail "401 without WWW-Authenticate"
st=$(curl -s -o "$T/wrong.json" -w '%{http_code}' -X POST -H 'Content-Type: application/json' \
	-H "Authorization: Bearer ${TOKEN}x" -d '{}' "$URL/imagebuilder.v1.ImageBuilder/GetBuild")
[ "$st" = 401 ] || fail "wrong token: HTTP $st"
[ "$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer ${TOKEN%?}" "$URL/metrics")" = 401 ] ||
	fail "a prefix of the token was accepted"
[ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/metrics")" = 401 ] || fail "/metrics without a token"
[ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/v1/images/$(printf '%064d' 0)/rootfs.ext4")" = 401 ] ||
	fail "a download without a token"
[ "$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $TOKEN" "$URL/metrics")" = 200 ] ||
	fail "right token refused"
[ "$(rpc GetBuild '{"build_id":"00000000000000000000000000000000"}')" = 404 ] || fail "right token: $(cat "$T/out.json")"
[ "$(out 'd["code"]')" = not_found ] || fail "unknown build: $(cat "$T/out.json")"
ok "auth: none and wrong token 401 unauthenticated (with WWW-Authenticate), right token passes, /healthz open"

# -- Connect errors --
expect_rpc() { # expect_rpc METHOD BODY HTTP CODE [MESSAGE-SUBSTRING]
	st=$(rpc "$1" "$2")
	[ "$st" = "$3" ] || fail "$1 $2: HTTP $st, expected $3: $(cat "$T/out.json")"
	[ "$(out 'd["code"]')" = "$4" ] || fail "$1 $2: code $(out 'd["code"]'), expected $4"
	if [ -n "${5:-}" ]; then
		out 'd["message"]' | grep -qF -- "$5" || fail "$1 $2: message '$(out 'd["message"]')' lacks '$5'"
	fi
}
expect_rpc BuildImage '{"spec": ' 400 invalid_argument "invalid JSON"
expect_rpc BuildImage '[1, 2]' 400 invalid_argument "must be a JSON object"
expect_rpc BuildImage '{}' 400 invalid_argument "spec: required"
expect_rpc BuildImage '{"spec": 7}' 400 invalid_argument "spec: must be an object"
expect_rpc BuildImage '{"spec": {"base": "debian_amd64", "stepz": []}}' 400 invalid_argument "stepz"
expect_rpc BuildImage '{"spec": {"base": "windows"}}' 400 invalid_argument "spec.base"
expect_rpc BuildImage '{"spec": {"base": "debian_amd64", "steps": [{"apt_install": ["Foo;rm"]}]}}' 400 \
	invalid_argument "spec.steps[0].apt_install[0]"
expect_rpc BuildImage '{"spec": {"base": "debian_amd64", "steps": [{"run_commands": ["a\u0000b"]}]}}' 400 \
	invalid_argument "steps[0].run_commands[0]"
expect_rpc BuildImage '{"spec": {"base": "debian_amd64"}, "timeout_s": -5}' 400 invalid_argument "timeout_s"
expect_rpc BuildImage '{"spec": {"base": "debian_amd64"}, "force_build": "yes"}' 400 invalid_argument "force_build"
expect_rpc GetBuild '{}' 400 invalid_argument "build_id: required"
expect_rpc GetBuild '{"build_id": 5}' 400 invalid_argument "build_id: must be a string"
expect_rpc GetImage '{"image_id": "nope"}' 400 invalid_argument "image_id"
expect_rpc GetImage "{\"image_id\": \"$(printf '%064d' 0)\"}" 404 not_found
expect_rpc CancelBuild '{"build_id": "ffffffffffffffffffffffffffffffff"}' 404 not_found
expect_rpc NoSuchMethod '{}' 501 unimplemented
head -c 1200000 /dev/zero | tr '\0' ' ' > "$T/big.json"
st=$(curl -s -o "$T/out.json" -w '%{http_code}' -X POST -H 'Content-Type: application/json' \
	-H "Authorization: Bearer $TOKEN" --data-binary @"$T/big.json" "$URL/imagebuilder.v1.ImageBuilder/BuildImage")
[ "$st" = 429 ] && [ "$(out 'd["code"]')" = resource_exhausted ] || fail "oversized body: HTTP $st $(cat "$T/out.json")"
st=$(curl -s -o "$T/out.json" -w '%{http_code}' -X POST -H 'Content-Type: text/plain' \
	-H "Authorization: Bearer $TOKEN" -d '{}' "$URL/imagebuilder.v1.ImageBuilder/GetBuild")
[ "$st" = 415 ] || fail "text/plain body: HTTP $st, expected 415"
st=$(curl -s -o "$T/out.json" -w '%{http_code}' -H "Authorization: Bearer $TOKEN" \
	"$URL/imagebuilder.v1.ImageBuilder/BuildImage")
[ "$st" = 405 ] || fail "GET BuildImage: HTTP $st, expected 405"
st=$(curl -s -o "$T/out.json" -w '%{http_code}' -X POST -H 'Content-Type: application/json' \
	-H 'Content-Encoding: br' -H "Authorization: Bearer $TOKEN" -d '{}' "$URL/imagebuilder.v1.ImageBuilder/GetBuild")
[ "$st" = 501 ] && [ "$(out 'd["code"]')" = unimplemented ] || fail "br body: HTTP $st $(cat "$T/out.json")"
st=$(curl -s -o "$T/out.json" -w '%{http_code}' -X POST -H 'Content-Type: application/json' \
	-H 'Content-Encoding: gzip' -H "Authorization: Bearer $TOKEN" -d '{}' "$URL/imagebuilder.v1.ImageBuilder/GetBuild")
[ "$st" = 400 ] && [ "$(out 'd["code"]')" = invalid_argument ] || fail "a gzip body that is not: HTTP $st $(cat "$T/out.json")"
ok "errors: bad JSON, bad fields, bad specs (message names the field) 400 invalid_argument; 404 not_found;" \
	"501 unimplemented; oversized 429 resource_exhausted; 415; 405"

# -- a build, followed --
cat > "$T/spec.json" <<JSON
{"base": "debian_amd64", "disk_size": "256M", "steps": [
  {"env": {"SERVE_TEST": "$NONCE"}},
  {"run_commands": ["echo serve-api-$NONCE > /serve.txt", "echo to-the-log-$NONCE"]}
]}
JSON
build_image "$T/spec.json"
[ "$(out 'd["cached"]')" = False ] || fail "a new spec answered cached"
case "$(out 'd["status"]')" in QUEUED|BUILDING) ;; *) fail "new build status $(out 'd["status"]')" ;; esac
echo "$BID" | grep -qE '^[0-9a-f]{32}$' || fail "build id '$BID'"
echo "$IID" | grep -qE '^[0-9a-f]{64}$' || fail "image id '$IID'"
wait_build "$BID" READY 300
[ "$(out '",".join(s["kind"] for s in d["steps"])')" = "base,env,run_commands" ] || fail "steps: $(out 'd["steps"]')"
# The base is cached when an earlier test built it; run alone, this build makes it.
case "$(out '",".join(s["state"] for s in d["steps"])')" in
cached,done,done|done,done,done) ;;
*) fail "states: $(out 'd["steps"]')" ;;
esac
[ "$(out 'sorted(d["steps"][0].keys())')" = "['cached', 'index', 'key', 'kind', 'seconds', 'state']" ] ||
	fail "step fields: $(out 'd["steps"][0]')"
[ "$(out 'd["error"]')" = None ] || fail "READY with an error"
logbytes=$(out 'd["log_bytes"]')
curl -s -H "Authorization: Bearer $TOKEN" "$URL/v1/builds/$BID/logs" > "$T/log.txt"
[ "$(stat -c %s "$T/log.txt")" = "$logbytes" ] || fail "log is $(stat -c %s "$T/log.txt") bytes, log_bytes $logbytes"
grep -q "to-the-log-$NONCE" "$T/log.txt" || fail "the step's output is not in the log"
ok "BuildImage -> $(echo "$BID" | cut -c1-8): GetBuild polled to READY, steps and states, log_bytes = log size"

# -- logs from an offset --
half=$((logbytes / 2))
curl -s -D "$T/log.hdr" -H "Authorization: Bearer $TOKEN" "$URL/v1/builds/$BID/logs?offset=$half" > "$T/log2.txt"
tail -c +$((half + 1)) "$T/log.txt" | cmp -s - "$T/log2.txt" || fail "log from offset $half differs"
grep -qi "^X-Log-Size: $logbytes" "$T/log.hdr" || fail "X-Log-Size: $(cat "$T/log.hdr")"
[ "$(curl -s -H "Authorization: Bearer $TOKEN" "$URL/v1/builds/$BID/logs?offset=$logbytes" | wc -c)" = 0 ] ||
	fail "log at its end is not empty"
st=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $TOKEN" \
	"$URL/v1/builds/$BID/logs?offset=$((logbytes + 1))")
[ "$st" = 416 ] || fail "offset past the end: HTTP $st"
st=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $TOKEN" "$URL/v1/builds/$BID/logs?offset=x")
[ "$st" = 400 ] || fail "bad offset: HTTP $st"
ok "logs?offset=N: bytes from N, empty at the end, 416 past it, 400 for a bad offset"

# -- the cached answer, repeated --
build_image "$T/spec.json"
[ "$(out 'd["status"]')" = READY ] && [ "$(out 'd["cached"]')" = True ] || fail "rebuild: $(cat "$T/out.json")"
[ "$BID" = "$(out 'd["build_id"]')" ] || fail "a cached answer named another build"
# shellcheck disable=SC2016
t=$(curl -s -o /dev/null -w '%{time_total} %{time_connect}' -X POST -H 'Content-Type: application/json' \
	-H "Authorization: Bearer $TOKEN" --data-binary "{\"spec\": $(cat "$T/spec.json")}" \
	"$URL/imagebuilder.v1.ImageBuilder/BuildImage" | awk '{ printf "%d", ($1 - $2) * 1000000 }')
[ "$t" -lt 50000 ] || fail "a cached BuildImage took ${t}us"
ok "cached spec: READY, cached true, the same build id; answered in ${t}us"

# -- GetImage and the download --
[ "$(rpc GetImage "{\"image_id\": \"$IID\"}")" = 200 ] || fail "GetImage: $(cat "$T/out.json")"
sha=$(out 'd["ext4_sha256"]')
bytes=$(out 'd["ext4_bytes"]')
[ "$(out 'd["env"]["SERVE_TEST"]')" = "$NONCE" ] || fail "GetImage env: $(out 'd["env"]')"
[ "$(out 'd["arch"]')" = amd64 ] || fail "GetImage arch"
[ "$(out 'd["python_version"]')" = None ] || fail "GetImage python_version"
rootfs=$(out 'd["rootfs_url"]')
[ "$rootfs" = "$URL/v1/images/$IID/rootfs.ext4" ] || fail "rootfs_url '$rootfs'"
[ "$(out 'd["disk_size"]')" = 268435456 ] && [ "$bytes" = 268435456 ] ||
	fail "GetImage disk_size $(out 'd["disk_size"]'), ext4_bytes $bytes"
[ "$(out 'd["rootfs_zst_url"]')" = "$rootfs.zst" ] || fail "rootfs_zst_url '$(out 'd["rootfs_zst_url"]')'"
[ "$(out 'd["rootfs_bmap_url"]')" = "$rootfs.bmap" ] ||
	fail "rootfs_bmap_url '$(out 'd["rootfs_bmap_url"]')'"
ok "GetImage: arch, env, python_version, disk_size, ext4_sha256, ext4_bytes, rootfs_url, rootfs_zst_url, rootfs_bmap_url"

curl -s -I -H "Authorization: Bearer $TOKEN" "$rootfs" | tr -d '\r' > "$T/head.hdr"
grep -q "^HTTP/1.1 200" "$T/head.hdr" || fail "HEAD: $(head -1 "$T/head.hdr")"
grep -qi "^Content-Length: $bytes$" "$T/head.hdr" || fail "HEAD Content-Length: $(cat "$T/head.hdr")"
grep -qi "^ETag: \"sha256:$sha\"$" "$T/head.hdr" || fail "ETag: $(cat "$T/head.hdr")"
grep -qi "^Accept-Ranges: bytes$" "$T/head.hdr" || fail "no Accept-Ranges"

: > "$T/parts"
a=$((bytes / 3)); b=$((2 * bytes / 3))
for r in "0-$((a - 1))" "$a-$((b - 1))" "$b-"; do
	st=$(curl -s -o "$T/part" -D "$T/part.hdr" -w '%{http_code}' -H "Authorization: Bearer $TOKEN" -H "Range: bytes=$r" \
		"$rootfs")
	[ "$st" = 206 ] || fail "Range $r: HTTP $st"
	grep -qi "^Content-Range: bytes ${r%-}" "$T/part.hdr" || fail "Range $r: $(grep -i content-range "$T/part.hdr")"
	cat "$T/part" >> "$T/parts"
done
[ "$(sha256sum < "$T/parts" | cut -d' ' -f1)" = "$sha" ] || fail "three ranges do not hash to ext4_sha256"
st=$(curl -s -o /dev/null -D "$T/416.hdr" -w '%{http_code}' -H "Authorization: Bearer $TOKEN" \
	-H "Range: bytes=$bytes-" "$rootfs")
[ "$st" = 416 ] || fail "unsatisfiable range: HTTP $st"
grep -qi "^Content-Range: bytes \*/$bytes" "$T/416.hdr" || fail "416 without Content-Range"
st=$(curl -s -o "$T/tail" -w '%{http_code}' -H "Authorization: Bearer $TOKEN" -H "Range: bytes=-1000" "$rootfs")
[ "$st" = 206 ] && [ "$(stat -c %s "$T/tail")" = 1000 ] || fail "suffix range: HTTP $st"
st=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $TOKEN" -H "If-None-Match: \"sha256:$sha\"" "$rootfs")
[ "$st" = 304 ] || fail "If-None-Match: HTTP $st"
curl -s -o "$T/full.ext4" -H "Authorization: Bearer $TOKEN" "$rootfs"
[ "$(sha256sum < "$T/full.ext4" | cut -d' ' -f1)" = "$sha" ] || fail "the full download does not hash to ext4_sha256"
[ "$(img_cat "$T/full.ext4" /serve.txt)" = "serve-api-$NONCE" ] || fail "the image lacks /serve.txt"
ok "rootfs.ext4: HEAD (Content-Length, ETag), 3 Ranges hash to ext4_sha256, 416, suffix range, 304, full GET"

# -- the compact forms: made on first use, then served like the image --
curl -s -I -H "Authorization: Bearer $TOKEN" "$rootfs.zst" | tr -d '\r' > "$T/zhead.hdr"
grep -q "^HTTP/1.1 200" "$T/zhead.hdr" || fail "HEAD .zst: $(head -1 "$T/zhead.hdr")"
grep -qi "^Content-Type: application/zstd$" "$T/zhead.hdr" || fail ".zst Content-Type: $(cat "$T/zhead.hdr")"
zetag=$(sed -n 's/^[Ee][Tt][Aa][Gg]: //p' "$T/zhead.hdr")
zlen=$(sed -n 's/^[Cc]ontent-[Ll]ength: //p' "$T/zhead.hdr")
curl -s -o "$T/full.zst" -H "Authorization: Bearer $TOKEN" "$rootfs.zst"
[ "$(stat -c %s "$T/full.zst")" = "$zlen" ] || fail ".zst is $(stat -c %s "$T/full.zst") bytes, HEAD said $zlen"
[ "$zetag" = "\"sha256:$(sha256sum < "$T/full.zst" | cut -d' ' -f1)\"" ] || fail ".zst ETag $zetag is not its sha256"
zstd -q -d -c "$T/full.zst" | cmp -s - "$T/full.ext4" || fail "the .zst does not decompress to the image"
[ "$zlen" -lt $((bytes / 2)) ] || fail "the .zst is $zlen bytes of a $bytes-byte image"
st=$(curl -s -o "$T/zpart" -w '%{http_code}' -H "Authorization: Bearer $TOKEN" -H "Range: bytes=100-" "$rootfs.zst")
[ "$st" = 206 ] && tail -c +101 "$T/full.zst" | cmp -s - "$T/zpart" || fail ".zst Range: HTTP $st"
st=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $TOKEN" -H "If-None-Match: $zetag" "$rootfs.zst")
[ "$st" = 304 ] || fail ".zst If-None-Match: HTTP $st"
curl -s -o "$T/full.bmap" -H "Authorization: Bearer $TOKEN" "$rootfs.bmap"
bmaptool -q copy --bmap "$T/full.bmap" "$T/full.ext4" "$T/bmapped.ext4" 2>"$T/bmap.log" ||
	fail "bmaptool refused the served bmap: $(tail -3 "$T/bmap.log")"
cmp -s "$T/bmapped.ext4" "$T/full.ext4" || fail "bmaptool's copy with the served bmap differs"
bmaptool -q copy --bmap "$T/full.bmap" "$T/full.zst" "$T/bmapped2.ext4" 2>"$T/bmap.log" ||
	fail "bmaptool refused the .zst with the bmap: $(tail -3 "$T/bmap.log")"
cmp -s "$T/bmapped2.ext4" "$T/full.ext4" || fail "bmaptool's copy of the .zst differs"
st=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $TOKEN" "$URL/v1/images/$IID/rootfs.tar")
[ "$st" = 404 ] || fail "an unknown form: HTTP $st"
ok "rootfs.ext4.zst ($zlen bytes for $bytes): HEAD, ETag = its sha256, Range, 304, decompresses to the image;" \
	"rootfs.bmap: bmaptool copies the image and the .zst exactly"

# -- connect GET for side-effect-free calls --
msg=$(printf '{"build_id":"%s"}' "$BID" | od -An -tx1 | tr -d ' \n' | sed 's/../%&/g')
st=$(curl -s -o "$T/out.json" -w '%{http_code}' -H "Authorization: Bearer $TOKEN" \
	"$URL/imagebuilder.v1.ImageBuilder/GetBuild?connect=v1&encoding=json&message=$msg")
[ "$st" = 200 ] && [ "$(out 'd["status"]')" = READY ] || fail "Connect GET: HTTP $st $(cat "$T/out.json")"
ok "Connect GET of GetBuild"

# -- metrics --
curl -s -H "Authorization: Bearer $TOKEN" "$URL/metrics" > "$T/metrics.txt"
for m in 'imagebuilder_builds_total{status="READY"} 1' 'imagebuilder_image_cache_hits_total 2' \
	'imagebuilder_image_cache_misses_total 1' 'imagebuilder_layer_cache_misses_total{kind="run_commands"} 1' \
	'imagebuilder_layer_cache_hits_total{kind="base"} 1' 'imagebuilder_queue_depth 0' \
	'imagebuilder_build_duration_seconds_count 1' 'imagebuilder_step_duration_seconds_count{kind="env"} 1'; do
	grep -qxF "$m" "$T/metrics.txt" || fail "metrics lack '$m'"
done
served=$(awk '$1 == "imagebuilder_served_bytes_total{endpoint=\"rootfs\"}" { print $2 }' "$T/metrics.txt")
[ "$served" -ge "$((bytes * 2))" ] || fail "served bytes $served < two images"
grep -q '^imagebuilder_http_requests_total{endpoint="BuildImage",code="400"} ' "$T/metrics.txt" || fail "no 400 counted"
ok "/metrics: builds by status, cache hits and misses, layer and build histograms, queue depth, bytes served"

grep -q '"event":"request".*"path":"/imagebuilder.v1.ImageBuilder/BuildImage".*"status":200' "$SERVE_LOG" ||
	fail "no request log line"
grep -q "\"event\":\"build\",\"build_id\":\"$BID\".*\"status\":\"READY\"" "$SERVE_LOG" || fail "no build event line"
$PY -c 'import json,sys; [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]' "$SERVE_LOG" ||
	fail "a log line is not JSON"
ok "one JSON log line per request and per build event"

# -- content over disk_size: FAILED, the message names it --
printf '{"base": "debian_amd64", "disk_size": "64M", "steps": [{"env": {"SERVE_TEST": "%s-small"}}]}' "$NONCE" \
	> "$T/small.json"
build_image "$T/small.json"
wait_build "$BID" FAILED 300
out 'd["error"]["message"]' | grep -q 'disk_size is 67108864 bytes.*smallest disk_size that fits is [0-9]* MiB' ||
	fail "FAILED without the disk_size message: $(out 'd["error"]')"
[ "$(rpc GetImage "{\"image_id\": \"$IID\"}")" = 404 ] || fail "an image that did not fit is in the cache"
ok "content over disk_size over the RPC: FAILED, the message names disk_size and what fits; no image"

serve_stop TERM
[ "$SERVE_RC" = 0 ] || fail "SIGTERM: exit $SERVE_RC"
cache_sound "$C"
ok "SIGTERM: exit 0; cache verifies"

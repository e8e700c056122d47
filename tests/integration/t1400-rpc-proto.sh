# The service over Connect with binary Protobuf, spoken by a client nobody
# here wrote: buf curl (npm @bufbuild/buf) with the schema in proto/.
#   - BuildImage, GetBuild, GetImage and CancelBuild answer as over JSON
#     (the same image id, build id, statuses, digests, URLs);
#   - errors keep their Connect codes (invalid_argument naming the field,
#     not_found);
#   - a body that is not the method's message is invalid_argument, and the
#     daemon lives on;
#   - log_url is absolute, like rootfs_url;
#   - gzip both ways, a gzip bomb refused; Connect GET with encoding=proto;
#   - an error found in the headers is answered after the body is read, so
#     a client sending a large body sees the answer, not EPIPE.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/serve.sh"
C="$SHARED_CACHE"
BUF=$(npm_tool @bufbuild/buf@1.75.0 buf) || exit $?

serve_start
M="$URL/imagebuilder.v1.ImageBuilder"
bufc() { # METHOD JSON: buf curl over Connect, binary Protobuf; the answer in $T/buf.json
	"$BUF" curl --schema "$TOP/proto" --protocol connect --data "$2" "$M/$1" >"$T/buf.json" 2>"$T/buf.err"
}
bget() { json_get "$T/buf.json" "$1"; }

spec="{\"base\": \"debian_amd64\", \"steps\": [{\"run_commands\": [\"echo proto > /codec # $$\"]}, {\"env\": {\"CODEC\": \"proto\"}}], \"disk_size\": \"256M\"}"
bufc BuildImage "{\"spec\": $spec, \"limits\": {\"pids\": 512, \"cpus\": 1.5}}" ||
	fail "buf curl BuildImage: $(cat "$T/buf.err")"
bid=$(bget 'd["build_id"]')
iid=$(bget 'd["image_id"]')
[ "$(bget 'd["status"]')" = QUEUED ] || [ "$(bget 'd["status"]')" = BUILDING ] || fail "BuildImage answered $(cat "$T/buf.json")"
# the same request over JSON joins the same build
printf '{"spec": %s}' "$spec" > "$T/req.json"
st=$(curl -s -o "$T/out.json" -w '%{http_code}' -X POST -H 'Content-Type: application/json' \
	--data-binary "@$T/req.json" "$M/BuildImage")
[ "$st" = 200 ] && [ "$(out 'd["image_id"]')" = "$iid" ] && [ "$(out 'd["build_id"]')" = "$bid" ] ||
	fail "JSON BuildImage of the same spec: $st $(cat "$T/out.json"); the first build $bid of $iid:" \
		"$(curl -s -X POST -H 'Content-Type: application/json' -d "{\"build_id\": \"$bid\"}" "$M/GetBuild")"
ok "BuildImage over binary Protobuf (buf curl): build $bid, joined by the same request over JSON"

wait_build "$bid" READY 300
bufc GetBuild "{\"build_id\": \"$bid\"}" || fail "buf curl GetBuild: $(cat "$T/buf.err")"
[ "$(bget 'd["status"]')" = READY ] && [ "$(bget 'd["steps"][1]["kind"]')" = run_commands ] &&
	[ "$(bget 'len(d["steps"])')" = 3 ] || fail "GetBuild: $(cat "$T/buf.json")"
case "$(bget 'd["log_url"]')" in "$URL/v1/builds/$bid/logs") ;; *) fail "log_url is not absolute: $(bget 'd["log_url"]')" ;; esac
curl -s "$(bget 'd["log_url"]')" | grep -q 'echo proto' || fail "log_url does not serve the log"
ok "GetBuild: READY, 3 steps, an absolute log_url that serves the log"

bufc GetImage "{\"image_id\": \"$iid\"}" || fail "buf curl GetImage: $(cat "$T/buf.err")"
rpc GetImage "{\"image_id\": \"$iid\"}" >/dev/null
for k in ext4_sha256 rootfs_url arch base; do
	[ "$(bget "d[\"$k\"]")" = "$(out "d[\"$k\"]")" ] || fail "GetImage $k: proto '$(bget "d[\"$k\"]")', JSON '$(out "d[\"$k\"]")'"
done
[ "$(bget 'd["env"]["CODEC"]')" = proto ] && [ "$(bget 'int(d["disk_size"])')" = 268435456 ] ||
	fail "GetImage: $(cat "$T/buf.json")"
ok "GetImage: the same digest, URLs, env and disk_size as over JSON"

bufc CancelBuild "{\"build_id\": \"$bid\"}" || fail "buf curl CancelBuild: $(cat "$T/buf.err")"
[ "$(bget 'd["status"]')" = READY ] || fail "CancelBuild of a finished build: $(cat "$T/buf.json")"

bufc BuildImage '{"spec": {"base": "debian_amd64", "steps": [{"apt_install": [1]}]}}' &&
	fail "a number for a package was accepted"
grep -q 'invalid_argument' "$T/buf.err" && grep -q 'apt_install\[0\]' "$T/buf.err" ||
	fail "bad spec: $(cat "$T/buf.err")"
bufc GetBuild '{"build_id": "0123456789abcdef0123456789abcdef"}' && fail "an unknown build was found"
grep -q 'not_found' "$T/buf.err" || fail "unknown build: $(cat "$T/buf.err")"
bufc BuildImage "{\"spec\": $spec, \"limits\": {\"memory\": \"64T\"}}" && fail "limits over the daemon's were accepted"
grep -q 'limits.memory' "$T/buf.err" || fail "limits over: $(cat "$T/buf.err")"
ok "errors over Protobuf: invalid_argument naming the field, not_found, limits over the daemon's"

printf '\377\377\377\377garbage' > "$T/garbage"
st=$(curl -s -o "$T/out.json" -w '%{http_code}' -X POST -H 'Content-Type: application/proto' \
	--data-binary "@$T/garbage" "$M/GetBuild")
[ "$st" = 400 ] && [ "$(out 'd["code"]')" = invalid_argument ] || fail "garbage body: $st $(cat "$T/out.json")"
[ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/healthz")" = 200 ] || fail "the daemon is down after garbage"
ok "a body that is not a GetBuildRequest: invalid_argument; the daemon lives on"
# gzip both ways (Content-Encoding / Accept-Encoding), and a bomb refused
printf '{"build_id": "%s"}' "$bid" | gzip > "$T/req.gz"
curl -s -D "$T/gz.hdr" -o "$T/ans.gz" -X POST -H 'Content-Type: application/json' -H 'Content-Encoding: gzip' \
	-H 'Accept-Encoding: gzip' --data-binary "@$T/req.gz" "$M/GetBuild"
grep -qi '^content-encoding: gzip' "$T/gz.hdr" && gunzip -c "$T/ans.gz" > "$T/ans.json" &&
	[ "$(json_get "$T/ans.json" 'd["status"]')" = READY ] || fail "gzip: $(cat "$T/gz.hdr")"
head -c 10000000 /dev/zero | gzip > "$T/bomb.gz"
st=$(curl -s -o "$T/out.json" -w '%{http_code}' -X POST -H 'Content-Type: application/json' -H 'Content-Encoding: gzip' \
	--data-binary "@$T/bomb.gz" "$M/GetBuild")
[ "$st" = 429 ] && [ "$(out 'd["code"]')" = resource_exhausted ] || fail "a gzip bomb: $st $(cat "$T/out.json")"
ok "gzip request and answer; 10 MB of zeros in a 10 KB gzip body: resource_exhausted, unread past the limit"

# Connect GET with encoding=proto (base64url), the message made by buf convert
msg=$(printf '{"image_id": "%s"}' "$iid" | "$BUF" convert "$TOP/proto" --type imagebuilder.v1.GetImageRequest \
	--from -#format=json --to -#format=binpb | base64 -w0 | tr '+/' '-_' | tr -d '=')
st=$(curl -s -o "$T/get.bin" -w '%{http_code}' "$M/GetImage?encoding=proto&base64=1&message=$msg")
[ "$st" = 200 ] || fail "Connect GET, encoding=proto: $st"
"$BUF" convert "$TOP/proto" --type imagebuilder.v1.GetImageResponse --from "$T/get.bin#format=binpb" \
	--to -#format=json > "$T/get.json" || fail "the GET answer is not a GetImageResponse"
[ "$(json_get "$T/get.json" 'd["image_id"]')" = "$iid" ] || fail "Connect GET answered $(cat "$T/get.json")"
ok "Connect GET with encoding=proto: a GetImageResponse for the image"

# an error found in the headers waits for the body: the client's write never fails
$PY - "$URL" > "$T/epipe.txt" <<'PYEOF' || fail "a client sending a body got: $(cat "$T/epipe.txt")"
import http.client, sys, urllib.parse
u = urllib.parse.urlparse(sys.argv[1])
body = b"x" * (900 * 1024)
bad = 0
for ctype, method, want in (("text/plain", "GetBuild", 415), ("application/json", "NoSuchMethod", 501),
                            ("application/xml", "GetBuild", 415)):
    c = http.client.HTTPConnection(u.hostname, u.port)
    try:
        c.request("POST", "/imagebuilder.v1.ImageBuilder/" + method, body=body, headers={"Content-Type": ctype})
        r = c.getresponse()
        r.read()
        print(ctype, r.status)
        bad += r.status != want
    except OSError as e:
        print(ctype, "error", e)
        bad += 1
    c.close()
sys.exit(1 if bad else 0)
PYEOF
ok "900 KiB bodies with a wrong content type or method: 415/501 read after the body, no EPIPE"
serve_stop
[ "$SERVE_RC" = 0 ] || fail "serve exited $SERVE_RC"

# The service on every protocol, one port, spoken by clients nobody here
# wrote:
#   - Python grpcio (Debian's python3-grpcio, stubs from python3-grpc-tools)
#     over h2c: health without a token, the token as `authorization`
#     metadata, gRPC status codes, a gzip request, BuildImage then
#     WatchBuild until READY (snapshots, steps, the whole log, no gaps);
#   - buf curl (npm) for connect, grpc and grpcweb, with the schema and
#     with server reflection, unary and streaming;
#   - connect-es (npm), binary and JSON, unary, errors and streaming;
#   - gRPC-Web text, Connect streaming errors, out_of_range, and
#     CancelBuild over HTTP/2 waiting for a running build to stop.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/serve.sh"
C="$SHARED_CACHE"
BUF=$(npm_tool @bufbuild/buf@1.75.0 buf) || exit $?
npm_pkgs @connectrpc/connect@2.1.2 @connectrpc/connect-node@2.1.2 @bufbuild/protobuf@2.17.0 || exit $?
$PY -c 'import grpc, grpc_tools' 2>/dev/null || fail "python3-grpcio and python3-grpc-tools are not installed"

# the published schema passes buf lint (its STANDARD rules; the exceptions are documented in the .proto)
"$BUF" lint "$TOP/proto" > "$T/lint" 2>&1 || fail "buf lint proto: $(head -20 "$T/lint")"
ok "buf lint proto: clean"

TOKEN="tok-$NONCE"
printf '%s\n' "$TOKEN" > "$T/token"
chmod 600 "$T/token"
serve_start --token-file "$T/token" --jobs 2
HOSTPORT=${URL#http://}
AUTH="authorization: Bearer $TOKEN"

# -- grpcio --
mkdir -p "$T/stubs"
$PY -m grpc_tools.protoc -I "$TOP/proto" -I /usr/include --python_out="$T/stubs" --grpc_python_out="$T/stubs" \
	imagebuilder/v1/imagebuilder.proto || fail "grpc_tools.protoc imagebuilder.proto"
$PY -m grpc_tools.protoc -I "$TOP/proto/grpc/health/v1" --python_out="$T/stubs" --grpc_python_out="$T/stubs" \
	health.proto || fail "grpc_tools.protoc health.proto"
spec="{\"base\": \"debian_amd64\", \"disk_size\": \"256M\", \"steps\": [{\"run_commands\": [\"echo grpc-$NONCE > /grpc.txt\", \"echo log-$NONCE; seq 1 20000\"]}]}"
$PY "$TOP/tests/fixtures/rpc/grpcio_client.py" "$T/stubs" "$HOSTPORT" "$TOKEN" "$spec" > "$T/grpc.json" ||
	fail "the grpcio client failed"
g() { json_get "$T/grpc.json" "$1"; }
[ "$(g 'd["health"]')" = SERVING ] || fail "health without a token: $(g 'd["health"]')"
[ "$(g 'd["no_token"]')" = UNAUTHENTICATED ] && [ "$(g 'd["wrong_token"]')" = UNAUTHENTICATED ] ||
	fail "auth over gRPC: no token $(g 'd["no_token"]'), wrong token $(g 'd["wrong_token"]')"
[ "$(g 'd["bad_spec"][0]')" = INVALID_ARGUMENT ] && g 'd["bad_spec"][1]' | grep -q python_version ||
	fail "a bad spec over gRPC: $(g 'd["bad_spec"]')"
[ "$(g 'd["unknown_build"]')" = NOT_FOUND ] || fail "an unknown build over gRPC: $(g 'd["unknown_build"]')"
BID=$(g 'd["build"]["build_id"]')
IID=$(g 'd["build"]["image_id"]')
[ "$(g 'd["first"]')" = build ] && [ "$(g 'd["last"]')" = build ] && [ "$(g 'd["final_status"]')" = READY ] ||
	fail "WatchBuild: first $(g 'd["first"]'), last $(g 'd["last"]'), final $(g 'd["final_status"]')"
[ "$(g 'd["gaps"]')" = 0 ] && [ "$(g 'd["log_len"]')" = "$(g 'd["final_log_bytes"]')" ] ||
	fail "WatchBuild log: gaps $(g 'd["gaps"]'), $(g 'd["log_len"]') bytes of $(g 'd["final_log_bytes"]')"
g 'd["log_text"]' > "$T/log.txt"
grep -q "^log-$NONCE\$" "$T/log.txt" && grep -q '^20000$' "$T/log.txt" ||
	fail "the streamed log lacks the step's output"
g 'd["steps"]' | grep -q "'done'" || fail "no step event reached done: $(g 'd["steps"]')"
[ "$(g 'd["image"]["image_id"]')" = "$IID" ] || fail "GetImage over gRPC: $(g 'd["image"]')"
ok "grpcio over h2c: health (no token), UNAUTHENTICATED, INVALID_ARGUMENT naming the field, NOT_FOUND;" \
	"gzip BuildImage, WatchBuild to READY: $(g 'd["log_len"]') log bytes without a gap, step events; GetImage"

# -- buf curl: three protocols, schema and reflection, unary and streaming --
last_status() { # FILE: the status of the last JSON document in a buf curl output
	$PY -c '
import json, sys
s, docs, i = open(sys.argv[1]).read(), [], 0
dec = json.JSONDecoder()
while True:
    while i < len(s) and s[i].isspace():
        i += 1
    if i >= len(s):
        break
    d, i = dec.raw_decode(s, i)
    docs.append(d)
last = docs[-1]
print(len(docs), (last.get("build") or last).get("status"))' "$1"
}
for protocol in connect grpc grpcweb; do
	h2=""
	[ "$protocol" = grpc ] && h2=--http2-prior-knowledge
	for how in schema reflect; do
		if [ "$how" = schema ]; then
			set -- --schema "$TOP/proto" $h2
		else
			set -- --http2-prior-knowledge --reflect-header "$AUTH"
		fi
		"$BUF" curl "$@" --protocol "$protocol" -H "$AUTH" -d "{\"build_id\": \"$BID\"}" \
			"$URL/imagebuilder.v1.ImageBuilder/GetBuild" > "$T/u.json" 2>"$T/err" ||
			fail "buf curl $protocol ($how) GetBuild: $(cat "$T/err")"
		[ "$(json_get "$T/u.json" 'd["status"]')" = READY ] || fail "buf curl $protocol ($how): $(cat "$T/u.json")"
		"$BUF" curl "$@" --protocol "$protocol" -H "$AUTH" -d "{\"build_id\": \"$BID\"}" \
			"$URL/imagebuilder.v1.ImageBuilder/WatchBuild" > "$T/s.json" 2>"$T/err" ||
			fail "buf curl $protocol ($how) WatchBuild: $(cat "$T/err")"
		set -- $(last_status "$T/s.json")
		[ "$2" = READY ] && [ "$1" -ge 2 ] || fail "buf curl $protocol ($how) WatchBuild: $1 messages, last $2"
	done
done
ok "buf curl: connect, grpc and grpcweb, with the schema and with reflection: GetBuild, and WatchBuild streams to READY"

"$BUF" curl --protocol grpc --http2-prior-knowledge --schema "$TOP/proto" -d "{\"build_id\": \"$BID\"}" \
	"$URL/imagebuilder.v1.ImageBuilder/GetBuild" > /dev/null 2>"$T/err" && fail "gRPC without a token passed"
grep -qi unauthenticated "$T/err" || fail "gRPC without a token: $(cat "$T/err")"
# (a copy: proto/buf.yaml keeps proto/grpc out of the module)
mkdir -p "$T/health" && cp "$TOP/proto/grpc/health/v1/health.proto" "$T/health/"
"$BUF" curl --protocol grpc --http2-prior-knowledge --schema "$T/health/health.proto" \
	"$URL/grpc.health.v1.Health/Check" > "$T/h.json" 2>"$T/err" || fail "health over gRPC: $(cat "$T/err")"
[ "$(json_get "$T/h.json" 'd["status"]')" = SERVING ] || fail "health: $(cat "$T/h.json")"
"$BUF" curl --protocol grpc --http2-prior-knowledge --list-methods "$URL" > /dev/null 2>&1 &&
	fail "reflection without a token passed"
"$BUF" curl --protocol grpc --http2-prior-knowledge --reflect-header "$AUTH" --list-methods "$URL" > "$T/methods" ||
	fail "reflection: list-methods"
for m in BuildImage GetBuild CancelBuild GetImage WatchBuild; do
	grep -qx "imagebuilder.v1.ImageBuilder/$m" "$T/methods" || fail "reflection lists no $m: $(cat "$T/methods")"
done
grep -qx grpc.health.v1.Health/Watch "$T/methods" || fail "reflection lists no Health/Watch"
"$BUF" curl --protocol grpc --http2-prior-knowledge --reflect-header "$AUTH" --reflect-protocol grpc-v1alpha \
	--list-methods "$URL" > "$T/methods1a" || fail "reflection v1alpha: list-methods"
cmp -s "$T/methods" "$T/methods1a" || fail "reflection v1alpha lists other methods: $(cat "$T/methods1a")"
ok "gRPC without a token: unauthenticated; health needs none; reflection (v1 and v1alpha) needs the token" \
	"and lists every method"

# gRPC with the JSON codec (application/grpc+json), by hand: the message, then the status in the trailers
printf '{"build_id": "%s"}' "$BID" > "$T/gj.json"
$PY -c 'import struct, sys; m = open(sys.argv[1], "rb").read(); sys.stdout.buffer.write(b"\0" + struct.pack(">I", len(m)) + m)' \
	"$T/gj.json" > "$T/gj.bin"
curl -s --http2-prior-knowledge -X POST -H 'Content-Type: application/grpc+json' -H 'TE: trailers' -H "$AUTH" \
	--data-binary @"$T/gj.bin" -D "$T/gj.hdr" -o "$T/gj.out" "$URL/imagebuilder.v1.ImageBuilder/GetBuild" ||
	fail "curl gRPC+JSON"
grep -qi '^content-type: application/grpc+json' "$T/gj.hdr" && grep -qi '^grpc-status: 0' "$T/gj.hdr" ||
	fail "gRPC+JSON headers and trailers: $(cat "$T/gj.hdr")"
tail -c +6 "$T/gj.out" > "$T/gj.msg"
[ "$(json_get "$T/gj.msg" 'd["status"]')" = READY ] || fail "gRPC+JSON answered $(cat "$T/gj.msg")"
curl -s --http2-prior-knowledge -X POST -H 'Content-Type: application/grpc+json' -H 'TE: trailers' -H "$AUTH" \
	--data-binary '' -D "$T/gj.hdr" -o /dev/null "$URL/imagebuilder.v1.ImageBuilder/GetBuild"
grep -qi '^grpc-status: 3' "$T/gj.hdr" && grep -qi '^grpc-message: request: no message' "$T/gj.hdr" ||
	fail "gRPC without a message: $(cat "$T/gj.hdr")"
ok "gRPC+JSON by hand: the message, grpc-status 0 in the trailers; no message: trailers-only grpc-status 3"

# -- connect-es, binary and JSON --
cp "$TOP/tests/fixtures/rpc/connect-es.mjs" "$IB_TEST_BUILD/npm/connect-es.mjs"
for format in binary json; do
	node "$IB_TEST_BUILD/npm/connect-es.mjs" "$URL" "$TOKEN" "$IB_TEST_BUILD/gen/imagebuilder.desc" "$BID" "$format" \
		> "$T/es.txt" 2>"$T/err" || fail "connect-es ($format): $(cat "$T/err" "$T/es.txt")"
	$PY - "$T/es.txt" "$BID" <<'PYEOF' || fail "connect-es ($format): $(cat "$T/es.txt")"
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
got = {k: v for l in lines for k, v in l.items()}
assert got["getBuild"]["build_id"] == sys.argv[2] and got["getBuild"]["status"] == "READY", got["getBuild"]
assert got["notFound"] == "not_found", got
assert got["invalid"] == "invalid_argument" and "spec.base" in got["message"], got
assert got["watch"] >= 2 and got["final"] == 3, got  # READY = 3
assert got["logBytes"] == got["logBytesAnswered"], got
PYEOF
done
ok "connect-es, binary and JSON: GetBuild, not_found, invalid_argument naming the field, WatchBuild to READY"

# -- by hand: gRPC-Web text, Connect streaming errors, out_of_range --
$PY - "$URL" "$TOKEN" "$BID" <<'PYEOF' || fail "framed protocols by hand"
import base64, http.client, json, re, struct, sys, urllib.parse
u = urllib.parse.urlparse(sys.argv[1])
token, bid = sys.argv[2], sys.argv[3]
def call(path, ctype, body, headers=None):
    c = http.client.HTTPConnection(u.hostname, u.port)
    h = {"Content-Type": ctype}
    h.update(headers or {})
    c.request("POST", path, body=body, headers=h)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, r.getheader("Content-Type"), data
def frames(data):
    out = []
    while data:
        flags, n = struct.unpack(">BI", data[:5])
        out.append((flags, data[5:5 + n]))
        data = data[5 + n:]
    return out
# GetBuildRequest{build_id}: field 1, length-delimited
msg = b"\x0a\x20" + bid.encode()
auth = {"Authorization": "Bearer " + token}
st, ct, data = call("/imagebuilder.v1.ImageBuilder/GetBuild", "application/grpc-web-text",
                    base64.b64encode(b"\0" + struct.pack(">I", len(msg)) + msg), auth)
# each message is a padded base64 piece of its own (as Envoy's gRPC-Web filter sends them)
pieces = re.findall(rb"[A-Za-z0-9+/]*=*", data)
fr = frames(b"".join(base64.b64decode(p) for p in pieces if p))
assert st == 200 and ct.startswith("application/grpc-web-text"), (st, ct)
assert fr[0][0] == 0 and bid.encode() in fr[0][1], fr
assert fr[-1][0] == 0x80 and b"grpc-status:0" in fr[-1][1], fr
st, ct, data = call("/imagebuilder.v1.ImageBuilder/GetBuild", "application/grpc-web+proto",
                    b"\0" + struct.pack(">I", len(msg)) + msg)
fr = frames(data)
assert st == 200 and fr[-1][0] == 0x80 and b"grpc-status:16" in fr[-1][1], fr
# Connect streaming: an unknown build ends the stream with not_found
req = json.dumps({"build_id": "f" * 32}).encode()
st, ct, data = call("/imagebuilder.v1.ImageBuilder/WatchBuild", "application/connect+json",
                    b"\0" + struct.pack(">I", len(req)) + req, auth)
fr = frames(data)
assert st == 200 and ct == "application/connect+json" and fr[-1][0] == 2, (st, ct, fr)
assert json.loads(fr[-1][1])["error"]["code"] == "not_found", fr
req = json.dumps({"build_id": bid, "log_offset": 1 << 40}).encode()
st, ct, data = call("/imagebuilder.v1.ImageBuilder/WatchBuild", "application/connect+json",
                    b"\0" + struct.pack(">I", len(req)) + req, auth)
assert json.loads(frames(data)[-1][1])["error"]["code"] == "out_of_range", data
# WatchBuild from an offset: the log from there on
req = json.dumps({"build_id": bid, "log_offset": 10}).encode()
st, ct, data = call("/imagebuilder.v1.ImageBuilder/WatchBuild", "application/connect+json",
                    b"\0" + struct.pack(">I", len(req)) + req, auth)
msgs = [json.loads(m) for f, m in frames(data) if f == 0]
logs = [m["log"] for m in msgs if "log" in m]
assert logs and logs[0]["offset"] == 10, logs[:1]
assert json.loads(frames(data)[-1][1]) == {}, data[-50:]
# a unary method on Connect unary, a streaming one refused there
st, ct, data = call("/imagebuilder.v1.ImageBuilder/WatchBuild", "application/json", req, auth)
assert st == 415, (st, data)
PYEOF
ok "gRPC-Web text and binary (trailer frames, grpc-status 0 and 16); Connect streaming: not_found, out_of_range," \
	"log_offset, end-stream {}; WatchBuild over Connect unary 415"

# -- hostile clients (each seen to hurt the daemon before its fix) --
# bytes that are not UTF-8 in the path, before the token is checked, once aborted the daemon
code=$(curl -s -o "$T/bad.bin" -w '%{http_code}' -X POST -H 'Content-Type: application/connect+json' "$URL/%FF%FE")
[ "$code" = 200 ] && [ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/healthz")" = 200 ] ||
	fail "a path that is not UTF-8 over Connect streaming: HTTP $code, then the daemon is down"
# a streaming client that goes away is noticed (no socket left in CLOSE-WAIT, the request logged)
for i in 1 2 3; do
	printf '\0\0\0\0\0' | curl -s -m 1 -X POST -H 'Content-Type: application/grpc-web+proto' --data-binary @- \
		"$URL/grpc.health.v1.Health/Watch" > /dev/null
done
sleep 1
[ "$(ss -Htn state close-wait "( sport = :${URL##*:} )" | wc -l)" = 0 ] ||
	fail "streams whose clients left are still open: $(ss -tn state close-wait)"
# reflection over Connect unary is one request, one answer
curl -s -m 5 -X POST -H 'Content-Type: application/json' -H "$AUTH" -d '{"listServices": ""}' \
	"$URL/grpc.reflection.v1.ServerReflection/ServerReflectionInfo" > "$T/refl.json" ||
	fail "reflection over Connect unary did not complete"
grep -q imagebuilder.v1.ImageBuilder "$T/refl.json" || fail "reflection over Connect unary: $(cat "$T/refl.json")"
# half a preface, held: the acceptor waits for the rest without spinning
ticks() { awk '{print $14 + $15}' "/proc/$SERVE_PID/stat"; }
before=$(ticks)
$PY -c 'import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.send(b"PRI * HTTP/2.0\r\n")
time.sleep(2)' "${URL##*:}"
used=$(( $(ticks) - before ))
[ "$used" -lt 50 ] || fail "half an HTTP/2 preface held for 2 s cost the daemon $used CPU ticks"
ok "hostile clients: a path that is not UTF-8, streams whose clients left, reflection over Connect unary," \
	"half a preface ($used ticks in 2 s): the daemon serves on"

# -- CancelBuild over HTTP/2 waits for the running build to stop --
slow="{\"spec\": {\"base\": \"debian_amd64\", \"disk_size\": \"256M\", \"steps\": [{\"run_commands\": [\"sleep 60 # $NONCE\"]}]}}"
"$BUF" curl --protocol grpc --http2-prior-knowledge --schema "$TOP/proto" -H "$AUTH" -d "$slow" \
	"$URL/imagebuilder.v1.ImageBuilder/BuildImage" > "$T/slow.json" 2>"$T/err" || fail "slow BuildImage: $(cat "$T/err")"
SID=$(json_get "$T/slow.json" 'd["build_id"]')
wait_build "$SID" BUILDING 120
"$BUF" curl --protocol grpc --http2-prior-knowledge --schema "$TOP/proto" -H "$AUTH" -d "{\"build_id\": \"$SID\"}" \
	"$URL/imagebuilder.v1.ImageBuilder/WatchBuild" > "$T/sw.json" 2>"$T/sw.err" &
WPID=$!
CLEANUP="$CLEANUP $WPID"
sleep 1
"$BUF" curl --protocol grpc --http2-prior-knowledge --schema "$TOP/proto" -H "$AUTH" -d "{\"build_id\": \"$SID\"}" \
	"$URL/imagebuilder.v1.ImageBuilder/CancelBuild" > "$T/c.json" 2>"$T/err" || fail "CancelBuild: $(cat "$T/err")"
[ "$(json_get "$T/c.json" 'd["status"]')" = CANCELLED ] || fail "CancelBuild over gRPC answered $(cat "$T/c.json")"
wait "$WPID" || fail "WatchBuild of the cancelled build: $(cat "$T/sw.err")"
set -- $(last_status "$T/sw.json")
[ "$2" = CANCELLED ] || fail "WatchBuild of the cancelled build ended $2"
ok "CancelBuild over gRPC waited for the running build: CANCELLED; a WatchBuild of it ended CANCELLED"

serve_stop
[ "$SERVE_RC" = 0 ] || fail "serve exited $SERVE_RC: $(grep -v '^{' "$SERVE_LOG" | head -40)"
grep -q '"protocol":"grpc","http":"2"' "$SERVE_LOG" || fail "the request log names no gRPC request"
ok "the request log names each request's protocol and HTTP version"

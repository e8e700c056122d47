# A real debian_amd64 build with all four step kinds, then the cache at work:
# a rebuild that is all hits, a changed last step that reuses every earlier
# layer, ids that ignore key order and aliases, inspect/ls/export.
. "$(dirname "$0")/lib.sh"
C="$SHARED_CACHE"

$PY "$TOP/tests/fixtures/pyindex.py" wheel "$T/wheels" ibtest 1.0 >/dev/null
start_pyindex "$T/wheels"

cat > "$T/spec.json" <<'JSON'
{
  "base": "debian_amd64",
  "steps": [
    {"apt_install": ["python3-pip"]},
    {"env": {"APP_ENV": "test", "GREETING": "hello world"}},
    {"pip_install": ["ibtest==1.0"]},
    {"run_commands": [
      "echo \"$GREETING\" > /hello.txt",
      "python3 -c 'import ibtest; print(ibtest.hello())' > /ibtest.txt",
      "useradd -m app"
    ]}
  ]
}
JSON
"$IB" build --cache-dir "$C" --json -o "$T/out.ext4" "$T/spec.json" >"$T/b1.json" 2>"$T/b1.log" ||
	fail "build failed: $(tail -20 "$T/b1.log")"
id=$(json_get "$T/b1.json" 'd["image_id"]')
echo "$id" | grep -qE '^[0-9a-f]{64}$' || fail "bad image id '$id'"
[ "$(json_get "$T/b1.json" 'd["status"]')" = ready ] || fail "status not ready"
[ "$(json_get "$T/b1.json" 'len(d["layers"])')" = 5 ] || fail "expected 5 layers"
[ "$(json_get "$T/b1.json" '",".join(l["kind"] for l in d["layers"])')" = "base,apt_install,env,pip_install,run_commands" ] ||
	fail "layer kinds: $(json_get "$T/b1.json" 'd["layers"]')"
[ "$(json_get "$T/b1.json" 'd["ext4_sha256"]')" = "$(sha256sum "$T/out.ext4" | cut -d' ' -f1)" ] ||
	fail "ext4_sha256 does not match the output file"
[ "$(json_get "$T/b1.json" 'd["ext4_bytes"]')" = "$(stat -c %s "$T/out.ext4")" ] || fail "ext4_bytes wrong"
ok "build --json: id, status, 5 layers, sha256 and size of $T/out.ext4"

fsck_clean "$T/out.ext4"
ok "e2fsck -fn clean"
[ "$(img_cat "$T/out.ext4" /hello.txt)" = "hello world" ] || fail "/hello.txt: '$(img_cat "$T/out.ext4" /hello.txt)'"
[ "$(img_cat "$T/out.ext4" /ibtest.txt)" = "hello from ibtest 1.0" ] || fail "pip package did not import"
img_cat "$T/out.ext4" /etc/passwd | grep -q '^app:' || fail "useradd did not add app"
img_exists "$T/out.ext4" /home/app || fail "/home/app missing"
img_cat "$T/out.ext4" /etc/environment | grep -qx 'APP_ENV="test"' || fail "/etc/environment: $(img_cat "$T/out.ext4" /etc/environment)"
img_cat "$T/out.ext4" /etc/environment | grep -qx 'GREETING="hello world"' || fail "GREETING not in /etc/environment"
img_cat "$T/out.ext4" /etc/imagebuilder/image.json > "$T/image.json"
[ "$(json_get "$T/image.json" 'd["image_id"]')" = "$id" ] || fail "image.json has the wrong image id"
[ "$(json_get "$T/image.json" 'd["env"]["APP_ENV"]')" = test ] || fail "image.json env"
img_exists "$T/out.ext4" /usr/bin/pip3 || fail "python3-pip not installed"
if img_exists "$T/out.ext4" /var/log/dpkg.log; then fail "build log /var/log/dpkg.log left in the image"; fi
[ -z "$(debugfs -R 'ls -p /var/lib/apt/lists' "$T/out.ext4" 2>/dev/null | tr '/' '\n' | grep Packages)" ] ||
	fail "apt lists left in the image"
ok "image content: files from every step kind, env, metadata; no apt lists or dpkg log"
apparent=$(stat -c %s "$T/out.ext4"); ondisk=$(( $(stat -c %b "$T/out.ext4") * 512 ))
[ "$ondisk" -lt "$apparent" ] || fail "image is not sparse ($ondisk of $apparent bytes allocated)"
ok "image is sparse: $ondisk of $apparent bytes allocated"

"$IB" build --cache-dir "$C" --json "$T/spec.json" >"$T/b2.json" 2>"$T/b2.log" || fail "rebuild failed"
[ "$(json_get "$T/b2.json" 'd["image_id"]')" = "$id" ] || fail "rebuild gave another id"
[ "$(json_get "$T/b2.json" 'all(l["cached"] for l in d["layers"])')" = True ] || fail "rebuild was not all cache hits"
ok "rebuild: same id, every layer cached"

# Same spec: other key order, white space and the base alias.
printf '{"steps":[{"apt_install":["python3-pip"]},{"env":{"GREETING":"hello world","APP_ENV":"test"}},{"pip_install":["ibtest==1.0"]},{"run_commands":["echo \\"$GREETING\\" > /hello.txt","python3 -c '"'"'import ibtest; print(ibtest.hello())'"'"' > /ibtest.txt","useradd -m app"]}],   "base":"debian_amd"}' > "$T/spec2.json"
[ "$("$IB" build --cache-dir "$C" "$T/spec2.json" 2>/dev/null)" = "$id" ] || fail "key order / alias changed the id"
ok "key order, white space and alias do not change the id"

# A last step no earlier run built (the shared cache outlives test runs).
sed "s/useradd -m app/useradd -m app2 # $(date +%s%N)/" "$T/spec.json" > "$T/spec3.json"
"$IB" build --cache-dir "$C" --json "$T/spec3.json" >"$T/b3.json" 2>"$T/b3.log" || fail "changed build failed: $(tail "$T/b3.log")"
[ "$(json_get "$T/b3.json" '[l["cached"] for l in d["layers"]]')" = "[True, True, True, True, False]" ] ||
	fail "changed last step: $(json_get "$T/b3.json" '[l["cached"] for l in d["layers"]]')"
id3=$(json_get "$T/b3.json" 'd["image_id"]')
[ "$id3" != "$id" ] || fail "changed step kept the image id"
[ "$(json_get "$T/b3.json" 'd["layers"][3]["key"]')" = "$(json_get "$T/b1.json" 'd["layers"][3]["key"]')" ] ||
	fail "earlier keys changed"
ok "changed last step: layers 0-3 reused, only the last rebuilt, new id"

"$IB" build --cache-dir "$C" --json --force "$T/spec3.json" >"$T/b4.json" 2>"$T/b4.log" || fail "--force failed: $(tail "$T/b4.log")"
[ "$(json_get "$T/b4.json" '[l["cached"] for l in d["layers"]]')" = "[True, False, False, False, False]" ] ||
	fail "--force: $(json_get "$T/b4.json" '[l["cached"] for l in d["layers"]]')"
[ "$(json_get "$T/b4.json" 'd["image_id"]')" = "$id3" ] || fail "--force changed the id"
ok "--force rebuilds every step (the base is reused), same id"

"$IB" inspect --cache-dir "$C" "$id" > "$T/inspect.json" || fail "inspect failed"
[ "$(json_get "$T/inspect.json" 'd["image_id"]')" = "$id" ] || fail "inspect: wrong id"
[ "$(json_get "$T/inspect.json" 'd["ext4_sha256"]')" = "$(json_get "$T/b1.json" 'd["ext4_sha256"]')" ] || fail "inspect: sha"
"$IB" ls --cache-dir "$C" | grep -q "^$id " || fail "ls does not list $id"
"$IB" ls --cache-dir "$C" | grep -q "^$id3 " || fail "ls does not list $id3"
ok "inspect and ls"

"$IB" export --cache-dir "$C" "$id" -o "$T/exp.ext4" || fail "export -o failed"
cmp -s "$T/exp.ext4" "$T/out.ext4" || fail "export -o differs from the build output"
"$IB" export --cache-dir "$C" "$(echo "$id" | cut -c1-12)" --tar "$T/exp.tar" || fail "export --tar failed"
tar -tf "$T/exp.tar" > "$T/tar.list" || fail "tar cannot read the export"
grep -qE '^(\./)?hello.txt$' "$T/tar.list" || fail "tar lacks hello.txt"
grep -qE '^(\./)?etc/imagebuilder/image.json$' "$T/tar.list" || fail "tar lacks image.json"
[ "$(tar -xOf "$T/exp.tar" ./hello.txt 2>/dev/null || tar -xOf "$T/exp.tar" hello.txt)" = "hello world" ] ||
	fail "tar hello.txt content"
expect_status 1 "$IB" export --cache-dir "$C" 0123456789abcdef -o "$T/none.ext4" 2>/dev/null
ok "export -o (same bytes), export --tar (by id prefix), unknown id fails"

cache_sound "$C"
ok "cache verify passes"

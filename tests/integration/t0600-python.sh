# The pinned python: a python-build-standalone-style archive made here (from
# Debian's python3, with a marker module), served with a PEP 503 index on
# 127.0.0.1; the image's python3/pip3 must be the pin (the marker imports, no
# Debian python3 is installed), pip_install and cloudpickle must import with
# it, and a wrong digest must fail with nothing cached.
. "$(dirname "$0")/lib.sh"
C="$SHARED_CACHE"

# The archive: Debian's own python3 laid out the python-build-standalone way
# (tests/fixtures/pbs-archive.sh), with a marker module only it has; one
# more entry (3.12.77) names a wrong digest.
python_fixture
python_archive "$(/usr/bin/python3 -c 'import platform; print(platform.python_version())')" "t0600-$$"
V=$PBS_VERSION
A=$PBS_ARCHIVE
digest=$PBS_DIGEST
cp "$A" "$T/mirror/$PBS_REL/cpython-3.12.77+$PBS_REL-$(uname -m)-unknown-linux-gnu-install_only.tar.gz"
$PY - "$T/versions.json" "$PBS_REL" "$(uname -m)" <<'PY'
import json, sys
path, release, machine = sys.argv[1:]
table = json.load(open(path))
table["3.12.77"] = {"release": release, "sha256": {machine: "0" * 64}}
json.dump(table, open(path, "w"))
PY
ok "made $(basename "$A") ($(du -h "$A" | cut -f1)) from Debian's python3 $V"

$PY "$TOP/tests/fixtures/pyindex.py" wheel "$T/wheels" ibtest 1.0 >/dev/null

cat > "$T/spec.json" <<JSON
{"base": "debian_amd64", "python_version": "$V", "steps": [
  {"pip_install": ["ibtest==1.0"]},
  {"run_commands": [
    "python3 --version > /pyver.txt",
    "pip3 --version > /pipver.txt",
    "python3 -c 'import cloudpickle, ibtest; print(ibtest.hello()); print(cloudpickle.loads(cloudpickle.dumps(lambda x: x + 1))(41))' > /imports.txt",
    "python3 -c 'import sys, ib_pbs_marker; print(ib_pbs_marker.MARKER, sys.executable)' > /marker.txt",
    "command -v python3 > /which.txt"
  ]}
]}
JSON
"$IB" build --cache-dir "$C" --json -o "$T/out.ext4" "$T/spec.json" >"$T/b.json" 2>"$T/b.log" ||
	fail "build failed: $(tail -20 "$T/b.log")"
[ "$(json_get "$T/b.json" '",".join(l["kind"] for l in d["layers"])')" = "base,python,pip_install,run_commands" ] ||
	fail "layers: $(json_get "$T/b.json" '[l["kind"] for l in d["layers"]]')"
fsck_clean "$T/out.ext4"
[ "$(img_cat "$T/out.ext4" /pyver.txt)" = "Python $V" ] || fail "python3 --version: '$(img_cat "$T/out.ext4" /pyver.txt)'"
img_cat "$T/out.ext4" /pipver.txt | grep -q "python ${V%.*}" || fail "pip3 is not the pinned python's: $(img_cat "$T/out.ext4" /pipver.txt)"
[ "$(img_cat "$T/out.ext4" /marker.txt)" = "t0600-$$ /usr/local/bin/python3" ] ||
	fail "python3 in the image is not the archive's: '$(img_cat "$T/out.ext4" /marker.txt)'"
[ "$(img_cat "$T/out.ext4" /which.txt)" = /usr/local/bin/python3 ] || fail "python3 on PATH: $(img_cat "$T/out.ext4" /which.txt)"
img_exists "$T/out.ext4" /usr/bin/python3 && fail "Debian's python3 was installed into the image"
[ "$(img_cat "$T/out.ext4" /imports.txt)" = "$(printf 'hello from ibtest 1.0\n42')" ] ||
	fail "imports: '$(img_cat "$T/out.ext4" /imports.txt)'"
img_exists "$T/out.ext4" /usr/local/bin/python3 || fail "no /usr/local/bin/python3"
img_cat "$T/out.ext4" /etc/imagebuilder/image.json | grep -q "\"python_version\": \"$V\"" || fail "image.json lacks the pin"
ok "python3 and pip3 are $V from the archive; pip_install and cloudpickle work with it"
[ -f "$C/downloads/$digest.tar.gz" ] || fail "the archive is not in the download store"

printf '{"base": "debian_amd64", "python_version": "%s", "steps": [{"run_commands": ["true"]}]}' "$V" > "$T/spec2.json"
"$IB" build --cache-dir "$C" --json "$T/spec2.json" >"$T/b2.json" 2>"$T/b2.log" || fail "second build failed"
[ "$(json_get "$T/b2.json" 'd["layers"][1]["cached"]')" = True ] || fail "the python layer was not shared"
[ "$(json_get "$T/b2.json" 'd["layers"][1]["key"]')" = "$(json_get "$T/b.json" 'd["layers"][1]["key"]')" ] || fail "python key differs"
ok "another spec with the same base and version shares the python layer"

n=$(ls "$C/layers" | wc -l)
printf '{"base": "debian_amd64", "python_version": "3.12.77", "steps": [{"run_commands": ["true"]}]}' > "$T/bad.json"
"$IB" build --cache-dir "$C" "$T/bad.json" >/dev/null 2>"$T/bad.log" && fail "a wrong digest was accepted"
grep -q "SHA-256" "$T/bad.log" || fail "the message does not say the digest is wrong: $(tail -2 "$T/bad.log")"
[ "$(ls "$C/layers" | wc -l)" = "$n" ] || fail "a layer was cached from a wrong archive"
ls "$C/downloads" | grep -q part && fail "a partial download was left"
cache_sound "$C"
ok "a wrong digest fails the build, says so, caches nothing"

printf '{"base": "debian_amd64", "python_version": "3.1.4"}' > "$T/unknown.json"
expect_status 2 "$IB" build --cache-dir "$C" "$T/unknown.json" 2>"$T/u.log"
grep -q python_version "$T/u.log" || fail "unknown version message"
ok "an unknown version is a bad spec (exit 2)"

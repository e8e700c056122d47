# Shared helpers for integration tests (sourced).  Every test:
#   - builds with $IB against a cache dir; the shared one ($SHARED_CACHE)
#     keeps the base layer between tests, so only the first test pays for it;
#   - cleans up what it starts and creates (trap);
#   - says what it checked, and fails with a message naming the check.
set -u
: "${IB:?run through tests/run.sh}"
: "${IB_TEST_BUILD:?run through tests/run.sh}"
TOP=$(cd "$(dirname "$IB")/.." && pwd)
SHARED_CACHE="$IB_TEST_BUILD/test-cache"
PY=/usr/bin/python3
T=$(mktemp -d /tmp/ib-test.XXXXXX)
CLEANUP=""

cleanup() {
	for pid in $CLEANUP; do kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
	rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
ok() { printf '  ok: %s\n' "$*"; }

# expect_status WANT CMD...: run CMD, fail unless it exits WANT
expect_status() {
	want=$1; shift
	"$@"; got=$?
	[ "$got" = "$want" ] || fail "'$*' exited $got, expected $want"
}

# wait_file FILE WHAT LOG: wait (10 s at most) until a server started in the
# background writes FILE (its port); fail naming WHAT, with LOG, if it does not
wait_file() {
	_i=0
	while [ ! -s "$1" ]; do
		_i=$((_i + 1)); [ $_i -gt 100 ] && fail "$2 did not start: $(cat "$3")"
		sleep 0.1
	done
}

# start_pyindex DIR: serve DIR/*.whl on 127.0.0.1; sets PIP_URL
start_pyindex() {
	$PY "$TOP/tests/fixtures/pyindex.py" serve "$1" "$T/pyindex.port" 2>"$T/pyindex.log" &
	CLEANUP="$CLEANUP $!"
	wait_file "$T/pyindex.port" pyindex "$T/pyindex.log"
	PIP_URL="http://127.0.0.1:$(cat "$T/pyindex.port")/simple/"
	export IMAGEBUILDER_PIP_INDEX_URL="$PIP_URL"
}

# start_static DIR: serve DIR's files on 127.0.0.1; prints the base URL
start_static() {
	$PY "$TOP/tests/fixtures/pyindex.py" static "$1" "$T/static.port" 2>"$T/static.log" &
	CLEANUP="$CLEANUP $!"
	wait_file "$T/static.port" "static server" "$T/static.log"
	STATIC_URL="http://127.0.0.1:$(cat "$T/static.port")"
}

# json_get FILE EXPR: a value from a JSON document (python expression on d)
json_get() { $PY -c "import json,sys; d=json.load(open(sys.argv[1])); print($2)" "$1"; }

# img_cat IMAGE PATH: a file's content from an ext4 image (debugfs)
img_cat() { debugfs -R "cat $2" "$1" 2>/dev/null; }

# img_exists IMAGE PATH: does PATH exist in the image?
img_exists() { debugfs -R "stat $2" "$1" 2>&1 | grep -q '^Inode:'; }

# fsck_clean IMAGE: e2fsck -fn finds nothing
fsck_clean() {
	e2fsck -fn "$1" >"$T/fsck.log" 2>&1 || fail "e2fsck -fn $1: $(cat "$T/fsck.log")"
}

# cache_sound DIR: verify passes, and tmp/ holds no scratch of a dead build
# (a live build's scratch is locked by it)
cache_sound() {
	"$IB" cache verify --cache-dir "$1" >"$T/verify.log" 2>&1 || fail "cache verify: $(cat "$T/verify.log")"
	for d in "$1"/tmp/*; do
		case "$d" in *.lock|*/\*) continue ;; esac
		if [ ! -e "$d.lock" ] || flock -n "$d.lock" true; then
			fail "scratch of a dead build left in $1/tmp: $d"
		fi
	done
}

# python_fixture: a python-build-standalone-style mirror and version table
# made from Debian's python3 (tests/fixtures/pbs-archive.sh), and a PEP 503
# index with cloudpickle; exports IMAGEBUILDER_PYTHON_MIRROR and
# IMAGEBUILDER_PYTHON_VERSIONS and starts the index (start_pyindex).
# python_archive VERSION MARKER adds one archive (own digest) for VERSION to
# the mirror and the table.  PBS_VERSION is the interpreter's own version.
python_fixture() {
	PBS_REL=20990101
	mkdir -p "$T/mirror/$PBS_REL" "$T/deb" "$T/wheels"
	echo '{}' > "$T/versions.json"
	(cd "$T/deb" && { apt-get download python3-cloudpickle >/dev/null 2>&1 ||
		{ apt-get update -qq && apt-get download python3-cloudpickle >/dev/null; }; }) ||
		fail "cannot get python3-cloudpickle"
	dpkg-deb -x "$T"/deb/python3-cloudpickle_*.deb "$T/deb/x"
	cpv=$(dpkg-deb -f "$T"/deb/python3-cloudpickle_*.deb Version | sed 's/-.*//')
	$PY "$TOP/tests/fixtures/pyindex.py" wheel-from-dir "$T/wheels" cloudpickle "$cpv" \
		"$T/deb/x/usr/lib/python3/dist-packages/cloudpickle" >/dev/null
	start_pyindex "$T/wheels"
	start_static "$T/mirror"
	export IMAGEBUILDER_PYTHON_MIRROR="$STATIC_URL"
	export IMAGEBUILDER_PYTHON_VERSIONS="$T/versions.json"
}

python_archive() {
	"$TOP/tests/fixtures/pbs-archive.sh" "$T/pbs.tar.gz" "$2" >"$T/pbs.version" 2>"$T/pbs.log" ||
		fail "cannot make a test archive: $(cat "$T/pbs.log")"
	PBS_VERSION=$(cat "$T/pbs.version")
	PBS_ARCHIVE="$T/mirror/$PBS_REL/cpython-$1+$PBS_REL-$(uname -m)-unknown-linux-gnu-install_only.tar.gz"
	mv "$T/pbs.tar.gz" "$PBS_ARCHIVE"
	PBS_DIGEST=$(sha256sum "$PBS_ARCHIVE" | cut -d' ' -f1)
	$PY - "$T/versions.json" "$1" "$PBS_REL" "$(uname -m)" "$PBS_DIGEST" <<'PY'
import json, sys
path, version, release, machine, digest = sys.argv[1:]
table = json.load(open(path))
table.setdefault(version, {"release": release, "sha256": {}})["sha256"][machine] = digest
json.dump(table, open(path, "w"))
PY
}

# script_spec SCRIPT [BASE]: a spec whose one step runs the shell script in
# the file SCRIPT (as one run_commands line, /bin/sh -c)
script_spec() {
	$PY -c 'import json,sys; print(json.dumps({"base": sys.argv[2], "steps": [{"run_commands": [open(sys.argv[1]).read()]}]}))' \
		"$1" "${2:-debian_amd64}"
}

# npm_tool PACKAGE@VERSION BIN: a client from the npm registry, installed
# once into $IB_TEST_BUILD/npm (install-deps installs npm); prints the
# path of its BIN.  Exits 77 (skip), saying why, only when the registry
# cannot be reached.
npm_tool() {
	dir="$IB_TEST_BUILD/npm"
	if [ ! -x "$dir/node_modules/.bin/$2" ]; then
		command -v npm >/dev/null || fail "npm is not installed (scripts/install-deps.sh installs it)"
		mkdir -p "$dir"
		if ! npm install --prefix "$dir" --no-audit --no-fund --loglevel=error "$1" >"$T/npm.log" 2>&1; then
			if grep -qiE 'ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ETIMEDOUT|ECONNRESET|network' "$T/npm.log"; then
				echo "skip: the npm registry cannot be reached: $(tail -1 "$T/npm.log")"
				exit 77
			fi
			fail "npm install $1: $(grep -v '^npm notice' "$T/npm.log" | tail -5 | tr '\n' ' ')"
		fi
	fi
	echo "$dir/node_modules/.bin/$2"
}

# npm_pkgs PACKAGE@VERSION...: libraries from the npm registry into
# $IB_TEST_BUILD/npm, once, for node scripts run from there; skips (77) as
# npm_tool does.
npm_pkgs() {
	dir="$IB_TEST_BUILD/npm"
	missing=""
	for p in "$@"; do
		[ -f "$dir/node_modules/${p%@*}/package.json" ] &&
			grep -q "\"version\": \"${p##*@}\"" "$dir/node_modules/${p%@*}/package.json" || missing="$missing $p"
	done
	[ -z "$missing" ] && return 0
	command -v npm >/dev/null || fail "npm is not installed (scripts/install-deps.sh installs it)"
	mkdir -p "$dir"
	# shellcheck disable=SC2086
	if ! npm install --prefix "$dir" --no-audit --no-fund --loglevel=error $missing >"$T/npm.log" 2>&1; then
		if grep -qiE 'ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ETIMEDOUT|ECONNRESET|network' "$T/npm.log"; then
			echo "skip: the npm registry cannot be reached: $(tail -1 "$T/npm.log")"
			exit 77
		fi
		fail "npm install$missing: $(grep -v '^npm notice' "$T/npm.log" | tail -5 | tr '\n' ' ')"
	fi
}

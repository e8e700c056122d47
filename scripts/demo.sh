#!/bin/sh
# The main job: build examples/demo.json into an ext4 image.
#
# The example's pip_install step installs 'ibdemo', a wheel made here and
# served from a PEP 503 index on 127.0.0.1, so the demo works on a machine
# without PyPI; set IMAGEBUILDER_PIP_INDEX_URL to use another index.
set -eu
BUILD=${1:-build}
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
out="$top/$BUILD/demo.ext4"
work=$(mktemp -d /tmp/ib-demo.XXXXXX)
server=""
cleanup() {
	if [ -n "$server" ]; then
		kill "$server" 2>/dev/null || true
		wait "$server" 2>/dev/null || true
	fi
	rm -rf "$work"
}
trap cleanup EXIT INT TERM

if [ -z "${IMAGEBUILDER_PIP_INDEX_URL:-}" ]; then
	/usr/bin/python3 tests/fixtures/pyindex.py wheel "$work/wheels" ibdemo 1.0 >/dev/null
	/usr/bin/python3 tests/fixtures/pyindex.py serve "$work/wheels" "$work/port" 2>"$work/index.log" &
	server=$!
	while [ ! -s "$work/port" ]; do sleep 0.1; done
	export IMAGEBUILDER_PIP_INDEX_URL="http://127.0.0.1:$(cat "$work/port")/simple/"
	echo "demo: serving the example's wheel at $IMAGEBUILDER_PIP_INDEX_URL" >&2
fi

id=$("$BUILD/imagebuilder" build examples/demo.json -o "$out")
echo "image id: $id"
echo "image:    $out"
echo "check it: e2fsck -fn $out; debugfs -R 'cat /hello.txt' $out"

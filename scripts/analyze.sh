#!/bin/sh
# make analyze: gcc's static analyzer (-fanalyzer) over every source of the
# library, the program and the init.  Fails on any warning that is not in
# tests/analyzer.supp, where each accepted one (a reviewed false positive of
# gcc 12's analyzer) is listed as FILE FUNCTION WARNING with the reason.
set -u
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
CC=${CC:-gcc}
PKGS="libarchive openssl sqlite3 ext2fs com_err jansson libcurl libgit2 libmicrohttpd libzstd libseccomp libprotobuf-c zlib"
# the generated schema code (make: $(BUILD)/gen)
flags="-std=c11 -D_GNU_SOURCE -O0 -fanalyzer -include lib/banned.h -I. -I${IB_GEN:-build/gen} $(pkg-config --cflags $PKGS)"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
n=0
for f in lib/*.c steps/*.c spec/*.c layer/*.c cache/*.c builder/*.c server/*.c cli/*.c init/*.c; do
	# shellcheck disable=SC2086
	$CC $flags -c "$f" -o /dev/null 2>&1 | awk -v file="$f" '
		/In function/ { fn = $0; sub(/.*In function [^a-zA-Z_]*/, "", fn); sub(/[^a-zA-Z0-9_].*/, "", fn) }
		/: warning: / { kind = $0; sub(/.*\[-W/, "", kind); sub(/\].*/, "", kind);
				loc = $1; sub(/:$/, "", loc); print file, fn, kind, loc }' >>"$out"
	n=$((n + 1))
done
new=0
while read -r file fn kind loc; do
	if grep -v '^#' tests/analyzer.supp | grep -qE "^$file +$fn +$kind( |$)"; then
		continue
	fi
	echo "analyze: new warning: $loc in $fn(): $kind"
	new=$((new + 1))
done <"$out"
total=$(wc -l <"$out")
echo "analyze: $n files, $total warnings, $((total - new)) of them reviewed in tests/analyzer.supp, $new new"
[ "$new" = 0 ]

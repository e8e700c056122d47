#!/bin/sh
# Time ib_ext4_write against `mke2fs -t ext4 -d` on the same tree.
#
#   bench/export.sh [TREE]        (default /tmp/mm/root; run as root)
#
# Both write a fresh image file of the same size (the size ib_ext4_write
# chose) and both sync it before they return.  Each side runs once to warm
# the page cache, then RUNS times; the best time counts.  Environment:
# BUILD (build directory, default build), RUNS (default 3), TMPDIR.
set -eu

tree=${1:-/tmp/mm/root}
build=${BUILD:-build}
runs=${RUNS:-3}
here=$(cd "$(dirname "$0")/.." && pwd)
pkgs="libarchive openssl sqlite3 ext2fs com_err jansson libzstd libseccomp libprotobuf-c zlib"

[ -d "$tree" ] || { echo "export.sh: no tree at '$tree'" >&2; exit 1; }
command -v mke2fs >/dev/null || { echo "export.sh: mke2fs not found" >&2; exit 1; }

cd "$here"
make --no-print-directory -s "$build/libimagebuilder.a"
mkdir -p "$build/bench"
# shellcheck disable=SC2046,SC2086
cc -std=c11 -D_GNU_SOURCE -O2 -g -include lib/banned.h -I. \
	$(pkg-config --cflags $pkgs) -o "$build/bench/export-bench" bench/export-bench.c \
	"$build/libimagebuilder.a" $(pkg-config --libs $pkgs) -lpthread

work=$(mktemp -d "${TMPDIR:-/tmp}/export-bench.XXXXXX")
trap 'rm -rf "$work"' EXIT INT TERM

ours() {
	rm -f "$work/ours.ext4"
	"$build/bench/export-bench" "$work/ours.ext4" "$tree" | cut -d' ' -f1
}

theirs() {
	rm -f "$work/mke2fs.ext4"
	start=$(date +%s.%N)
	mke2fs -q -F -t ext4 -b 4096 -I 256 -d "$tree" "$work/mke2fs.ext4" "${blocks}" >/dev/null
	end=$(date +%s.%N)
	awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f\n", b - a }'
}

best() {
	b=
	i=0
	while [ "$i" -lt "$runs" ]; do
		t=$("$1")
		if [ -z "$b" ] || awk -v t="$t" -v b="$b" 'BEGIN { exit !(t < b) }'; then b=$t; fi
		i=$((i + 1))
	done
	echo "$b"
}

ours >/dev/null
bytes=$(stat -c %s "$work/ours.ext4")
blocks=$((bytes / 4096))
theirs >/dev/null

t_ours=$(best ours)
t_theirs=$(best theirs)

e2fsck -fn "$work/ours.ext4" >/dev/null 2>&1 && fsck=clean || fsck="NOT CLEAN"

printf 'tree            %s (%s files, %s)\n' "$tree" "$(find "$tree" | wc -l)" \
	"$(du -sh "$tree" | cut -f1)"
printf 'image size      %s blocks of 4 KiB\n' "$blocks"
printf '%-15s %8s %12s %12s\n' "" seconds apparent on-disk
printf '%-15s %8.3f %12s %12s\n' ib_ext4_write "$t_ours" \
	"$(du -h --apparent-size "$work/ours.ext4" | cut -f1)" "$(du -h "$work/ours.ext4" | cut -f1)"
printf '%-15s %8.3f %12s %12s\n' "mke2fs -d" "$t_theirs" \
	"$(du -h --apparent-size "$work/mke2fs.ext4" | cut -f1)" "$(du -h "$work/mke2fs.ext4" | cut -f1)"
printf 'ratio           %.2f (ib_ext4_write / mke2fs -d; goal <= 0.8)\n' \
	"$(awk -v a="$t_ours" -v b="$t_theirs" 'BEGIN { print a / b }')"
printf 'e2fsck -fn      %s\n' "$fsck"

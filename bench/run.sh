#!/bin/sh
# Benchmarks (not tests): imagebuilder against the hand-written pipeline a
# user would write, side by side, on this machine.
#
#   cold         empty cache: debian_amd64 + apt_install(git, curl) -> ext4
#                vs  mmdebstrap --include=git,curl + mke2fs -d (the same
#                4 GiB file system, one inode per 16 KiB)
#   base cached  the same with only the base layer cached        (target <= 0.4x)
#   all cached   a rebuild of the same spec                      (target < 1 s)
#   export       the ext4 writer alone on that image's layers (4 GiB,
#                the default disk_size)
#                vs  mke2fs -d on the same tree, flattened, the same size
#                and inode ratio                                  (target <= 0.8x)
#   .zst         the image's .zst, made once, vs zstd -T0 -3 on the raw
#                file (target <= 1.0x), its size vs the image's allocated
#                bytes (target <= 0.6x)
#   fetch        bytes moved to fetch the image from `imagebuilder serve`:
#                raw, .zst, .zst with the bmap (bmaptool copy)
#
# BENCH_RUNS=N repeats each timing (default 1) and keeps the best.  The cold
# build and the pipeline take turns, run for run, so that a mirror or disk
# that slows down for a while slows both down.
set -eu
BUILD=${1:-build}
top=$(cd "$(dirname "$0")/.." && pwd)
IB="$top/$BUILD/imagebuilder"
RUNS=${BENCH_RUNS:-1}
W=$(mktemp -d /var/tmp/ib-bench.XXXXXX)
trap 'rm -rf "$W"' EXIT INT TERM
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1686355200}

now() { date +%s.%N; }
elapsed() { echo "$2 - $1" | bc; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
best() { # best CMD...: the fastest of RUNS runs, in seconds
	b=""
	i=0
	while [ $i -lt "$RUNS" ]; do
		s=$(now); "$@" >/dev/null 2>>"$W/bench.log"; e=$(now)
		t=$(elapsed "$s" "$e")
		if [ -z "$b" ] || [ "$(echo "$t < $b" | bc)" = 1 ]; then b=$t; fi
		i=$((i + 1))
	done
	echo "$b"
}

printf '{"base":"debian_amd64","steps":[{"apt_install":["git","curl"]}]}' > "$W/spec.json"
printf '{"base":"debian_amd64"}' > "$W/base.json"

pipeline() {
	rm -rf "$W/pipe" "$W/pipe.ext4"
	mmdebstrap --quiet --mode=root --format=directory --variant=minbase --include=ca-certificates,git,curl \
		bookworm "$W/pipe" >/dev/null 2>&1
	# the same file system imagebuilder makes: 4 GiB (the default
	# disk_size), one inode per 16 KiB
	mke2fs -q -F -t ext4 -b 4096 -I 256 -i 16384 -d "$W/pipe" "$W/pipe.ext4" 4096M
}
cold() {
	rm -rf "$W/cold"
	"$IB" build --cache-dir "$W/cold" -o "$W/cold.ext4" "$W/spec.json"
}
base_cached() {
	rm -rf "$W/warm"
	cp -a "$W/base-cache" "$W/warm"
	"$IB" build --cache-dir "$W/warm" -o "$W/warm.ext4" "$W/spec.json"
}
all_cached() { "$IB" build --cache-dir "$W/cold" "$W/spec.json"; }
all_cached_o() { rm -f "$W/again.ext4"; "$IB" build --cache-dir "$W/cold" -o "$W/again.ext4" "$W/spec.json"; }
plain_copy() { rm -f "$W/copy.ext4"; cp --sparse=always "$W/cold.ext4" "$W/copy.ext4"; }

echo "imagebuilder bench on $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -r), $(date -u +%F)"
t_pipe=""
t_cold=""
i=0
while [ $i -lt "$RUNS" ]; do
	tp=$(RUNS=1 best pipeline)
	if [ -z "$t_pipe" ] || [ "$(echo "$tp < $t_pipe" | bc)" = 1 ]; then t_pipe=$tp; fi
	tc=$(RUNS=1 best cold)
	if [ -z "$t_cold" ] || [ "$(echo "$tc < $t_cold" | bc)" = 1 ]; then t_cold=$tc; fi
	printf 'run %d: pipeline %.1fs, cold build %.1fs\n' $((i + 1)) "$tp" "$tc"
	i=$((i + 1))
done
"$IB" build --cache-dir "$W/base-cache" "$W/base.json" >/dev/null 2>>"$W/bench.log"
t_warm=$(best base_cached)
t_hit=$(best all_cached)
t_hit_o=$(best all_cached_o)
t_cp=$(best plain_copy)
id=$("$IB" build --cache-dir "$W/cold" "$W/spec.json" 2>/dev/null)

# The export alone: imagebuilder's writer from the layers, against mke2fs -d
# on the same tree flattened (the tree comes from export --tar).
mkdir -p "$W/flat"
"$IB" export --cache-dir "$W/cold" "$id" --tar "$W/flat.tar"
tar -C "$W/flat" --numeric-owner --xattrs --xattrs-include='*' -xpf "$W/flat.tar"
size=$(( $(stat -c %s "$W/cold.ext4") / 1048576 ))
t_exp=$(best "$IB" export --cache-dir "$W/cold" "$id" --from-layers -o "$W/exp.ext4")
# the same size and inode ratio (one per 16 KiB), 256-byte inodes, 4 KiB blocks
t_mke2fs=$(best sh -c "rm -f '$W/mk.ext4'; mke2fs -q -F -t ext4 -b 4096 -I 256 -i 16384 -d '$W/flat' '$W/mk.ext4' ${size}M")

# The compact forms: the .zst the cache makes once (timed on a copy of the
# cache each run, so that each run makes it), against zstd -T0 -3 on the
# raw file; then the bytes a client moves to fetch the image from
# `imagebuilder serve` on loopback: raw, .zst, bmap.
zst_ours() {
	b=""
	i=0
	while [ $i -lt "$RUNS" ]; do
		rm -rf "$W/zc"; cp -a "$W/cold" "$W/zc"; sync
		s=$(now); "$IB" export --cache-dir "$W/zc" "$id" --zstd "$W/ours.zst" 2>>"$W/bench.log"; e=$(now)
		t=$(elapsed "$s" "$e")
		if [ -z "$b" ] || [ "$(echo "$t < $b" | bc)" = 1 ]; then b=$t; fi
		i=$((i + 1))
	done
	rm -rf "$W/zc"
	echo "$b"
}
t_zst=$(zst_ours)
t_zstd=$(best zstd -q -f -T0 -3 "$W/cold.ext4" -o "$W/theirs.zst")
alloc=$(( $(stat -c %b "$W/cold.ext4") * 512 ))
z_ours=$(stat -c %s "$W/ours.zst")
z_theirs=$(stat -c %s "$W/theirs.zst")

"$IB" serve --cache-dir "$W/cold" --listen 127.0.0.1:0 --port-file "$W/port" --jobs 1 2>>"$W/bench.log" &
serve_pid=$!
i=0
while [ ! -s "$W/port" ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i + 1)); done
url="http://127.0.0.1:$(cat "$W/port")/v1/images/$id/rootfs.ext4"
fetch() { curl -s -o "$2" -w '%{size_download} %{time_total}' "$1"; }
raw_f=$(fetch "$url" "$W/got.ext4")
zst_f=$(fetch "$url.zst" "$W/got.zst")
bmap_f=$(fetch "$url.bmap" "$W/got.bmap")
kill -TERM "$serve_pid"; wait "$serve_pid" || true
mapped=$(sed -n 's/.*<MappedBlocksCount> *\([0-9]*\) *<.*/\1/p' "$W/got.bmap")
bsz=$(sed -n 's/.*<BlockSize> *\([0-9]*\) *<.*/\1/p' "$W/got.bmap")
s=$(now); bmaptool -q copy --bmap "$W/got.bmap" "$W/got.zst" "$W/flashed.ext4" 2>>"$W/bench.log"; e=$(now)
t_flash=$(elapsed "$s" "$e")
cmp -s "$W/flashed.ext4" "$W/cold.ext4" && flash_ok=identical || flash_ok=DIFFERS

printf '\n%-34s %10s %10s %8s %s\n' "case" "imagebuilder" "yardstick" "ratio" "target"
printf '%-34s %9.1fs %9.1fs %7sx %s\n' "cold build (git, curl) to ext4" "$t_cold" "$t_pipe" "$(ratio "$t_cold" "$t_pipe")" "<= 1.0x pipeline"
printf '%-34s %9.1fs %9.1fs %7sx %s\n' "base layer cached" "$t_warm" "$t_pipe" "$(ratio "$t_warm" "$t_pipe")" "<= 0.4x pipeline"
printf '%-34s %9.2fs %10s %8s %s\n' "fully cached rebuild" "$t_hit" "-" "-" "< 1 s"
printf '%-34s %9.2fs %9.2fs %7sx %s\n' "fully cached rebuild, -o OUT.ext4" "$t_hit_o" "$t_cp" "$(ratio "$t_hit_o" "$t_cp")" "vs cp --sparse of the image"
printf '%-34s %9.2fs %9.2fs %7sx %s\n' "export (${size} MiB) vs mke2fs -d" "$t_exp" "$t_mke2fs" "$(ratio "$t_exp" "$t_mke2fs")" "<= 0.8x mke2fs -d, same size and inode ratio"
printf '%-34s %9.2fs %9.2fs %7sx %s\n' ".zst (made once) vs zstd -T0 -3" "$t_zst" "$t_zstd" "$(ratio "$t_zst" "$t_zstd")" "<= 1.0x zstd -T0 -3 on the raw file"
printf '%-34s %9sM %9sM %7sx %s\n' ".zst size vs allocated bytes" "$((z_ours >> 20))" "$((alloc >> 20))" "$(ratio "$z_ours" "$alloc")" "<= 0.6x (zstd -T0 -3: $((z_theirs >> 20))M)"
printf '\n%-34s %12s %12s %s\n' "fetch from serve (loopback)" "bytes moved" "vs raw" "written to the target"
printf '%-34s %11sM %11s %s\n' "rootfs.ext4" "$(( ${raw_f% *} / 1048576 ))" "1.00x" "$(( ${raw_f% *} / 1048576 ))M"
printf '%-34s %11sM %11s %s\n' "rootfs.ext4.zst" "$(( ${zst_f% *} / 1048576 ))" "$(ratio "${zst_f% *}" "${raw_f% *}")x" "$(( ${raw_f% *} / 1048576 ))M (zstd -d)"
printf '%-34s %11sM %11s %s\n' "rootfs.ext4.zst + rootfs.ext4.bmap" "$(( (${zst_f% *} + ${bmap_f% *}) / 1048576 ))" \
	"$(ratio "$((${zst_f% *} + ${bmap_f% *}))" "${raw_f% *}")x" "$((mapped * bsz / 1048576))M (bmaptool copy: $(printf %.1f "$t_flash")s, $flash_ok)"
printf '\n%-34s %12s %12s\n' "image size" "apparent" "on disk"
printf '%-34s %11sM %11sM\n' "imagebuilder" "$(( $(stat -c %s "$W/cold.ext4") / 1048576 ))" "$(( $(stat -c %b "$W/cold.ext4") * 512 / 1048576 ))"
printf '%-34s %11sM %11sM\n' "pipeline (mke2fs -d)" "$(( $(stat -c %s "$W/pipe.ext4") / 1048576 ))" "$(( $(stat -c %b "$W/pipe.ext4") * 512 / 1048576 ))"

#!/bin/sh
# Benchmark (not a test): a cold debian_arm64 + apt_install(curl) build to ext4
# on this host (through qemu-user), against the hand-written pipeline:
# mmdebstrap --architectures=arm64 --include=curl + mke2fs -d.  Target <= 1.1x.
set -eu
BUILD=${1:-build}
top=$(cd "$(dirname "$0")/.." && pwd)
IB="$top/$BUILD/imagebuilder"
W=$(mktemp -d /var/tmp/ib-bench-arm.XXXXXX)
trap 'rm -rf "$W"' EXIT INT TERM
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1686355200}
now() { date +%s.%N; }

printf '{"base":"debian_arm64","steps":[{"apt_install":["curl"]}]}' > "$W/spec.json"
# the builder registers qemu in binfmt_misc when needed; the pipeline relies on it too
"$IB" build --cache-dir "$W/probe" "$W/spec.json" --timeout 1 >/dev/null 2>&1 || true
rm -rf "$W/probe"

s=$(now)
mmdebstrap --quiet --mode=root --format=directory --variant=minbase --architectures=arm64 \
	--include=ca-certificates,curl bookworm "$W/pipe" >/dev/null 2>&1
size=$(( $(du -sm "$W/pipe" | cut -f1) * 13 / 10 + 64 ))
mke2fs -q -F -t ext4 -d "$W/pipe" "$W/pipe.ext4" "${size}M"
t_pipe=$(echo "$(now) - $s" | bc)

s=$(now)
"$IB" build --cache-dir "$W/cache" -o "$W/ib.ext4" "$W/spec.json" >/dev/null 2>"$W/log"
t_ib=$(echo "$(now) - $s" | bc)

printf '\n%-34s %10s %10s %8s %s\n' "case" "imagebuilder" "yardstick" "ratio" "target"
printf '%-34s %9.1fs %9.1fs %7sx %s\n' "cold arm64 (curl) to ext4" "$t_ib" "$t_pipe" \
	"$(echo "scale=2; $t_ib / $t_pipe" | bc)" "<= 1.1x pipeline"

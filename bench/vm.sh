#!/bin/sh
# Benchmark (not a test): the VM runner (--runner vm) against the namespace
# runner, in one run, on this host (software emulation when there is no
# /dev/kvm).  The base layer is cached first; every step is then built
# afresh (--force) by each runner.
#
#   boot          qemu started to the guest agent's hello: the VM's cost
#                 per build, before its first command
#   per step      five trivial steps (run_commands echo) built afresh:
#                 (vm build - its boot - namespace build) / 5, the cost a
#                 step adds in the VM: the lower disk written, the step,
#                 its upper read back with libext2fs
#   cold build    debian_amd64 + apt_install(git, curl), every step cold
set -eu
BUILD=${1:-build}
top=$(cd "$(dirname "$0")/.." && pwd)
IB="$top/$BUILD/imagebuilder"
W=$(mktemp -d /var/tmp/ib-bench-vm.XXXXXX)
trap 'rm -rf "$W"' EXIT INT TERM
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1686355200}
now() { date +%s.%N; }
C="$W/cache"

printf '{"base":"debian_amd64"}' > "$W/base.json"
printf '{"base":"debian_amd64","steps":[%s]}' \
	'{"run_commands":["echo 1"]},{"run_commands":["echo 2"]},{"run_commands":["echo 3"]},{"run_commands":["echo 4"]},{"run_commands":["echo 5"]}' \
	> "$W/steps.json"
printf '{"base":"debian_amd64","steps":[{"apt_install":["git","curl"]}]}' > "$W/cold.json"
"$IB" build --cache-dir "$C" "$W/base.json" >/dev/null 2>"$W/base.log"
# the guest kernel is fetched once per cache: not part of any figure
"$IB" build --cache-dir "$C" --runner vm "$W/steps.json" >/dev/null 2>"$W/warm.log"

s=$(now)
"$IB" build --cache-dir "$C" --force "$W/steps.json" >/dev/null 2>"$W/ns-steps.log"
t_ns5=$(echo "$(now) - $s" | bc)
s=$(now)
"$IB" build --cache-dir "$C" --force --runner vm "$W/steps.json" >/dev/null 2>"$W/vm-steps.log"
t_vm5=$(echo "$(now) - $s" | bc)
boot=$(sed -n 's/^vm: .* booted in \([0-9.]*\) s.*/\1/p' "$W/vm-steps.log")
how=$(sed -n 's/^vm: .* booted in [0-9.]* s (\([^,]*\),.*/\1/p' "$W/vm-steps.log")
per_step=$(echo "scale=3; ($t_vm5 - $boot - $t_ns5) / 5" | bc)

s=$(now)
"$IB" build --cache-dir "$C" --force -o "$W/ns.ext4" "$W/cold.json" >/dev/null 2>"$W/ns-cold.log"
t_ns=$(echo "$(now) - $s" | bc)
s=$(now)
"$IB" build --cache-dir "$C" --force --runner vm -o "$W/vm.ext4" "$W/cold.json" >/dev/null 2>"$W/vm-cold.log"
t_vm=$(echo "$(now) - $s" | bc)
same=different
cmp -s "$W/ns.ext4" "$W/vm.ext4" && same=identical

printf '\nVM runner (%s, %s) vs namespace runner\n' "$how" "$(nproc) cores"
printf '%-40s %10s %10s %8s\n' "case" "vm" "namespace" "ratio"
printf '%-40s %9.1fs %10s %8s\n' "boot to the agent's hello" "$boot" "-" "-"
printf '%-40s %9.1fs %9.1fs %7sx\n' "5 trivial steps, built afresh" "$t_vm5" "$t_ns5" \
	"$(echo "scale=2; $t_vm5 / $t_ns5" | bc)"
printf '%-40s %9.2fs %10s %8s\n' "per-step overhead ((vm - boot - ns) / 5)" "$per_step" "-" "-"
printf '%-40s %9.1fs %9.1fs %7sx\n' "cold build: apt_install(git, curl)" "$t_vm" "$t_ns" \
	"$(echo "scale=2; $t_vm / $t_ns" | bc)"
printf '%-40s %s\n' "the two images" "$same"

#!/bin/sh
# Benchmark (not a test): what the sandbox costs per step.
#
#   per step     a spec of 20 run_commands ["true"] steps built with --force
#                on a cached base, minus the same build of the base alone
#                (its export), divided by 20                (target <= 40 ms)
#   before       the same with the program as it was before the sandbox
#                (BENCH_BASELINE, default a9f871a: host network, no user
#                namespace, no seccomp, no cgroup, no build disk), built
#                from git into the bench's temp dir
#   --disk none  the same without the build disk, to show its share
#   no limits    --memory none --pids none --disk none: no cgroup either
#
# BENCH_RUNS=N repeats each timing (default 3) and keeps the best.
set -eu
BUILD=${1:-build}
top=$(cd "$(dirname "$0")/.." && pwd)
IB="$top/$BUILD/imagebuilder"
RUNS=${BENCH_RUNS:-3}
BASELINE=${BENCH_BASELINE:-a9f871a}
W=$(mktemp -d /var/tmp/ib-bench-sandbox.XXXXXX)
trap 'rm -rf "$W"' EXIT INT TERM
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1686355200}
N=20

now() { date +%s.%N; }
best() { # best CMD...: the fastest of RUNS runs, in seconds
	b=""
	i=0
	while [ $i -lt "$RUNS" ]; do
		s=$(now); "$@" >/dev/null 2>>"$W/bench.log"; e=$(now)
		t=$(echo "$e - $s" | bc)
		if [ -z "$b" ] || [ "$(echo "$t < $b" | bc)" = 1 ]; then b=$t; fi
		i=$((i + 1))
	done
	echo "$b"
}
per_step() { # per_step WITH_STEPS BASE_ONLY: milliseconds per step
	awk -v a="$1" -v b="$2" -v n="$N" 'BEGIN { printf "%.1f", (a - b) * 1000 / n }'
}

python3 -c 'import json,sys; n=int(sys.argv[1]); print(json.dumps({"base": "debian_amd64",
	"steps": [{"run_commands": ["true # %d" % i]} for i in range(n)]}))' "$N" > "$W/steps.json"
printf '{"base":"debian_amd64"}' > "$W/base.json"

echo "imagebuilder sandbox bench on $(nproc) cores, $(uname -r), $(date -u +%F); $N steps, best of $RUNS"
"$IB" build --cache-dir "$W/cache" "$W/steps.json" >/dev/null 2>>"$W/bench.log"

# the program before the sandbox, on a copy of the same cache
old=""
if git -C "$top" rev-parse -q --verify "$BASELINE^{commit}" >/dev/null 2>&1; then
	mkdir -p "$W/old"
	git -C "$top" archive "$BASELINE" | tar -C "$W/old" -xf -
	if make -C "$W/old" -j"$(nproc)" all >/dev/null 2>>"$W/bench.log"; then
		old="$W/old/build/imagebuilder"
		cp -a "$W/cache" "$W/cache-old"
	fi
fi

ours() { "$IB" build --cache-dir "$W/cache" --force "$@"; }
t_steps=$(best ours "$W/steps.json")
t_base=$(best ours "$W/base.json")
t_steps_nd=$(best ours --disk none "$W/steps.json")
t_base_nd=$(best ours --disk none "$W/base.json")
t_steps_nl=$(best ours --disk none --memory none --pids none "$W/steps.json")
t_base_nl=$(best ours --disk none --memory none --pids none "$W/base.json")
if [ -n "$old" ]; then
	theirs() { "$old" build --cache-dir "$W/cache-old" --force "$@"; }
	t_steps_old=$(best theirs "$W/steps.json")
	t_base_old=$(best theirs "$W/base.json")
	before="$(per_step "$t_steps_old" "$t_base_old") ms"
else
	before="(baseline $BASELINE not built: see $W/bench.log)"
fi

printf '\n%-44s %12s %s\n' "case" "per step" "target"
printf '%-44s %9s ms %s\n' "every defence (the default limits)" "$(per_step "$t_steps" "$t_base")" "<= 40 ms"
printf '%-44s %9s ms\n' "--disk none" "$(per_step "$t_steps_nd" "$t_base_nd")"
printf '%-44s %9s ms\n' "--disk none --memory none --pids none" "$(per_step "$t_steps_nl" "$t_base_nl")"
printf '%-44s %12s\n' "before the sandbox ($BASELINE)" "$before"

# Resource limits (build --memory/--pids/--disk; walks; time):
#   memory   a step that allocates past --memory fails, and says so
#   pids     a fork bomb stops at --pids processes
#   stale    cgroups a killed builder left behind are removed, and what was
#            left in them killed, by the next build with limits
#   disk     writing past --disk fails naming the limit, in one step or
#            over several (what the build wrote stays counted); a path
#            longer than PATH_MAX fails naming IB_TREE_PATH_MAX
#   serve    BuildImage's limits: more than the daemon's is invalid_argument,
#            less is what the build gets
#   depth    a tree deeper than the walk limit fails the build with an
#            error that names the limit (the CLI and the daemon survive)
#   sparse   a 16 GiB sparse file: a 5 s --timeout still ends the build in
#            well under 15 s (sealing reads only data, and checks the time),
#            and CancelBuild while it is sealed ends the build as soon
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/serve.sh"
C="$SHARED_CACHE"
bad=""

spec1() { # CMD: a one-step spec
	$PY -c 'import json,sys; print(json.dumps({"base": "debian_amd64", "steps": [{"run_commands": [sys.argv[1]]}]}))' "$1"
}

spec1 "perl -e '\$x = \"a\" x (512 << 20); print length(\$x), qq(\n)' # $$" > "$T/mem.json"
"$IB" build --cache-dir "$C" --memory 128M "$T/mem.json" >/dev/null 2>"$T/mem.log"
rc=$?
if [ "$rc" = 0 ]; then bad="$bad memory=allocated-512MiB-under-128M"
elif ! grep -q 'memory limit (--memory 128 MiB)' "$T/mem.log"; then bad="$bad memory=message($(tail -1 "$T/mem.log"))"; fi

# the groups a kill -9 left behind (their builder's pid gone, a process still
# in one): the next build with limits removes them, and kills what was left
# (the parents this shell's builds use: cgroup v2's, or the memory and pids
# hierarchies' under this process's own v1 groups)
stale=""
if [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ]; then
	parents=/sys/fs/cgroup/imagebuilder
else
	parents=""
	for ctl in memory pids; do
		own=$(awk -F: -v c="$ctl" '{ n = split($2, a, ","); for (i = 1; i <= n; i++) if (a[i] == c) print $3 }' /proc/self/cgroup)
		parents="$parents /sys/fs/cgroup/$ctl${own%/}/imagebuilder"
	done
fi
for parent in $parents; do
	[ -d "$parent" ] && mkdir "$parent/b-4194305-1-stale$$" && stale="$stale $parent/b-4194305-1-stale$$"
done
[ -n "$stale" ] || bad="$bad stale=no-imagebuilder-cgroup-after-a-build"
sleep 1000 &
orphan=$!
CLEANUP="$CLEANUP $orphan"
set -- $stale
echo "$orphan" > "$1/cgroup.procs" || bad="$bad stale=cannot-move-a-process"
spec1 "perl -e 'my @k; for (1 .. 200) { my \$p = fork; last unless defined \$p; if (!\$p) { sleep 60; exit 0 } push @k, \$p } opendir my \$d, q(/proc); open my \$o, q(>), q(/procs); print \$o scalar(grep { /^[0-9]+\$/ } readdir \$d), qq(\n); kill 9, @k' # $$" > "$T/pids.json"
"$IB" build --cache-dir "$C" --pids 64 -o "$T/pids.ext4" "$T/pids.json" >/dev/null 2>"$T/pids.log" ||
	bad="$bad pids=build-failed($(tail -1 "$T/pids.log"))"
# the fork that failed is named (the step itself went on)
spec1 "perl -e 'for (1 .. 200) { fork // exit 3; }' # $$" > "$T/pids2.json"
"$IB" build --cache-dir "$C" --pids 64 "$T/pids2.json" >/dev/null 2>"$T/pids2.log" && bad="$bad pids=fork-bomb-built"
grep -q "process limit (--pids 64)" "$T/pids2.log" || bad="$bad pids=message($(tail -1 "$T/pids2.log"))"
procs=$(img_cat "$T/pids.ext4" /procs 2>/dev/null)
[ -n "$procs" ] && [ "$procs" -le 64 ] || bad="$bad pids=$procs-processes-under-64"

for g in $stale; do [ ! -d "$g" ] || bad="$bad stale=$g-left"; done
# (killed, it is a zombie of this shell until waited for)
case $(awk '{ print $3 }' "/proc/$orphan/stat" 2>/dev/null) in ''|Z) ;; *) bad="$bad stale=process-left-alive" ;; esac

spec1 "dd if=/dev/zero of=/big bs=1M count=400 # $$" > "$T/disk.json"
"$IB" build --cache-dir "$C" --disk 256M "$T/disk.json" >/dev/null 2>"$T/disk.log"
rc=$?
if [ "$rc" = 0 ]; then bad="$bad disk=wrote-400MiB-under-256M"
elif ! grep -q 'disk limit (--disk 256 MiB)' "$T/disk.log"; then bad="$bad disk=message($(tail -1 "$T/disk.log"))"; fi

# the limit covers the whole build: two steps of 150 MiB under --disk 256M, the second fails
$PY -c 'import json,sys; print(json.dumps({"base": "debian_amd64", "steps": [
	{"run_commands": ["dd if=/dev/zero of=/a bs=1M count=150 # " + sys.argv[1]]},
	{"run_commands": ["dd if=/dev/zero of=/b bs=1M count=150"]}]}))' "$$" > "$T/disk2.json"
"$IB" build --cache-dir "$C" --disk 256M "$T/disk2.json" >/dev/null 2>"$T/disk2.log"
rc=$?
if [ "$rc" = 0 ]; then bad="$bad disk=300MiB-in-two-steps-under-256M"
elif ! grep -q 'step 2 .*disk limit (--disk 256 MiB)' "$T/disk2.log"; then bad="$bad disk2=message($(tail -1 "$T/disk2.log"))"; fi
# a path longer than PATH_MAX (20 names of 250 bytes): refused by name, never copied or counted
long="cd / && perl -e 'for (1 .. 20) { my \$d = sprintf(q(%0250d), \$_); mkdir \$d or die; chdir \$d or die } open(my \$f, q(>), q(f)) or die' # $$"
spec1 "$long" > "$T/long.json"
"$IB" build --cache-dir "$C" "$T/long.json" >/dev/null 2>"$T/long.log" && bad="$bad path=built"
grep -q 'IB_TREE_PATH_MAX' "$T/long.log" || bad="$bad path=message($(tail -1 "$T/long.log"))"

deep="cd / && i=0 && while [ \$i -lt 300 ]; do mkdir d && cd d || exit 1; i=\$((i + 1)); done # $$"
spec1 "$deep" > "$T/deep.json"
"$IB" build --cache-dir "$C" "$T/deep.json" >/dev/null 2>"$T/deep.log"
rc=$?
if [ "$rc" = 0 ]; then bad="$bad depth=built"
elif [ "$rc" -gt 2 ]; then bad="$bad depth=crashed(exit $rc)"
elif ! grep -q 'deeper than 256 directories' "$T/deep.log"; then bad="$bad depth=message($(tail -1 "$T/deep.log"))"; fi
serve_start
spec1 "$deep serve" > "$T/deep2.json"
build_image "$T/deep2.json"
wait_build "$BID" FAILED 300
out 'd["error"]["message"]' | grep -q 'deeper than 256 directories' || bad="$bad depth-serve=$(out 'd["error"]["message"]')"
[ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/healthz")" = 200 ] || bad="$bad depth-serve=daemon-down"
# the daemon's limits are the defaults; a request may ask for less, never more
st=$(rpc BuildImage "{\"spec\": $(cat "$T/mem.json"), \"limits\": {\"memory\": \"1T\"}}")
[ "$st" != 200 ] && out 'd["code"]' | grep -q invalid_argument && out 'd["message"]' | grep -q 'limits.memory' ||
	bad="$bad serve-over=$st"
build_image "$T/mem.json" '"limits": {"memory": "128M", "pids": 64}'
wait_build "$BID" FAILED 300
out 'd["error"]["message"]' | grep -q 'memory limit (--memory 128 MiB)' || bad="$bad serve-memory=$(out 'd["error"]["message"]')"
# CancelBuild while a 16 GiB sparse layer is sealed under the next step
$PY -c 'import json,sys; print(json.dumps({"base": "debian_amd64", "steps": [
	{"run_commands": ["truncate -s 16G /sparse # " + sys.argv[1]]}, {"run_commands": ["sleep 120"]}]}))' "$$" > "$T/sparse2.json"
build_image "$T/sparse2.json"
i=0
until grep -q 'sleep 120' "$C/logs/"*"$BID"*.log 2>/dev/null || [ $i -gt 600 ]; do sleep 0.1; i=$((i + 1)); done
c0=$(date +%s)
rpc CancelBuild "{\"build_id\": \"$BID\"}" >/dev/null
wait_build "$BID" CANCELLED 60
csecs=$(( $(date +%s) - c0 ))
[ "$csecs" -lt 15 ] || bad="$bad cancel-sparse=$csecs-seconds"
serve_stop
[ "$SERVE_RC" = 0 ] || bad="$bad depth-serve=exit-$SERVE_RC"

spec1 "truncate -s 16G /sparse; echo $$" > "$T/sparse.json"
t0=$(date +%s)
"$IB" build --cache-dir "$C" --timeout 5 "$T/sparse.json" >/dev/null 2>"$T/sparse.log"
secs=$(( $(date +%s) - t0 ))
[ "$secs" -lt 15 ] || bad="$bad sparse=$secs-seconds"
cache_sound "$C"
[ -z "$bad" ] || fail "limits that did not hold:$bad"
ok "memory, pids and disk limits hold and name themselves; stale cgroups swept; a 300-deep tree fails naming the limit" \
	"(CLI and daemon); a 16 GiB sparse file: build over in ${secs}s with --timeout 5, cancelled in ${csecs}s"

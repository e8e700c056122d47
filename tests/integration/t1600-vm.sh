# The VM runner (--runner vm): a build's steps in one throwaway qemu VM
# (software emulation here), with Debian's cloud kernel and ib-init as the
# guest agent.
#   - one spec (env, apt_install, run_commands that make a whiteout, an
#     opaque directory, a symlink, a fifo, a hard link, a setuid file) gives
#     the same ext4 bytes with both runners;
#   - a step sees the guest's kernel, not the host's, and cannot reach a
#     service on host loopback through the user-mode network's gateway;
#   - a failed step is named, with its output; a timeout, and a builder
#     killed with -9, leave no qemu process, no scratch and no mount.
# VM builds are slow under emulation: few, and small.
. "$(dirname "$0")/lib.sh"
C="$SHARED_CACHE"
trap 'exit 130' INT
trap 'exit 143' TERM

skip() { echo "skip: $*"; exit 77; }
[ "$(uname -m)" = x86_64 ] || skip "the VM runner runs VMs of the host's architecture; this test knows amd64"
command -v qemu-system-x86_64 >/dev/null || skip "no qemu-system-x86_64 (scripts/install-deps.sh installs it)"

# qemu processes of this test's cache: their working directory is the VM's, in the build's scratch
CREAL=$(realpath "$C")
vm_procs() {
	for p in $(pgrep -x qemu-system-x86); do
		case "$(readlink "/proc/$p/cwd")" in "$CREAL"/tmp/*) echo "$p" ;; esac
	done
}
[ -z "$(vm_procs)" ] || fail "qemu of an earlier run of this cache is still running: $(vm_procs)"

# A service on host loopback that no step may reach, and a package index
# there that steps reach (its port forwarded, as in the namespace runner).
mkdir -p "$T/www" "$T/index"
echo "secret-$$" > "$T/www/secret.txt"
echo "index-marker-$$" > "$T/index/marker.txt"
start_static "$T/www"
port=${STATIC_URL##*:}
$PY "$TOP/tests/fixtures/pyindex.py" static "$T/index" "$T/index.port" 2>"$T/index.log" &
CLEANUP="$CLEANUP $!"
wait_file "$T/index.port" "index server" "$T/index.log"
iport=$(cat "$T/index.port")
export IMAGEBUILDER_PIP_INDEX_URL="http://127.0.0.1:$iport/simple"

cat > "$T/same.json" <<JSON
{"base": "debian_amd64", "steps": [
  {"env": {"IB_VM_GREETING": "hello from an env step"}},
  {"apt_install": ["hello"]},
  {"run_commands": [
    "echo kernel-in-step=\$(uname -r)",
    "echo \"\$IB_VM_GREETING\" > /etc/greeting",
    "rm /etc/issue.net",
    "rm -rf /etc/skel && mkdir /etc/skel && echo new > /etc/skel/only",
    "mkdir -p /opt/t && ln -s ../../etc/greeting /opt/t/link && mkfifo /opt/t/fifo",
    "echo one > /opt/t/a && ln /opt/t/a /opt/t/b && cp /usr/bin/hello /opt/t/suid && chmod 4755 /opt/t/suid",
    "if timeout 10 bash -c 'exec 3<>/dev/tcp/10.0.2.2/$port'; then echo reached-host-loopback; exit 1; fi",
    "echo loopback-probe-done",
    "timeout 20 bash -c 'exec 3<>/dev/tcp/127.0.0.1/$iport; printf \\"GET /marker.txt HTTP/1.0\\\\r\\\\n\\\\r\\\\n\\" >&3; cat <&3' | grep -q '^index-marker-' && echo index-port-reached",
    "hello > /opt/t/hello.out"
  ]}
]}
JSON

"$IB" build --cache-dir "$C" --json -o "$T/ns.ext4" "$T/same.json" >"$T/ns.json" 2>"$T/ns.log" ||
	fail "namespace build failed: $(tail -20 "$T/ns.log")"
start=$(date +%s)
"$IB" build --cache-dir "$C" --json --force --runner vm -o "$T/vm.ext4" "$T/same.json" >"$T/vm.json" 2>"$T/vm.log" ||
	fail "vm build failed: $(tail -30 "$T/vm.log")"
secs=$(( $(date +%s) - start ))
grep -q '^vm: .* booted in' "$T/vm.log" || fail "the build log does not show the VM booting: $(head -20 "$T/vm.log")"
[ "$(grep -c 'booted in' "$T/vm.log")" = 1 ] || fail "more than one VM for one build"
for i in 1 2 3; do
	[ "$(json_get "$T/vm.json" "d['layers'][$i]['source']")" = built ] ||
		fail "layer $i of the vm build was not built: $(json_get "$T/vm.json" "d['layers'][$i]")"
done
ok "vm build ($secs s): one VM booted, every step built in it"

cmp "$T/ns.ext4" "$T/vm.ext4" || fail "the runners made different images"
fsck_clean "$T/vm.ext4"
[ "$(img_cat "$T/vm.ext4" /etc/greeting)" = "hello from an env step" ] || fail "/etc/greeting"
img_exists "$T/vm.ext4" /etc/issue.net && fail "/etc/issue.net survived its rm"
[ "$(img_cat "$T/vm.ext4" /opt/t/hello.out)" = "Hello, world!" ] || fail "apt's hello did not run"
ok "identical ext4 bytes from both runners ($(stat -c %s "$T/vm.ext4") bytes, e2fsck clean)"

host_kernel=$(uname -r)
guest_kernel=$(sed -n 's/^kernel-in-step=//p' "$T/vm.log" | tr -d '\r' | head -1)
[ -n "$guest_kernel" ] || fail "the step's uname -r is not in the log"
[ "$guest_kernel" != "$host_kernel" ] || fail "the step ran on the host's kernel ($host_kernel)"
case "$guest_kernel" in *-cloud-amd64) ;; *) fail "the step's kernel is $guest_kernel, not Debian's cloud kernel" ;; esac
grep -q "^vm: $guest_kernel booted" "$T/vm.log" || fail "the agent's kernel and the step's differ"
grep -q loopback-probe-done "$T/vm.log" || fail "the loopback probe did not run"
grep -q "secret-$$" "$T/vm.log" && fail "a step read a host loopback service"
grep -q '^index-port-reached' "$T/vm.log" || fail "the step could not reach the package index's port $iport"
grep -q '^index-port-reached' "$T/ns.log" || fail "the namespace runner's step could not reach the index (test bug?)"
ok "the step ran on $guest_kernel (host: $host_kernel); host loopback port $port unreachable, the index's port $iport reached"

# A failed step: named, its output shown, nothing committed, the VM gone.
cat > "$T/fail.json" <<'JSON'
{"base": "debian_amd64", "steps": [
  {"run_commands": ["echo vm-stderr-4242 >&2; exit 7", "echo never > /never"]}
]}
JSON
"$IB" build --cache-dir "$C" --json --runner vm "$T/fail.json" >"$T/f.json" 2>"$T/f.log"
rc=$?
[ "$rc" = 1 ] || fail "failing vm build exited $rc, expected 1: $(tail -5 "$T/f.log")"
grep -q vm-stderr-4242 "$T/f.log" || fail "the command's stderr was not shown: $(tail -5 "$T/f.log")"
grep -q "exited with status 7" "$T/f.log" || fail "no message naming the command's status: $(tail -5 "$T/f.log")"
[ "$(json_get "$T/f.json" 'd["error"]["step"]')" = 1 ] || fail "error.step should be 1: $(cat "$T/f.json")"
json_get "$T/f.json" 'd["error"]["message"]' | grep -q "echo vm-stderr-4242" ||
	fail "the error does not name the command: $(json_get "$T/f.json" 'd["error"]')"
[ ! -e "$C/layers/$(json_get "$T/f.json" 'd["layers"][1]["key"]')" ] || fail "the failed step's layer was committed"
[ -z "$(vm_procs)" ] || fail "qemu survives a failed build"
cache_sound "$C"
ok "failed step in the VM: exit 1, named with its command and status, its stderr shown, nothing committed, no qemu"

# A timeout kills the VM.
cat > "$T/slow.json" <<'JSON'
{"base": "debian_amd64", "steps": [{"run_commands": ["echo slow-step-started; sleep 1000"]}]}
JSON
"$IB" build --cache-dir "$C" --json --runner vm --timeout 45 "$T/slow.json" >"$T/t.json" 2>"$T/t.log"
rc=$?
[ "$rc" = 1 ] || fail "timed-out vm build exited $rc: $(tail -5 "$T/t.log")"
[ "$(json_get "$T/t.json" 'd["status"]')" = timeout ] || fail "status $(json_get "$T/t.json" 'd["status"]'), expected timeout"
grep -q "^slow-step-started" "$T/t.log" || fail "the slow step never started (boot took the whole timeout?): $(tail -5 "$T/t.log")"
[ -z "$(vm_procs)" ] || fail "qemu survives a timed-out build: $(vm_procs)"
grep -q " $C/" /proc/mounts && fail "a mount of the cache survives: $(grep " $C/" /proc/mounts)"
cache_sound "$C"
ok "timeout: status timeout, no qemu process, no mount, no scratch left"

# kill -9 of the builder: its VM dies with it.
"$IB" build --cache-dir "$C" --runner vm "$T/slow.json" >/dev/null 2>"$T/k.log" &
pid=$!
CLEANUP="$CLEANUP $pid"
i=0
until grep -q "^slow-step-started" "$T/k.log"; do
	i=$((i + 1))
	[ $i -le 1200 ] || fail "the step did not start in 120 s: $(tail -5 "$T/k.log")"
	sleep 0.1
done
[ -n "$(vm_procs)" ] || fail "no qemu process while the step runs"
kill -9 "$pid"
wait "$pid" 2>/dev/null
i=0
while [ -n "$(vm_procs)" ]; do
	i=$((i + 1))
	[ $i -le 50 ] || fail "qemu outlived its builder's kill -9 by 5 s: $(vm_procs)"
	sleep 0.1
done
# the next build sweeps the dead one's scratch
"$IB" build --cache-dir "$C" "$T/same.json" >/dev/null 2>"$T/after.log" || fail "build after kill -9: $(tail -5 "$T/after.log")"
cache_sound "$C"
ok "kill -9 of the builder: its qemu gone within $((i / 10)) s, the cache sound"

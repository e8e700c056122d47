# Attacks on identity and privilege, from an ordinary run_commands step
# (all of them harmless: they read, or write back what was there).  Each
# probe prints one "probe NAME=RESULT" line into the build log; the test
# fails on any result that shows the attack worked:
#   uid_map    root in the step is not root on the host (no identity map)
#   caps       no capability in the initial user namespace: none of the
#              attacks below that need one works
#   mknod      a block device node of the host's disk cannot be made
#   sysctl     a host-global sysctl cannot be written (its own value back)
#   remount    /sys cannot be remounted read-write, no cgroup fs mounted
#   kmsg       the kernel log cannot be read
#   handle     open_by_handle_at through a bind-mounted file does not reach
#              the host's file system (a marker file in the cache dir)
#   vsock      no vsock socket (it reaches the hypervisor and the host
#              whatever the network namespace)
. "$(dirname "$0")/lib.sh"
C="$SHARED_CACHE"
mkdir -p "$C"

# a file on the cache's file system, and its path from that file system's root
marker="$C/t1300-marker-$$"
echo "host-secret-$$" > "$marker"
CLEANUP_FILES="$marker"
trap 'rm -f $CLEANUP_FILES; cleanup' EXIT
set -- $(findmnt -n -o TARGET,FSROOT -T "$C")
target=$1 fsroot=$2
rel="${marker#"$target"}"
[ "$fsroot" = / ] || rel="$fsroot$rel"
rel=${rel#/}
dev=$(stat -c '%Hd %Ld' "$C")

cat > "$T/probe.sh" <<PROBE
set +e
echo "probe uid_map=\$(awk '{ printf "%s:%s:%s;", \$1, \$2, \$3 }' /proc/self/uid_map) nonce=$$"
if mknod /tmp/hd b $dev 2>/dev/null; then echo probe mknod=made; else echo probe mknod=denied; fi
v=\$(cat /proc/sys/vm/overcommit_ratio)
if echo "\$v" 2>/dev/null > /proc/sys/vm/overcommit_ratio; then echo probe sysctl=written; else echo probe sysctl=denied; fi
if mount -o remount,rw /sys 2>/dev/null; then echo probe remount=sys-rw; else echo probe remount=denied; fi
mkdir -p /tmp/cg
if mount -t cgroup -o none,name=ibt none /tmp/cg 2>/dev/null || mount -t cgroup2 none /tmp/cg 2>/dev/null; then
	echo probe cgroupfs=mounted
else
	echo probe cgroupfs=denied
fi
mknod /tmp/kmsg c 1 11 2>/dev/null
if dd if=/tmp/kmsg of=/dev/null bs=8192 count=1 iflag=nonblock 2>/dev/null ||
	dd if=/dev/kmsg of=/dev/null bs=8192 count=1 iflag=nonblock 2>/dev/null; then
	echo probe kmsg=read
else
	echo probe kmsg=denied
fi
# open_by_handle_at (304 on x86_64) of inode 2, the root of the file system
# the bind-mounted /etc/resolv.conf lives on (ext4's FILEID_INO32_GEN)
perl -e '
use Fcntl;
sysopen(my \$m, "/etc/resolv.conf", O_RDONLY) or do { print "probe handle=no-mount-fd\n"; exit };
my \$h = pack("LlLL", 8, 1, 2, 0);
my \$fd = syscall(304, fileno(\$m), \$h, 0x10000);
if (\$fd < 0) { print "probe handle=denied\n"; exit }
open(my \$f, "<", "/proc/self/fd/\$fd/$rel") or do { print "probe handle=opened-root\n"; exit };
my \$s = <\$f>; chomp \$s; print "probe handle=read:\$s\n";'
# vsock (family 40) reaches the hypervisor and host whatever the network namespace
if perl -e 'socket(my \$s, 40, 1, 0) or exit 3' 2>/dev/null; then echo probe vsock=opened; else echo probe vsock=denied; fi
exit 0
PROBE
script_spec "$T/probe.sh" > "$T/spec.json"
"$IB" build --cache-dir "$C" --force "$T/spec.json" >/dev/null 2>"$T/build.log" ||
	fail "the probe build failed: $(tail -5 "$T/build.log")"
probe() { sed -n "s/^.*probe $1=\([^ ]*\).*$/\1/p" "$T/build.log" | tail -1; }
[ -n "$(probe uid_map)" ] || fail "no probe output: $(tail -20 "$T/build.log")"

bad=""
um=$(probe uid_map)
case "$um" in 0:0:*) bad="$bad uid_map=host-root($um)" ;; esac
for p in mknod sysctl remount cgroupfs kmsg vsock; do
	[ "$(probe $p)" = denied ] || bad="$bad $p=$(probe $p)"
done
case "$(probe handle)" in denied|no-mount-fd) ;; *) bad="$bad handle=$(probe handle)" ;; esac
[ -z "$bad" ] || fail "attacks that worked:$bad"
ok "uid_map $um; mknod of the host disk, a host sysctl, remounting /sys, a cgroup fs, /dev/kmsg, vsock and" \
	"open_by_handle_at through a bind mount: all denied"

# A real boot: the exported image as the root drive of a qemu machine
# (software emulation), Debian's cloud kernel from the mirror, and a tiny
# initramfs made here (busybox-static plus the kernel's virtio modules) that
# mounts /dev/vda and switch_roots into the image's /sbin/init, imagebuilder's
# own init.  The program named by ib.exec= reports what it sees on the
# console; the init then powers the machine off, which ends qemu.
#
# The kernel and busybox .debs are kept in build/boot-cache (apt skips what it
# has); IB_BOOT_TIMEOUT (seconds, default 180) bounds the boot and
# IB_BOOT_ACCEL (default tcg) picks qemu's accelerator.
. "$(dirname "$0")/lib.sh"
C="$SHARED_CACHE"
DEBS="$IB_TEST_BUILD/boot-cache"
TIMEOUT=${IB_BOOT_TIMEOUT:-180}
ACCEL=${IB_BOOT_ACCEL:-tcg}
KPKG=linux-image-cloud-amd64
# stop at once on a signal (lib.sh's cleanup runs on EXIT, and kills qemu)
trap 'exit 130' INT
trap 'exit 143' TERM

skip() { echo "skip: $*"; exit 77; }
[ "$(uname -m)" = x86_64 ] && [ "$(dpkg --print-architecture 2>/dev/null)" = amd64 ] ||
	skip "needs an amd64 Debian host: the kernel and busybox come from its apt sources"
command -v apt-get >/dev/null || skip "no apt-get"
command -v qemu-system-x86_64 >/dev/null ||
	skip "no qemu-system-x86_64 (Debian's qemu-system-x86; scripts/install-deps.sh installs it)"
[ "$(id -u)" = 0 ] || skip "needs root (builds, and the initramfs's /dev/console node)"

# The image: an env step, a /sbin/init that a later step hides, and a
# run_commands step that installs the program the init runs.  It prints what the test checks, leaves a daemon behind for
# the init to stop at power-off, and names the host from /etc/hostname.
cat > "$T/boot-check" <<'EOF'
#!/bin/sh
echo "boot-check: machine=$(uname -m)"
echo "boot-check: env=$IB_BOOT_CHECK"
printf 'boot-check: quoted=[%s]\n' "$IB_BOOT_QUOTED"
echo "boot-check: pid1=$(cat /proc/1/comm) hostname=$(cat /proc/sys/kernel/hostname) lo=$(cat /sys/class/net/lo/flags)"
mounts=""
while read -r _src dir type _rest; do mounts="$mounts $dir:$type"; done < /proc/mounts
echo "boot-check: mounts=$mounts "
# an orphan that exits, for the init to reap; a daemon (own session: no SIGHUP
# when this one ends) that stays, for the init to stop
sh -c 'sleep 0.1 &'
setsid sh -c 'trap "echo stopped > /root/daemon-stopped; exit 0" TERM; while :; do sleep 1000; done' \
	</dev/null >/dev/null 2>&1 &
sleep 0.5
zombies=$(grep -l '^State:.*Z' /proc/[0-9]*/status 2>/dev/null | wc -l)
echo "boot-check: zombies=$zombies"
echo "boot-check: done"
EOF
[ -x "$IB_TEST_BUILD/ib-init-x86_64" ] || fail "no $IB_TEST_BUILD/ib-init-x86_64 (make builds it)"
# The image id does not cover the init the builder installs, so a cached image
# would keep an older init: the init's digest goes into the spec, one image per init.
init_sha=$(sha256sum "$IB_TEST_BUILD/ib-init-x86_64" | cut -d' ' -f1)
$PY - "$T/boot-check" "$init_sha" > "$T/spec.json" <<'EOF'
import json, sys
script = open(sys.argv[1]).read()
print(json.dumps({
    "base": "debian_amd64",
    "steps": [
        {"env": {"IB_BOOT_CHECK": "hello-from-env",
                 "IB_BOOT_QUOTED": "a \"b\" \\c $d `e` 'f'\tg",
                 "IB_BOOT_INIT": sys.argv[2]}},
        # an init that a later step hides (an opaque /usr/sbin without it):
        # the image has none of its own, so it gets imagebuilder's and boots
        {"run_commands": ["printf '#!/bin/sh\\necho not-this-init\\n' > /sbin/init", "chmod 755 /sbin/init"]},
        {"run_commands": ["cp -a /usr/sbin /usr/sbin.keep", "rm /usr/sbin.keep/init", "rm -rf /usr/sbin",
                          "mv /usr/sbin.keep /usr/sbin", "test ! -e /sbin/init"]},
        {"run_commands": [
            "cat > /usr/local/bin/boot-check <<'BOOT_CHECK'\n" + script + "BOOT_CHECK",
            "chmod 755 /usr/local/bin/boot-check",
            "echo ib-boot-test > /etc/hostname",
        ]},
    ],
}, indent=1))
EOF
"$IB" build --cache-dir "$C" -o "$T/boot.ext4" "$T/spec.json" >"$T/build.out" 2>"$T/build.log" ||
	fail "build failed: $(tail -20 "$T/build.log")"
debugfs -R "dump /sbin/init $T/image-init" "$T/boot.ext4" >/dev/null 2>&1
cmp -s "$T/image-init" "$IB_TEST_BUILD/ib-init-x86_64" || fail "the image's /sbin/init is not build/ib-init-x86_64"
ok "image $(cut -c1-12 "$T/build.out") built, /sbin/init is build/ib-init-x86_64"

# The kernel and busybox, from the mirror through the host's apt sources
# (apt-get download skips a file it has).  Missing or stale package lists are
# updated once; a mirror that cannot be reached fails the test.
mkdir -p "$DEBS"
# field PACKAGE NAME: a field of PACKAGE's stanza in $T/pkgs
field() { sed -n "/^Package: $1\$/,/^\$/s/^$2: //p" "$T/pkgs" | head -1; }
# resolve: the .deb names of the kernel the meta-package stands for and of busybox
resolve() {
	apt-cache show --no-all-versions "$KPKG" busybox-static >"$T/pkgs" 2>/dev/null || return 1
	kdep=$(field "$KPKG" Depends)
	KREAL=${kdep%% *}
	kver=$(echo "$kdep" | sed -n 's/^[^ ]* (= \([^)]*\)).*/\1/p')
	bver=$(field busybox-static Version)
	case "$KREAL" in linux-image-*-cloud-amd64) ;; *) return 1 ;; esac
	[ -n "$kver" ] && [ -n "$bver" ] || return 1
	kdeb="$DEBS/${KREAL}_$(echo "$kver" | sed 's/:/%3a/')_amd64.deb"
	bdeb="$DEBS/busybox-static_$(echo "$bver" | sed 's/:/%3a/')_amd64.deb"
}
fetch() {
	(cd "$DEBS" && apt-get download -q -o APT::Sandbox::User=root "$KREAL" busybox-static) >"$T/apt.log" 2>&1
}
if ! resolve || ! fetch; then
	apt-get update -qq >>"$T/apt.log" 2>&1
	resolve || fail "no $KPKG (Depends: '${kdep:-}') or busybox-static in the apt sources: $(tail -5 "$T/apt.log")"
	fetch || fail "cannot download $KREAL and busybox-static: $(tail -5 "$T/apt.log")"
fi
[ -s "$kdeb" ] && [ -s "$bdeb" ] || fail "apt-get download left no $kdeb or $bdeb"
for old in "$DEBS"/*.deb; do
	[ "$old" = "$kdeb" ] || [ "$old" = "$bdeb" ] || rm -f "$old"
done
ok "$(basename "$kdeb") and $(basename "$bdeb") in $DEBS"

# The initramfs: busybox, the modules that give /dev/vda (ext4 is built in)
# with what they depend on, found through a modules.dep made by busybox's
# depmod (the package ships none), and an /init.
K="$T/kernel"
R="$T/initramfs"
mkdir -p "$K" "$T/busybox" || fail "mkdir"
dpkg-deb -x "$kdeb" "$K" || fail "cannot unpack $kdeb"
dpkg-deb -x "$bdeb" "$T/busybox" || fail "cannot unpack $bdeb"
BB="$T/busybox/bin/busybox"
KVER=$(ls "$K/lib/modules")
VMLINUZ="$K/boot/vmlinuz-$KVER"
[ -f "$VMLINUZ" ] && [ -x "$BB" ] || fail "no kernel or busybox in the packages"
grep -qx 'CONFIG_EXT4_FS=y' "$K/boot/config-$KVER" || fail "$KVER: ext4 is not built in; add its modules here"
"$BB" depmod -b "$K" "$KVER" || fail "depmod $KVER"
MODS="virtio_pci virtio_blk"
mkdir -p "$R/bin" "$R/dev" "$R/proc" "$R/sys" "$R/newroot" "$R/lib/modules/$KVER" || fail "mkdir"
for m in $MODS; do
	line=$(grep -E "(^|/)$m\\.ko(\\.[a-z]+)?:" "$K/lib/modules/$KVER/modules.dep") || fail "$m is not a module of $KVER"
	for ko in $(echo "$line" | tr -d :); do
		mkdir -p "$R/lib/modules/$KVER/$(dirname "$ko")"
		cp "$K/lib/modules/$KVER/$ko" "$R/lib/modules/$KVER/$ko" || fail "copy $ko"
	done
done
"$BB" depmod -b "$R" "$KVER" || fail "depmod of the initramfs"
cp "$BB" "$R/bin/busybox"
for a in sh mount umount modprobe mknod usleep poweroff switch_root; do ln -s busybox "$R/bin/$a"; done
mknod "$R/dev/console" c 5 1 || fail "mknod"
cat > "$R/init" <<'EOF'
#!/bin/sh
export PATH=/bin
die() { echo "initramfs: $*"; poweroff -f; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
modprobe -a virtio_pci virtio_blk || die "cannot load the virtio modules"
i=0
while [ ! -e /sys/block/vda/dev ]; do
	i=$((i + 1))
	[ $i -le 300 ] || die "no /dev/vda"
	usleep 100000
done
IFS=: read -r major minor < /sys/block/vda/dev
mknod /dev/vda b "$major" "$minor"
mount -t ext4 /dev/vda /newroot || die "cannot mount /dev/vda"
umount /sys /proc
echo "initramfs: switch_root to /sbin/init"
exec switch_root /newroot /sbin/init
EOF
chmod 755 "$R/init"
(cd "$R" && find . | "$BB" cpio -o -H newc 2>/dev/null) > "$T/initrd.cpio" || fail "cpio"
ok "initramfs: busybox, $(find "$R/lib/modules" -name '*.ko*' | wc -l) modules for $MODS ($KVER)"

# The boot.  qemu runs in the background so that the trap can kill it.
start=$(date +%s)
timeout "$TIMEOUT" qemu-system-x86_64 -accel "$ACCEL" -nographic -no-reboot -m 512 -nic none \
	-drive file="$T/boot.ext4",format=raw,if=virtio -kernel "$VMLINUZ" -initrd "$T/initrd.cpio" \
	-append "console=ttyS0 panic=-1 ib.exec=/usr/local/bin/boot-check" </dev/null >"$T/console.log" 2>&1 &
qpid=$!
CLEANUP="$CLEANUP $qpid"
wait "$qpid"
rc=$?
secs=$(( $(date +%s) - start ))
CLEANUP=${CLEANUP% "$qpid"}

# console tail without the firmware's terminal escapes
tail_console() { tail -n 40 "$T/console.log" | sed 's/\x1b\[[0-9;?]*[A-Za-z]//g; s/\x1bc//g'; }
# (printf: the console holds backslashes, which echo would interpret)
bad() { printf 'console tail:\n%s\nFAIL: %s\n' "$(tail_console)" "$*" >&2; exit 1; }
[ "$rc" != 124 ] || bad "no power-off within ${TIMEOUT}s"
[ "$rc" = 0 ] || bad "qemu exited with status $rc"
if grep -q 'Kernel panic' "$T/console.log"; then bad "kernel panic"; fi
grep -q 'initramfs: switch_root to /sbin/init' "$T/console.log" || bad "the initramfs did not reach switch_root"
grep -q 'reboot: Power down' "$T/console.log" || bad "qemu ended, but not by a power-off"
ok "booted and powered off by itself in ${secs}s"

has() { grep -qF -- "$1" "$T/console.log" || bad "console lacks '$1'"; }
has "boot-check: machine=x86_64"
has "boot-check: env=hello-from-env"
has "boot-check: quoted=[a \"b\" \\c \$d \`e\` 'f'	g]"
ok "ib.exec program ran: uname -m is x86_64, env-step variables from /etc/environment (quoting kept)"
has "boot-check: pid1=init hostname=ib-boot-test lo=0x9"
for m in /proc:proc /sys:sysfs /dev:devtmpfs /dev/pts:devpts /dev/shm:tmpfs /run:tmpfs /tmp:tmpfs; do
	has " $m "
done
has "boot-check: zombies=0"
has "boot-check: done"
has "ib-init: /usr/local/bin/boot-check exited with status 0; powering off"
ok "init: PID 1, hostname, lo up, mounts, orphans reaped, exit status reported"

fsck_clean "$T/boot.ext4"
if dumpe2fs -h "$T/boot.ext4" 2>/dev/null | grep -q needs_recovery; then
	fail "file system left needing journal recovery"
fi
[ "$(img_cat "$T/boot.ext4" /root/daemon-stopped)" = stopped ] ||
	fail "the daemon left running was not stopped with SIGTERM"
ok "after power-off: leftover daemon got SIGTERM, file system clean (e2fsck -fn, no journal recovery)"

# An image with an init of its own keeps it.
cat > "$T/own.json" <<'JSON'
{"base": "debian_amd64", "steps": [{"run_commands": [
  "printf '#!/bin/sh\\necho t0900 own init\\n' > /usr/sbin/init", "chmod 755 /usr/sbin/init"]}]}
JSON
"$IB" build --cache-dir "$C" -o "$T/own.ext4" "$T/own.json" >/dev/null 2>"$T/own.log" ||
	fail "build with an own init failed: $(tail -20 "$T/own.log")"
[ "$(img_cat "$T/own.ext4" /sbin/init | tail -1)" = "echo t0900 own init" ] ||
	fail "an image's own /sbin/init was replaced"
ok "an image with its own /sbin/init keeps it"

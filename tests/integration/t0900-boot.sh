# A real boot, the way a worker boots an image: the exported image as the
# root drive of qemu machines (software emulation) of both kinds a worker
# uses, q35 and microvm; Debian's cloud kernel from the mirror; a tiny
# initramfs made here (busybox-static plus the kernel's virtio modules) that
# mounts /dev/vda and switch_roots into the image's /sbin/init,
# imagebuilder's own init.  The program named by ib.exec= reports what it
# sees on the console: the network from ip= (it fetches a file, off its
# subnet and so through the default route to the user-mode gateway, from a
# server on host loopback; qemu's network is restricted, so nothing else is
# reachable), names it resolves, a machine-id
# and an SSH host key made at boot, and free space; the init then powers
# the machine off, which ends qemu.
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
#!/bin/bash
echo "boot-check: machine=$(uname -m)"
echo "boot-check: env=$IB_BOOT_CHECK"
printf 'boot-check: quoted=[%s]\n' "$IB_BOOT_QUOTED"
echo "boot-check: pid1=$(cat /proc/1/comm) hostname=$(cat /proc/sys/kernel/hostname) lo=$(cat /sys/class/net/lo/flags)"
mounts=""
while read -r _src dir type _rest; do mounts="$mounts $dir:$type"; done < /proc/mounts
echo "boot-check: mounts=$mounts "
echo "boot-check: machine-id=$(cat /etc/machine-id)"
echo "boot-check: ssh-host-key=$(ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub 2>&1 | cut -d' ' -f4)"
echo "boot-check: resolv=$(grep ^nameserver /etc/resolv.conf | tr '\n' ' ')"
echo "boot-check: localhost=$(getent hosts localhost | cut -d' ' -f1 | head -1)"
echo "boot-check: self=$(getent hosts "$(hostname)" | cut -d' ' -f1 | head -1)"
echo "boot-check: route=$(awk '$2 == "00000000" { print $1 " " $3 }' /proc/net/route)"
# a file from a server on the host's loopback: 10.9.9.9 is off the guest's
# /24, so this goes through the default route, to the user-mode gateway
if exec 3<>/dev/tcp/10.9.9.9/8080; then
	printf 'GET /hello.txt HTTP/1.0\r\nHost: 10.9.9.9\r\n\r\n' >&3
	# (qemu's forward is a character device: the server's close does not
	# reach the guest, so read up to the line rather than to the end)
	while IFS= read -r -t 20 line <&3; do
		case $line in hello-from-host-*) echo "boot-check: fetched=$line"; break ;; esac
	done
	exec 3<&-
fi
echo "boot-check: free-kib=$(df -Pk / | awk 'NR == 2 { print $4 }')"
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
        {"apt_install": ["openssh-client"]},
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
            # keys made at build time: the image must not keep them
            "ssh-keygen -q -A",
        ]},
    ],
}, indent=1))
EOF
"$IB" build --cache-dir "$C" -o "$T/boot.ext4" "$T/spec.json" >"$T/build.out" 2>"$T/build.log" ||
	fail "build failed: $(tail -20 "$T/build.log")"
debugfs -R "dump /sbin/init $T/image-init" "$T/boot.ext4" >/dev/null 2>&1
cmp -s "$T/image-init" "$IB_TEST_BUILD/ib-init-x86_64" || fail "the image's /sbin/init is not build/ib-init-x86_64"
# no identity baked in: the keys a step made, the machine-id, are not in the image
debugfs -R "ls -l /etc/ssh" "$T/boot.ext4" 2>/dev/null | grep -q ssh_host_ && fail "the image has SSH host keys"
[ "$(debugfs -R "stat /etc/machine-id" "$T/boot.ext4" 2>/dev/null | sed -n 's/.*Project:.*Size: \([0-9]*\).*/\1/p')" = 0 ] ||
	fail "/etc/machine-id is not empty"
img_cat "$T/boot.ext4" /etc/hosts | grep -qE '^127\.0\.0\.1[[:space:]]+localhost' || fail "/etc/hosts lacks localhost"
ok "no SSH host keys (a step made some), an empty /etc/machine-id, /etc/hosts with localhost"
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

# The initramfs: busybox, the modules that give /dev/vda and the network
# device over PCI or MMIO (ext4 is built in) with what they depend on, found through a modules.dep made by busybox's
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
MODS="virtio_pci virtio_mmio virtio_blk virtio_net"
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
modprobe -a virtio_pci virtio_mmio virtio_blk virtio_net || die "cannot load the virtio modules"
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

# The file the guests fetch, on host loopback.  qemu's user-mode network is
# 10.0.0.0/8, restricted (nothing routed out, the host unreachable) but for
# one forward: 10.9.9.9:8080 to that server.  The guest's address is in
# 10.0.2.0/24, so it reaches 10.9.9.9 only through its default route.
mkdir -p "$T/www"
echo "hello-from-host-$$" > "$T/www/hello.txt"
start_static "$T/www"
www_port=${STATIC_URL##*:}

# console tail without the firmware's terminal escapes
tail_console() { tail -n 40 "$1" | sed 's/\x1b\[[0-9;?]*[A-Za-z]//g; s/\x1bc//g'; }
# (printf: the console holds backslashes, which echo would interpret)
bad() { printf 'console tail:\n%s\nFAIL: %s\n' "$(tail_console "$CONSOLE")" "$*" >&2; exit 1; }
has() { grep -qF -- "$1" "$CONSOLE" || bad "$M: console lacks '$1'"; }
value() { sed -n "s/^.*boot-check: $1=//p" "$CONSOLE" | tr -d '\r' | head -1; }

# boot MACHINE: boot a copy of the image on MACHINE (q35 or microvm) and check what it saw.
boot() {
	M=$1
	CONSOLE="$T/console-$M.log"
	img="$T/boot-$M.ext4"
	cp --sparse=always "$T/boot.ext4" "$img"
	net="-netdev user,id=n0,net=10.0.0.0/8,host=10.0.2.2,dns=10.0.2.3,restrict=on,guestfwd=tcp:10.9.9.9:8080-tcp:127.0.0.1:$www_port"
	ip="ip=10.0.2.15::10.0.2.2:255.255.255.0"
	case $M in
	q35)
		# the hostname from ip=
		machine="-M q35 $net -device virtio-net-pci,netdev=n0 -drive file=$img,format=raw,if=virtio"
		append="$ip:ib-q35::off:10.0.2.3 console=ttyS0"
		want_host=ib-q35
		;;
	microvm)
		# virtio over MMIO, no PCI; the hostname from ib.hostname=; the TSC
		# cannot be calibrated on microvm under emulation: its rate is given
		machine="-M microvm $net -device virtio-net-device,netdev=n0 -drive id=d0,file=$img,format=raw,if=none -device virtio-blk-device,drive=d0"
		khz=$(awk -F: '/^cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo)
		append="$ip:::off:10.0.2.3 ib.hostname=ib-microvm console=ttyS0 tsc_early_khz=${khz:-2000000}"
		want_host=ib-microvm
		;;
	esac
	start=$(date +%s)
	# shellcheck disable=SC2086
	timeout "$TIMEOUT" qemu-system-x86_64 -accel "$ACCEL" -nographic -no-reboot -m 512 $machine \
		-kernel "$VMLINUZ" -initrd "$T/initrd.cpio" \
		-append "$append panic=-1 ib.exec=/usr/local/bin/boot-check" </dev/null >"$CONSOLE" 2>&1 &
	qpid=$!
	CLEANUP="$CLEANUP $qpid"
	wait "$qpid"
	rc=$?
	secs=$(( $(date +%s) - start ))
	CLEANUP=${CLEANUP% "$qpid"}
	[ "$rc" != 124 ] || bad "$M: no power-off within ${TIMEOUT}s"
	[ "$rc" = 0 ] || bad "$M: qemu exited with status $rc"
	if grep -q 'Kernel panic' "$CONSOLE"; then bad "$M: kernel panic"; fi
	grep -q 'initramfs: switch_root to /sbin/init' "$CONSOLE" || bad "$M: the initramfs did not reach switch_root"
	grep -q 'reboot: Power down' "$CONSOLE" || bad "$M: qemu ended, but not by a power-off"
	ok "$M: booted and powered off by itself in ${secs}s"

	has "boot-check: machine=x86_64"
	has "boot-check: env=hello-from-env"
	has "boot-check: quoted=[a \"b\" \\c \$d \`e\` 'f'	g]"
	has "boot-check: pid1=init hostname=$want_host lo=0x9"
	for m in /proc:proc /sys:sysfs /dev:devtmpfs /dev/pts:devpts /dev/shm:tmpfs /run:tmpfs /tmp:tmpfs; do
		has " $m "
	done
	has "boot-check: zombies=0"
	has "boot-check: done"
	has "ib-init: /usr/local/bin/boot-check exited with status 0; powering off"
	ok "$M: ib.exec ran with the env steps' variables (quoting kept); PID 1, hostname $want_host, lo up, mounts, orphans reaped"

	mid=$(value machine-id)
	echo "$mid" | grep -qE '^[0-9a-f]{32}$' || bad "$M: machine-id '$mid'"
	eval "mid_$M=$mid"
	[ "$(value ssh-host-key)" = "(ED25519)" ] || bad "$M: no SSH host key made at boot: '$(value ssh-host-key)'"
	[ "$(value resolv)" = "nameserver 10.0.2.3 " ] || bad "$M: resolv.conf: '$(value resolv)'"
	case "$(value localhost)" in 127.0.0.1|::1) ;; *) bad "$M: localhost resolves to '$(value localhost)'" ;; esac
	[ "$(value self)" = 10.0.2.15 ] || bad "$M: its own hostname resolves to '$(value self)'"
	value route | grep -q ' 0202000A$' || bad "$M: no default route through 10.0.2.2: '$(value route)'"
	[ "$(value fetched)" = "hello-from-host-$$" ] || bad "$M: fetched '$(value fetched)' through the gateway"
	free=$(value free-kib)
	[ "${free:-0}" -ge $((3 * 1024 * 1024)) ] || bad "$M: only ${free} KiB free on /"
	ok "$M: network from ip= (address, route, resolv.conf; a file from host loopback through the gateway), localhost and its name resolve, machine-id $mid and an SSH host key made at boot, $((free / 1024)) MiB free"

	fsck_clean "$img"
	if dumpe2fs -h "$img" 2>/dev/null | grep -q needs_recovery; then
		fail "$M: file system left needing journal recovery"
	fi
	[ "$(img_cat "$img" /root/daemon-stopped)" = stopped ] ||
		fail "$M: the daemon left running was not stopped with SIGTERM"
	ok "$M: after power-off the leftover daemon had SIGTERM, the file system is clean (e2fsck -fn, no journal recovery)"
}

boot q35
boot microvm
[ "$mid_q35" != "$mid_microvm" ] || fail "two machines made the same machine-id"

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

#!/bin/sh
# make fresh-check: the README's two commands on a freshly installed Debian.
#
# Bootstraps a clean bookworm root with mmdebstrap (Debian's "important"
# packages, what a default install has, plus make, which the two commands
# start with), clones this repository's committed HEAD into it, and runs
# `make demo` and then `make test` inside it as root: chrooted, in its own
# mount, PID, UTS and IPC namespaces, with a clean environment and none of
# this machine's installed packages.  Each command has to install what it
# needs itself.  Network: the host's, for the Debian mirror.
#
#   FRESH_ROOT=DIR   bootstrap there (default: a new dir under /var/tmp)
#   FRESH_KEEP=1     keep the root afterwards (default: removed)
#   FRESH_TESTS=PAT  run only these tests (TESTS=PAT of make test)
#
# The log is build/fresh-check.log; the last lines say what passed.
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
[ "$(id -u)" = 0 ] || { echo "fresh-check: run as root" >&2; exit 1; }
scripts/install-deps.sh # the host needs mmdebstrap to make the root
mkdir -p build
log="$top/build/fresh-check.log"
root=${FRESH_ROOT:-$(mktemp -d /var/tmp/ib-fresh.XXXXXX)}
: >"$log"

cleanup() {
	if [ "${FRESH_KEEP:-0}" != 1 ]; then
		rm -rf --one-file-system "$root"
	fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say() { printf 'fresh-check: %s\n' "$*" | tee -a "$log" >&2; }

t0=$(date +%s)
if [ ! -x "$root/usr/bin/make" ]; then
	rmdir "$root" 2>/dev/null || true
	say "bootstrapping a clean bookworm (important + make) into $root"
	mmdebstrap --variant=important --include=make bookworm "$root" >>"$log" 2>&1 ||
		{ say "mmdebstrap failed (see $log)"; exit 1; }
fi
rm -rf "$root/root/imagebuilder"
git clone -q "$top" "$root/root/imagebuilder"
# The network's trust, like its resolver: certificate authorities this host
# was given locally (an egress proxy's) go where Debian's ca-certificates
# picks them up when install-deps installs it, and node is told, as here.
if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
	mkdir -p "$root/usr/local/share/ca-certificates"
	cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
fi
say "root ready in $(( $(date +%s) - t0 ))s; $(chroot "$root" dpkg-query -W -f '.\n' | wc -l) packages"

# One command in the root: own namespaces, the root a mount point of its own,
# fresh /proc, /sys and /dev from the host (loop devices, /dev/kvm), tmpfs
# /tmp and /run, the host's resolver.
in_root() {
	unshare --mount --pid --uts --ipc --fork --propagation private sh -c '
		root=$1; shift
		# the root is a mount point, as / is on a real machine
		mount --bind "$root" "$root"
		mount --rbind /dev "$root/dev"
		mount -t proc proc "$root/proc"
		mount --rbind /sys "$root/sys"
		mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
		mount -t tmpfs tmpfs "$root/run"
		cp /etc/resolv.conf "$root/etc/resolv.conf"
		hostname fresh-check
		# pivot_root, not chroot: the kernel refuses user namespaces to a
		# chrooted process, and a real machine is not one
		cd "$root" && mkdir -p .old-root && pivot_root . .old-root && cd / && umount -l /.old-root &&
			rmdir /.old-root || exit 1
		exec /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
			HOME=/root LANG=C.UTF-8 TERM=dumb ${FRESH_TESTS:+TESTS="$FRESH_TESTS"} \
			${NODE_EXTRA_CA_CERTS:+NODE_EXTRA_CA_CERTS="$NODE_EXTRA_CA_CERTS"} \
			/bin/sh -c "cd /root/imagebuilder && $*"' sh "$root" "$@"
}

status=0
for cmd in "make demo" "make test"; do
	t=$(date +%s)
	say "running '$cmd'"
	if in_root "$cmd" >>"$log" 2>&1; then
		say "'$cmd' passed in $(( $(date +%s) - t ))s"
	else
		say "'$cmd' FAILED after $(( $(date +%s) - t ))s; the end of its output:"
		tail -n 30 "$log" >&2
		status=1
		break
	fi
done
grep -E '^[0-9]+ passed, [0-9]+ failed' "$log" | tail -n 1 | sed 's/^/fresh-check: make test: /' >&2 || true
say "done in $(( $(date +%s) - t0 ))s, $( [ $status = 0 ] && echo 'both commands passed' || echo 'FAILED')"
exit $status

#!/bin/sh
# Install the Debian packages imagebuilder needs to build, run and test.
# Idempotent: does nothing when everything is there already.
set -eu

# Installed with --no-install-recommends, so what a tool only recommends but
# imagebuilder or its tests use is named here too (arch-test: mmdebstrap's
# check of foreign architectures).
PKGS="gcc make pkg-config libc6-dev
libarchive-dev libssl-dev libsqlite3-dev libext2fs-dev comerr-dev libjansson-dev libcurl4-openssl-dev libmicrohttpd-dev libgit2-dev libzstd-dev libseccomp-dev
protobuf-c-compiler libprotobuf-c-dev libprotobuf-dev zlib1g-dev libnghttp2-dev
python3-grpcio python3-grpc-tools nghttp2-client docker-registry skopeo
qemu-user-static qemu-system-x86 arch-test patchelf
mmdebstrap e2fsprogs python3 python3-pip-whl ca-certificates bc git curl strace zstd bmap-tools passt"
# a cross compiler for the init of the other architecture
case "$(uname -m)" in
x86_64) PKGS="$PKGS gcc-aarch64-linux-gnu libc6-dev-arm64-cross" ;;
aarch64) PKGS="$PKGS gcc-x86-64-linux-gnu libc6-dev-amd64-cross" ;;
esac

# npm fetches the RPC tests' clients (buf, connect-es); a node that brings its own npm will do
command -v npm >/dev/null || PKGS="$PKGS npm"

missing=""
for p in $PKGS; do
	if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
		missing="$missing $p"
	fi
done
[ -z "$missing" ] && exit 0

if [ "$(id -u)" != 0 ]; then
	echo "install-deps: missing packages:$missing (run as root to install them)" >&2
	exit 1
fi
echo "install-deps: installing$missing" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing >/dev/null

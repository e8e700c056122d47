# One arm64 build on this host: the base bootstrapped and a step run through
# qemu-user (binfmt_misc, registered by imagebuilder when needed).
. "$(dirname "$0")/lib.sh"
C="$SHARED_CACHE"

if [ "$(uname -m)" != x86_64 ] && [ "$(uname -m)" != aarch64 ]; then
	echo "skip: host is $(uname -m)"; exit 77
fi
printf '{"base": "debian_arm", "steps": [{"run_commands": ["uname -m > /machine.txt", "dpkg --print-architecture > /arch.txt"]}]}' > "$T/spec.json"
"$IB" build --cache-dir "$C" --json -o "$T/arm.ext4" "$T/spec.json" >"$T/b.json" 2>"$T/b.log" ||
	fail "arm64 build failed: $(tail -20 "$T/b.log")"
fsck_clean "$T/arm.ext4"
[ "$(img_cat "$T/arm.ext4" /machine.txt)" = aarch64 ] || fail "uname -m: '$(img_cat "$T/arm.ext4" /machine.txt)'"
[ "$(img_cat "$T/arm.ext4" /arch.txt)" = arm64 ] || fail "dpkg arch: '$(img_cat "$T/arm.ext4" /arch.txt)'"
debugfs -R "dump /usr/bin/dpkg $T/dpkg.bin" "$T/arm.ext4" 2>/dev/null
# ELF: 64-bit, little-endian, e_machine 183 (EM_AARCH64)
[ "$(od -An -tx1 -j0 -N5 "$T/dpkg.bin" | tr -d ' ')" = 7f454c4602 ] || fail "/usr/bin/dpkg is not a 64-bit ELF"
[ "$(od -An -tu2 -j18 -N2 "$T/dpkg.bin" | tr -d ' ')" = 183 ] || fail "/usr/bin/dpkg is not aarch64"
img_cat "$T/arm.ext4" /etc/imagebuilder/image.json | grep -q '"arch": "arm64"' || fail "image.json arch"
ok "debian_arm64 on $(uname -m): uname -m says aarch64, dpkg is an aarch64 ELF, e2fsck clean"

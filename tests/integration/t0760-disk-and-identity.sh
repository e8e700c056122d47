# What an exported image is: disk_size bytes of ext4 (one inode per 16 KiB,
# sparse), no identity baked in (no SSH host keys, an empty machine-id,
# /etc/hosts with localhost), and its compact forms (a .zst of the exact
# bytes, bmaptool's bmap).  Another disk_size re-exports and builds
# nothing; content that does not fit fails, naming the size that would.
. "$(dirname "$0")/lib.sh"
C="$SHARED_CACHE"

spec() { # SIZE: the spec with that disk_size
	cat <<JSON
{"base": "debian_amd64", "disk_size": "$1", "steps": [{"run_commands": [
  "mkdir -p /etc/ssh && echo secret > /etc/ssh/ssh_host_rsa_key && echo pub > /etc/ssh/ssh_host_rsa_key.pub",
  "echo x > /etc/ssh/ssh_host_custom_key && echo keep > /etc/ssh/ssh_config.t0760",
  "echo 0123456789abcdef0123456789abcdef > /etc/machine-id && rm -f /etc/hosts",
  "echo disk-$$ > /f"]}]}
JSON
}
spec 1G > "$T/1g.json"
"$IB" build --cache-dir "$C" --json -o "$T/1g.ext4" "$T/1g.json" >"$T/1g.out" 2>"$T/1g.log" ||
	fail "build failed: $(tail -5 "$T/1g.log")"
[ "$(stat -c %s "$T/1g.ext4")" = 1073741824 ] || fail "the image is $(stat -c %s "$T/1g.ext4") bytes, not 1 GiB"
alloc=$(( $(stat -c %b "$T/1g.ext4") * $(stat -c %B "$T/1g.ext4") ))
[ "$alloc" -lt $((600 << 20)) ] || fail "the image is not sparse: $alloc bytes allocated"
inodes=$(dumpe2fs -h "$T/1g.ext4" 2>/dev/null | sed -n 's/^Inode count: *//p')
[ "$inodes" -ge 65536 ] || fail "$inodes inodes in 1 GiB, fewer than one per 16 KiB"
fsck_clean "$T/1g.ext4"
ok "disk_size 1G: 1073741824 bytes, $inodes inodes, $((alloc >> 20)) MiB allocated, e2fsck clean"

debugfs -R "ls /etc/ssh" "$T/1g.ext4" 2>/dev/null > "$T/ssh.ls"
grep -q ssh_host_ "$T/ssh.ls" && fail "SSH host keys are in the image: $(cat "$T/ssh.ls")"
grep -q ssh_config.t0760 "$T/ssh.ls" || fail "/etc/ssh lost what is not a host key"
[ "$(debugfs -R "stat /etc/machine-id" "$T/1g.ext4" 2>/dev/null | sed -n 's/.*Project:.*Size: \([0-9]*\).*/\1/p')" = 0 ] ||
	fail "/etc/machine-id is not empty"
img_cat "$T/1g.ext4" /etc/hosts > "$T/hosts"
grep -qE '^127\.0\.0\.1[[:space:]]+localhost' "$T/hosts" || fail "/etc/hosts lacks 127.0.0.1 localhost: $(cat "$T/hosts")"
grep -qE '^::1[[:space:]]+localhost' "$T/hosts" || fail "/etc/hosts lacks ::1 localhost"
[ "$(img_cat "$T/1g.ext4" /etc/hostname)" = localhost ] || fail "/etc/hostname: $(img_cat "$T/1g.ext4" /etc/hostname)"
ok "no identity: the step's SSH host keys and machine-id are gone, /etc/hosts has localhost (v4 and v6)"

# Another size: the same layers, nothing built, another image id.
spec 2G > "$T/2g.json"
"$IB" build --cache-dir "$C" --json -o "$T/2g.ext4" "$T/2g.json" >"$T/2g.out" 2>"$T/2g.log" ||
	fail "build (2G) failed: $(tail -5 "$T/2g.log")"
[ "$(json_get "$T/2g.out" 'all(l["cached"] for l in d["layers"])')" = True ] || fail "another disk_size built a layer"
[ "$(json_get "$T/2g.out" '[l["key"] for l in d["layers"]]')" = "$(json_get "$T/1g.out" '[l["key"] for l in d["layers"]]')" ] ||
	fail "disk_size changed a layer key"
[ "$(json_get "$T/2g.out" 'd["image_id"]')" != "$(json_get "$T/1g.out" 'd["image_id"]')" ] || fail "the same image id"
[ "$(stat -c %s "$T/2g.ext4")" = 2147483648 ] || fail "the 2G image is $(stat -c %s "$T/2g.ext4") bytes"
ok "disk_size 2G: the same layer keys, all cached, another image id, 2 GiB"

spec 64M > "$T/small.json"
"$IB" build --cache-dir "$C" "$T/small.json" >/dev/null 2>"$T/small.log"
rc=$?
[ "$rc" = 1 ] || fail "content over disk_size: exit $rc, expected 1"
grep -q 'disk_size is 67108864 bytes' "$T/small.log" || fail "the message does not name disk_size: $(tail -2 "$T/small.log")"
grep -qE 'smallest disk_size that fits is [0-9]+ MiB' "$T/small.log" || fail "the message does not say what fits"
cache_sound "$C"
fits=$(sed -n 's/.*smallest disk_size that fits is \([0-9]*\) MiB.*/\1/p' "$T/small.log")
spec "${fits}M" > "$T/fits.json"
"$IB" build --cache-dir "$C" -o "$T/fits.ext4" "$T/fits.json" >/dev/null 2>"$T/fits.log" ||
	fail "the size the message named (${fits} MiB) does not fit: $(tail -2 "$T/fits.log")"
fsck_clean "$T/fits.ext4"
spec "$((fits - 1))M" > "$T/tight.json"
"$IB" build --cache-dir "$C" "$T/tight.json" >/dev/null 2>"$T/tight.log" && fail "$((fits - 1)) MiB fits: not the smallest"
grep -q "smallest disk_size that fits is $fits MiB" "$T/tight.log" || fail "one MiB less: $(tail -1 "$T/tight.log")"
ok "disk_size 64M: refused, $(grep -o 'the content is [0-9]* MiB' "$T/small.log"), ${fits} MiB fits and $((fits - 1)) MiB does not"

# The compact forms: the exact bytes, made once.
id=$(json_get "$T/1g.out" 'd["image_id"]')
"$IB" export --cache-dir "$C" "$id" --zstd "$T/1g.zst" || fail "export --zstd failed"
zstd -q -d -c "$T/1g.zst" | cmp -s - "$T/1g.ext4" || fail "the .zst does not give the image's bytes"
"$IB" export --cache-dir "$C" "$id" --zstd "$T/1g-again.zst" || fail "export --zstd again failed"
cmp -s "$T/1g.zst" "$T/1g-again.zst" || fail "two .zst exports differ"
"$IB" export --cache-dir "$C" "$id" --bmap "$T/1g.bmap" || fail "export --bmap failed"
bmaptool -q copy --bmap "$T/1g.bmap" "$T/1g.ext4" "$T/copied.ext4" 2>"$T/bmap.log" ||
	fail "bmaptool copy refused the bmap: $(tail -3 "$T/bmap.log")"
cmp -s "$T/copied.ext4" "$T/1g.ext4" || fail "bmaptool's copy differs from the image"
ok "export --zstd: $(stat -c %s "$T/1g.zst") bytes that decompress to the image (the same twice); --bmap: bmaptool copies it exactly"
cache_sound "$C"

# A systemd image gets a unit that makes the missing host keys at boot.
cat > "$T/systemd.json" <<JSON
{"base": "debian_amd64", "disk_size": "256M", "steps": [{"run_commands": [
  "mkdir -p /usr/lib/systemd && printf '#!/bin/sh\\\\n' > /usr/lib/systemd/systemd && chmod 755 /usr/lib/systemd/systemd",
  "printf '#!/bin/sh\\\\n' > /usr/bin/ssh-keygen && chmod 755 /usr/bin/ssh-keygen",
  "ln -sf /usr/lib/systemd/systemd /usr/sbin/init", "echo $$"]}]}
JSON
"$IB" build --cache-dir "$C" -o "$T/systemd.ext4" "$T/systemd.json" >/dev/null 2>"$T/systemd.log" ||
	fail "build (systemd) failed: $(tail -3 "$T/systemd.log")"
img_cat "$T/systemd.ext4" /etc/systemd/system/ib-ssh-host-keys.service | grep -q '^ExecStart=/usr/bin/ssh-keygen -A' ||
	fail "no host key unit in a systemd image"
debugfs -R "stat /etc/systemd/system/multi-user.target.wants/ib-ssh-host-keys.service" "$T/systemd.ext4" 2>/dev/null |
	grep -q 'Type: symlink' || fail "the host key unit is not enabled"
img_exists "$T/1g.ext4" /etc/systemd/system/ib-ssh-host-keys.service && fail "an image with imagebuilder's init got the unit"
ok "an image with systemd and ssh-keygen gets an enabled unit that makes its host keys at boot"

# systemd-sysv without udev: warned at build time.
cat > "$T/sysv.json" <<'JSON'
{"base": "debian_amd64", "steps": [{"run_commands": ["exit 9"]}, {"apt_install": ["systemd-sysv"]}]}
JSON
"$IB" build --cache-dir "$C" "$T/sysv.json" >/dev/null 2>"$T/sysv.log"
grep -q 'warning: the spec installs systemd-sysv without udev' "$T/sysv.log" || fail "no warning: $(head -3 "$T/sysv.log")"
ok "systemd-sysv without udev: warned before the build"

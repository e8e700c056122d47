# A step that deletes base files and replaces a base directory: the image
# (and the tar export) must not show what was deleted.
. "$(dirname "$0")/lib.sh"
C="$SHARED_CACHE"

cat > "$T/spec.json" <<'JSON'
{"base": "debian_amd64", "steps": [
  {"run_commands": [
    "rm /etc/debian_version",
    "rm -rf /usr/share/doc && mkdir -p /usr/share/doc/fresh && echo new > /usr/share/doc/fresh/file",
    "ln -s /etc/os-release /os-release-link && ln /etc/os-release /os-release-hard"
  ]},
  {"run_commands": ["rm /os-release-link"]}
]}
JSON
"$IB" build --cache-dir "$C" -o "$T/out.ext4" "$T/spec.json" >"$T/id" 2>"$T/log" || fail "build failed: $(tail "$T/log")"
fsck_clean "$T/out.ext4"
if img_exists "$T/out.ext4" /etc/debian_version; then fail "/etc/debian_version deleted by a step is in the image"; fi
if img_exists "$T/out.ext4" /usr/share/doc/apt; then fail "/usr/share/doc/apt (replaced directory) is in the image"; fi
if img_exists "$T/out.ext4" /os-release-link; then fail "symlink deleted in a later layer is in the image"; fi
[ "$(img_cat "$T/out.ext4" /usr/share/doc/fresh/file)" = new ] || fail "the new directory's file is missing"
img_exists "$T/out.ext4" /etc/os-release || fail "/etc/os-release missing"
debugfs -R "stat /os-release-hard" "$T/out.ext4" 2>/dev/null | grep -q 'Links: 2' || fail "hard link lost"
ok "whiteouts, an opaque directory and a hard link are applied in ext4"

"$IB" export --cache-dir "$C" "$(cat "$T/id")" --tar "$T/out.tar" || fail "export --tar failed"
tar -tf "$T/out.tar" > "$T/list"
if grep -qE '^(\./)?etc/debian_version$' "$T/list"; then fail "tar has /etc/debian_version"; fi
if grep -qE '^(\./)?usr/share/doc/apt' "$T/list"; then fail "tar has /usr/share/doc/apt"; fi
grep -qE '^(\./)?usr/share/doc/fresh/file$' "$T/list" || fail "tar lacks the new file"
ok "the same in the tar export"

# An init that a later step hides: the merged view has none, so the image
# gets imagebuilder's.  Step 1 installs a /sbin/init (/sbin -> usr/sbin);
# then either /usr/sbin is replaced without it (an opaque directory over
# it) or removed altogether (a whiteout on its parent).
init_of() {
	debugfs -R "dump /usr/sbin/init $T/init.$1" "$T/$1.ext4" >/dev/null 2>&1
	cmp -s "$T/init.$1" "$IB_TEST_BUILD/ib-init-$(uname -m)"
}
for how in opaque whiteout; do
	case $how in
	opaque) hide='"cp -a /usr/sbin /usr/sbin.keep", "rm /usr/sbin.keep/init", "rm -rf /usr/sbin", "mv /usr/sbin.keep /usr/sbin", "test -x /usr/sbin/useradd"' ;;
	whiteout) hide='"rm -rf /usr/sbin"' ;;
	esac
	cat > "$T/$how.json" <<JSON
{"base": "debian_amd64", "steps": [
  {"run_commands": ["printf '#!/bin/sh\\\\necho not-this-init\\\\n' > /sbin/init", "chmod 755 /sbin/init"]},
  {"run_commands": [$hide, "test ! -e /sbin/init", "echo $$ > /run-id"]}
]}
JSON
	"$IB" build --cache-dir "$C" -o "$T/$how.ext4" "$T/$how.json" >/dev/null 2>"$T/$how.log" ||
		fail "build ($how) failed: $(tail "$T/$how.log")"
	fsck_clean "$T/$how.ext4"
	init_of "$how" || fail "the init hidden by a later step ($how) counted as the image's own: /sbin/init is not imagebuilder's"
	img_cat "$T/$how.ext4" /etc/imagebuilder/image.json | grep -q '"init": "imagebuilder:' ||
		fail "image.json does not record imagebuilder's init ($how)"
done
ok "an init hidden by a later step (opaque directory, whiteout on its parent) is replaced by imagebuilder's"

# Links a step plants in its layer must not lead the builder's host-side
# work (junk removal, the env step's /etc/environment, sealing) out of the
# layer:
#   junk   /var/lib/apt/lists and /root/.cache/pip made symlinks to host
#          directories: the builder removes nothing there
#   etc    /etc made a symlink to a host directory: a later env step neither
#          copies a host file into the image nor writes one on the host
. "$(dirname "$0")/lib.sh"
C="$SHARED_CACHE"
mkdir -p "$T/victim-lists" "$T/victim-pip/sub" "$T/hostetc"
echo keep > "$T/victim-lists/Packages"
echo keep > "$T/victim-pip/wheel"
echo keep > "$T/victim-pip/sub/file"
echo "HOST_SECRET=host-$$" > "$T/hostetc/environment"
chmod 755 "$T"

printf '{"base": "debian_amd64", "steps": [{"run_commands": [%s]}]}\n' \
	"\"rm -rf /var/lib/apt/lists && ln -s $T/victim-lists /var/lib/apt/lists && mkdir -p /root/.cache && rm -rf /root/.cache/pip && ln -s $T/victim-pip /root/.cache/pip && echo $$\"" \
	> "$T/junk.json"
"$IB" build --cache-dir "$C" "$T/junk.json" >/dev/null 2>"$T/junk.log"
bad=""
for f in victim-lists/Packages victim-pip/wheel victim-pip/sub/file; do
	[ -f "$T/$f" ] || bad="$bad junk=removed-host-$f"
done

printf '{"base": "debian_amd64", "steps": [{"run_commands": ["umount /etc/resolv.conf 2>/dev/null; rm -rf /etc && ln -s %s /etc && echo %s"]}, {"env": {"T1320": "x"}}]}\n' \
	"$T/hostetc" "$$" > "$T/etc.json"
"$IB" build --cache-dir "$C" -o "$T/etc.ext4" "$T/etc.json" >/dev/null 2>"$T/etc.log"
if [ -f "$T/etc.ext4" ] && img_cat "$T/etc.ext4" /etc/environment | grep -q HOST_SECRET; then
	bad="$bad etc=host-file-in-image"
fi
grep -q T1320 "$T/hostetc/environment" && bad="$bad etc=host-file-written"
[ "$(cat "$T/hostetc/environment")" = "HOST_SECRET=host-$$" ] || bad="$bad etc=host-file-changed"
[ -z "$bad" ] || fail "attacks that worked:$bad"
cache_sound "$C"
if grep -q 'build failed' "$T/etc.log"; then how="the build failed: $(grep -o 'build failed.*' "$T/etc.log" | head -1)"; else how="built"; fi
ok "symlinked junk dirs: nothing removed on the host; /etc a symlink to the host: the env step read and wrote nothing there ($how)"

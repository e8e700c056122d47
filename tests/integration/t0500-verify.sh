# cache verify re-hashes content: it fails when a committed layer or image
# changes on disk, names it, and passes again once the data is restored.
. "$(dirname "$0")/lib.sh"
C="$SHARED_CACHE"

printf '{"base":"debian_amd64","steps":[{"run_commands":["echo original > /verify-me.txt"]}]}' > "$T/spec.json"
"$IB" build --cache-dir "$C" --json "$T/spec.json" >"$T/b.json" 2>"$T/log" || fail "build failed: $(tail "$T/log")"
key=$(json_get "$T/b.json" 'd["layers"][1]["key"]')
id=$(json_get "$T/b.json" 'd["image_id"]')
f="$C/layers/$key/verify-me.txt"
[ -f "$f" ] || fail "layer file $f missing"
cache_sound "$C"

cp -p "$f" "$T/saved"
echo tampered > "$f"
touch -r "$T/saved" "$f"
"$IB" cache verify --cache-dir "$C" >"$T/v.out" 2>&1 && fail "verify passed with a changed layer"
grep -q "$key" "$T/v.out" || fail "verify does not name the changed layer: $(cat "$T/v.out")"
cp -p "$T/saved" "$f"
cache_sound "$C"
ok "a changed layer file fails verify, naming the layer; restoring it passes"

img="$C/images/$id.ext4"
cp --sparse=always "$img" "$T/img.saved"
printf 'x' | dd of="$img" bs=1 seek=2000 conv=notrunc 2>/dev/null
"$IB" cache verify --cache-dir "$C" >"$T/v.out" 2>&1 && fail "verify passed with a changed image"
grep -q "$id" "$T/v.out" || fail "verify does not name the image"
cp --sparse=always "$T/img.saved" "$img"
cache_sound "$C"
ok "a changed image file fails verify; restoring it passes"

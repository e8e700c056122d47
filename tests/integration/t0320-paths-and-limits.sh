# The cache dir given as a relative path, and an image's /etc/environment
# over its limit (IB_ENV_FILE_MAX) when env steps are merged into it.
. "$(dirname "$0")/lib.sh"
C="$SHARED_CACHE"

# --cache-dir relative to the current directory: the shared cache, by
# another spelling (its base is cached; the step runs on overlayfs).
cat > "$T/rel.json" <<JSON
{"base": "debian_amd64", "steps": [{"run_commands": ["echo relative-$$ > /rel.txt"]}]}
JSON
(cd "$(dirname "$C")" && "$IB" build --cache-dir "$(basename "$C")" -o "$T/rel.ext4" "$T/rel.json") \
	>"$T/rel.id" 2>"$T/rel.log" || fail "a build with a relative --cache-dir failed: $(tail -3 "$T/rel.log")"
[ "$(img_cat "$T/rel.ext4" /rel.txt)" = "relative-$$" ] || fail "the step's file is not in the image"
(cd "$(dirname "$C")" && IMAGEBUILDER_CACHE_DIR=$(basename "$C") "$IB" inspect "$(cat "$T/rel.id")") >/dev/null ||
	fail "a relative IMAGEBUILDER_CACHE_DIR does not find the image"
ok "a relative --cache-dir (and IMAGEBUILDER_CACHE_DIR) works"

# An /etc/environment of 2 MiB: merging the env step into it is an error
# naming the limit, not an empty file.
cat > "$T/env.json" <<JSON
{"base": "debian_amd64", "steps": [
  {"run_commands": ["yes X=1 | head -c 2097152 > /etc/environment; echo run-$$"]},
  {"env": {"IB_LIMIT": "yes"}}
]}
JSON
"$IB" build --cache-dir "$C" "$T/env.json" >/dev/null 2>"$T/env.log"
rc=$?
[ "$rc" = 1 ] || fail "a build with an over-long /etc/environment exited $rc, expected 1"
grep -q IB_ENV_FILE_MAX "$T/env.log" || fail "the error does not name the limit: $(tail -2 "$T/env.log")"
grep -q 'etc/environment' "$T/env.log" || fail "the error does not name the file: $(tail -2 "$T/env.log")"
cache_sound "$C"
ok "an /etc/environment over its limit fails the export, naming IB_ENV_FILE_MAX"

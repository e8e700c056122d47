# Cache hygiene: what a step leaves in its layer (a setuid-root program) and
# what the builder keeps (index, logs, images) are out of reach of the
# host's other users: the cache dir is 0700, logs and images 0600/0640.
. "$(dirname "$0")/lib.sh"
C="$SHARED_CACHE"
printf '{"base": "debian_amd64", "steps": [{"run_commands": ["cp /usr/bin/id /usr/local/bin/suid-id && chmod 4755 /usr/local/bin/suid-id && echo %s"]}]}\n' \
	"$$" > "$T/spec.json"
id=$("$IB" build --cache-dir "$C" "$T/spec.json" 2>"$T/build.log") || fail "build failed: $(tail -3 "$T/build.log")"
layer=$(ls -d "$C"/layers/*/usr/local/bin/suid-id 2>/dev/null | head -1)
[ -n "$layer" ] || fail "no layer holds the setuid program"

# (through sh: setpriv itself still holds root's capabilities when it execs)
as_nobody() { setpriv --reuid=65534 --regid=65534 --clear-groups -- /bin/sh -c 'exec "$@"' sh "$@"; }
bad=""
out=$(as_nobody "$layer" -u 2>&1) && bad="$bad setuid-run(euid $out)"
as_nobody cat "$C/index.db" >/dev/null 2>&1 && bad="$bad index-readable"
log=$(ls -t "$C"/logs/*.log | head -1)
as_nobody cat "$log" >/dev/null 2>&1 && bad="$bad log-readable"
img=$(ls "$C/images/$id"*.ext4 | head -1)
as_nobody head -c 1 "$img" >/dev/null 2>&1 && bad="$bad image-readable"
mode=$(stat -c %a "$C")
[ "$mode" = 700 ] || bad="$bad cache-dir-mode=$mode"
for f in "$log" "$img" "$C/index.db"; do
	case "$(stat -c %a "$f")" in 600|640) ;; *) bad="$bad $(basename "$f")-mode=$(stat -c %a "$f")" ;; esac
done
[ -z "$bad" ] || fail "what other users can do:$bad"
ok "another user cannot run the layer's setuid-root program nor read the index, a log or an image;" \
	"cache dir 0700, log $(stat -c %a "$log"), image $(stat -c %a "$img"), index $(stat -c %a "$C/index.db")"

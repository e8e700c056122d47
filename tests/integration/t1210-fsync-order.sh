# A power cut at any moment leaves a cache that verifies, because each
# commit orders what it makes durable:
#   1. the data (a layer's tree: syncfs; an image file: fsync),
#   2. then the rename that publishes it,
#   3. then its directory (fsync), so the rename itself survives,
#   4. then the row that names it (sqlite commits: fsync of the WAL),
#   5. and only then does what the row no longer names go (a replaced
#      generation is moved aside).
# Checked on the system calls of real builds (strace -f -y): a new layer
# and image, and a forced rebuild that replaces both.
. "$(dirname "$0")/lib.sh"
C="$SHARED_CACHE"
command -v strace >/dev/null || fail "no strace (scripts/install-deps.sh installs it)"

cat > "$T/spec.json" <<JSON
{"base": "debian_amd64", "steps": [{"run_commands": ["echo fsync-order $$ $(date +%s%N) > /f"]}]}
JSON
trace() { # OUT ARGS...: a traced build
	out=$1; shift
	strace -f -qq -y -o "$out" -e trace=fsync,fdatasync,syncfs,rename,renameat,renameat2 \
		"$IB" build --cache-dir "$C" --json "$@" "$T/spec.json" >"$T/b.json" 2>"$T/b.log" ||
		fail "build failed: $(tail -3 "$T/b.log")"
}
trace "$T/new.trace"
trace "$T/force.trace" --force
key=$(json_get "$T/b.json" 'd["layers"][1]["key"]')
id=$(json_get "$T/b.json" 'd["image_id"]')

$PY - "$T/new.trace" "$T/force.trace" "$key" "$id" "$C" <<'PY' || fail "the commits do not order their syncs"
import re, sys
new, force, key, image, cache = sys.argv[1:]

def events(path):
    """(call, args) in the order the calls completed."""
    out = []
    for line in open(path):
        m = re.match(r"\d+\s+(?:<\.\.\. )?(\w+)(?: resumed>)?\((.*)", line)
        if m and "unfinished" not in line and "= -1" not in line:
            out.append((m.group(1), m.group(2)))
    return out

def find(ev, start, pred, what):
    for i in range(start, len(ev)):
        if pred(*ev[i]):
            return i
    raise SystemExit(f"FAIL: no {what} after event {start}")

def fsync_of(suffix):
    return lambda call, args: call in ("fsync", "fdatasync") and re.search(r"<[^>]*" + re.escape(suffix) + ">", args)

wal = fsync_of("/index.db-wal")
checks = []
for name, path, replaced in (("new", new, False), ("forced", force, True)):
    ev = events(path)
    # the layer: its tree synced, renamed into layers/, layers/ synced, then the row
    published = "/layers/" + key + (r"\.\d+" if replaced else "")
    r = find(ev, 0, lambda c, a: c.startswith("rename") and re.search(r'/upper", .*' + published + '"', a),
             f"rename of the {name} layer into layers/")
    s = max(i for i in range(r) if ev[i][0] == "syncfs" and "/upper>" in ev[i][1])
    d = find(ev, r, fsync_of(cache + "/layers"), "fsync of layers/")
    w = find(ev, d, wal, "WAL fsync (the row)")
    checks.append(f"{name} layer: syncfs {s} < rename {r} < fsync(layers/) {d} < row {w}")
    if replaced:
        g = find(ev, w, lambda c, a: c.startswith("rename") and re.search(r'/layers/' + key + r'", .*/tmp/b-\w+/old"', a),
                 "the old generation moved aside")
        checks.append(f"  then the old generation moves aside {g}")
    # the image: its file synced, renamed into images/, images/ synced, then the row
    published = "/images/" + image + (r"\.\d+" if replaced else "") + r"\.ext4"
    r = find(ev, 0, lambda c, a: c.startswith("rename") and re.search(r'/image\.ext4", .*' + published + '"', a),
             f"rename of the {name} image into images/")
    s = max(i for i in range(r) if ev[i][0] in ("fsync", "fdatasync") and "/image.ext4>" in ev[i][1])
    d = find(ev, r, fsync_of(cache + "/images"), "fsync of images/")
    w = find(ev, d, wal, "WAL fsync (the row)")
    checks.append(f"{name} image: fsync {s} < rename {r} < fsync(images/) {d} < row {w}")
for c in checks:
    print("  " + c)
PY
ok "each commit makes its data, then its rename, then its row durable, and removes the old only after"
cache_sound "$C"

# A python archive that matches its pinned digest is still untrusted input
# (the mirror is configurable): one whose symlinks chain out of the tree
# (each link stays inside when read alone; followed one through the other,
# they reach the host's /) is refused, and writes nothing outside.
. "$(dirname "$0")/lib.sh"
C="$SHARED_CACHE"
REL=20990102
V=3.11.250
mkdir -p "$T/mirror/$REL" "$T/outside"
chmod 755 "$T" "$T/outside"
A="$T/mirror/$REL/cpython-$V+$REL-$(uname -m)-unknown-linux-gnu-install_only.tar.gz"
$PY - "$A" "$T/outside" <<'PY'
import io, sys, tarfile
out, target = sys.argv[1], sys.argv[2].strip("/")
deep = "/".join("a%d" % i for i in range(1, 13))           # python/a1/.../a12
t = tarfile.open(out, "w:gz")
def add(name, kind, link=""):
    i = tarfile.TarInfo(name); i.type = kind; i.linkname = link; i.mode = 0o755
    t.addfile(i)
add("python", tarfile.DIRTYPE)
for n in range(1, 13):
    add("python/" + "/".join("a%d" % i for i in range(1, n + 1)), tarfile.DIRTYPE)
up = "/".join([".."] * 12)
add("python/%s/up" % deep, tarfile.SYMTYPE, up)             # = python/ (12 down, 12 up)
add("python/%s/up/e" % deep, tarfile.SYMTYPE, up)           # lands at python/e: 12 up from there
data = b"pwned\n"
i = tarfile.TarInfo("python/%s/up/e/%s/pwned" % (deep, target)); i.size = len(data); i.mode = 0o644
t.addfile(i, io.BytesIO(data))
t.close()
PY
digest=$(sha256sum "$A" | cut -d' ' -f1)
printf '{"%s": {"release": "%s", "sha256": {"%s": "%s"}}}\n' "$V" "$REL" "$(uname -m)" "$digest" > "$T/versions.json"
start_static "$T/mirror"
export IMAGEBUILDER_PYTHON_MIRROR="$STATIC_URL" IMAGEBUILDER_PYTHON_VERSIONS="$T/versions.json"
printf '{"base": "debian_amd64", "python_version": "%s", "steps": [{"run_commands": ["echo %s"]}]}\n' "$V" "$$" \
	> "$T/spec.json"
"$IB" build --cache-dir "$C" "$T/spec.json" >/dev/null 2>"$T/build.log"
rc=$?
bad=""
[ -e "$T/outside/pwned" ] && bad="$bad wrote-outside($T/outside/pwned)"
[ "$rc" = 0 ] && bad="$bad unpacked"
[ -z "$bad" ] || fail "attacks that worked:$bad"
grep -q 'refusing the archive' "$T/build.log" || fail "the refusal does not say why: $(tail -2 "$T/build.log")"
cache_sound "$C"
ok "a symlink chain out of the python tree: refused ($(grep -o "symlink.*refusing the archive\|entry.*refusing the archive" "$T/build.log" | head -1)), nothing written outside"

# Every crash window, deterministically: for each named crash point that
# `imagebuilder debug crash-points` lists, run the action that passes
# through it with IMAGEBUILDER_CRASH_AT set (the process _exits 137 there,
# as kill -9 would stop it), then check:
#   - cache verify exits 0 (the index names only intact data);
#   - what the crash left is collected: after a gc that evicts nothing,
#     verify reports no orphan and tmp/ holds no dead build's scratch;
#   - the same action then succeeds;
#   - the image is sound: export --from-layers gives the cached file's
#     bytes, and a fresh build of the spec's steps (build --force) too.
# The base layer is held (a shared lock, as a running build holds it) so
# that gc actions leave it.
. "$(dirname "$0")/lib.sh"
. "$(dirname "$0")/serve.sh"
C="$SHARED_CACHE"
nonce=$(date +%s%N)

"$IB" debug crash-points > "$T/points" || fail "debug crash-points failed"
npoints=$(wc -l < "$T/points")
[ "$npoints" -ge 18 ] || fail "only $npoints crash points listed"

spec_for() { # NAME: a one-step spec of its own
	printf '{"base": "debian_amd64", "disk_size": "256M", "steps": [{"run_commands": ["echo %s %s > /crash.txt"]}]}\n' "$1" "$nonce" \
		> "$T/$1.json"
	echo "$T/$1.json"
}
build_ok() { # SPEC [ARGS]: build, print the image id
	s=$1; shift
	"$IB" build --cache-dir "$C" "$@" "$s" 2>"$T/build.log" || fail "build of $s failed: $(tail -3 "$T/build.log")"
}
crashed() { # NAME RC
	[ "$2" = 137 ] || fail "$1: the action exited $2, not 137 (the crash point was not reached?)"
}

# Hold the base while the walk runs.
base_key=$(IMAGEBUILDER_CACHE_DIR="$C" "$IB" build --json "$(spec_for seed)" 2>"$T/seed.log" |
	$PY -c 'import json,sys; print(json.load(sys.stdin)["layers"][0]["key"])') ||
	fail "seed build failed: $(tail -3 "$T/seed.log")"
exec 4<"$C/locks/$base_key.lock"
flock -s 4 || fail "cannot hold the base layer"

# sound NAME SPEC: the image is sound after the re-run (the next point's
# first verify checks the whole cache again).
sound() {
	if [ -n "$2" ]; then
		id=$(build_ok "$2")
		"$IB" export --cache-dir "$C" "$id" -o "$T/cached.ext4" || fail "$1: export failed"
		"$IB" export --cache-dir "$C" "$id" --from-layers -o "$T/fl.ext4" || fail "$1: export --from-layers failed"
		cmp -s "$T/fl.ext4" "$T/cached.ext4" || fail "$1: export --from-layers differs from the cached image"
		want=$(sha256sum "$T/fl.ext4" | cut -d' ' -f1)
		build_ok "$2" --force -o "$T/fresh.ext4" >/dev/null
		[ "$(sha256sum "$T/fresh.ext4" | cut -d' ' -f1)" = "$want" ] || fail "$1: a fresh build gives other bytes"
	fi
}

# after_crash NAME: verify, then what the crash left is collected
after_crash() {
	"$IB" cache verify --cache-dir "$C" >"$T/v0.log" 2>&1 || fail "$1: cache verify after the crash: $(cat "$T/v0.log")"
	"$IB" gc --cache-dir "$C" --max-bytes 1T >"$T/gc0.log" 2>&1 || fail "$1: gc after the crash: $(cat "$T/gc0.log")"
	"$IB" cache verify --cache-dir "$C" >"$T/v0.log" 2>&1 || fail "$1: cache verify after gc: $(cat "$T/v0.log")"
	if grep -q orphan "$T/v0.log"; then fail "$1: gc left orphans: $(grep orphan "$T/v0.log")"; fi
	cache_sound "$C"
}

# zst_again NAME ID: export --zstd works again and gives the image's bytes ($T/img.ext4)
zst_again() {
	"$IB" export --cache-dir "$C" "$2" --zstd "$T/a.zst" 2>"$T/exp.log" ||
		fail "$1: export --zstd again failed: $(cat "$T/exp.log")"
	zstd -q -d -c "$T/a.zst" | cmp -s - "$T/img.ext4" || fail "$1: the .zst does not give the image's bytes"
}

python_ready=""
repo_n=0
py_n=100
exec 3< "$T/points"
while read -r name action _state <&3; do
	spec=$(spec_for "$name")
	case $action in
	build)
		IMAGEBUILDER_CRASH_AT=$name "$IB" build --cache-dir "$C" "$spec" >/dev/null 2>"$T/crash.log"
		crashed "$name" $?
		after_crash "$name"
		sound "$name" "$spec"
		;;
	build-force)
		build_ok "$spec" >/dev/null
		IMAGEBUILDER_CRASH_AT=$name "$IB" build --cache-dir "$C" --force "$spec" >/dev/null 2>"$T/crash.log"
		crashed "$name" $?
		after_crash "$name"
		# the exact window of the re-commit: a plain build still finds a sound image
		id=$(build_ok "$spec" --json | $PY -c 'import json,sys; d=json.load(sys.stdin); print(d["image_id"])')
		"$IB" export --cache-dir "$C" "$id" --from-layers -o "$T/fl.ext4" ||
			fail "$name: export --from-layers after the crash failed"
		build_ok "$spec" --force >/dev/null
		sound "$name" "$spec"
		;;
	artifact)
		id=$(build_ok "$spec" -o "$T/img.ext4")
		IMAGEBUILDER_CRASH_AT=$name "$IB" export --cache-dir "$C" "$id" --zstd "$T/a.zst" 2>"$T/crash.log"
		crashed "$name" $?
		after_crash "$name"
		zst_again "$name" "$id"
		sound "$name" "$spec"
		;;
	repair-artifact)
		id=$(build_ok "$spec" -o "$T/img.ext4")
		"$IB" export --cache-dir "$C" "$id" --zstd "$T/a.zst" 2>"$T/exp.log" || fail "$name: export --zstd failed"
		z=$(ls "$C/images/$id"*.ext4.zst)
		printf x >> "$z"
		IMAGEBUILDER_CRASH_AT=$name "$IB" cache verify --repair --cache-dir "$C" >/dev/null 2>"$T/crash.log"
		crashed "$name" $?
		after_crash "$name"
		zst_again "$name" "$id"
		sound "$name" "$spec"
		;;
	gc-layer)
		# a layer no image needs (its build failed one step later), evicted first
		printf '{"base": "debian_amd64", "steps": [{"run_commands": ["echo %s %s"]}, {"run_commands": ["false"]}]}\n' \
			"$name" "$nonce" > "$T/unneeded.json"
		"$IB" build --cache-dir "$C" "$T/unneeded.json" >/dev/null 2>&1 && fail "$name: the failing build passed"
		IMAGEBUILDER_CRASH_AT=$name "$IB" gc --cache-dir "$C" --max-bytes 1 >/dev/null 2>"$T/crash.log"
		crashed "$name" $?
		after_crash "$name"
		"$IB" gc --cache-dir "$C" --max-bytes 1 >"$T/gc.log" 2>&1 || fail "$name: gc again failed: $(cat "$T/gc.log")"
		sound "$name" "$spec"
		;;
	gc-image)
		build_ok "$spec" >/dev/null
		sleep 1.1 # --keep-days 0 evicts what was last used before this second
		IMAGEBUILDER_CRASH_AT=$name "$IB" gc --cache-dir "$C" --keep-days 0 >/dev/null 2>"$T/crash.log"
		crashed "$name" $?
		after_crash "$name"
		"$IB" gc --cache-dir "$C" --keep-days 0 >"$T/gc.log" 2>&1 || fail "$name: gc again failed: $(cat "$T/gc.log")"
		sound "$name" "$spec"
		;;
	python)
		if [ -z "$python_ready" ]; then
			python_fixture
			python_ready=1
		fi
		# an archive (and so a python layer) of its own, not yet downloaded
		py_n=$((py_n + 1))
		v="3.11.$py_n"
		python_archive "$v" "$name-$nonce"
		printf '{"base": "debian_amd64", "disk_size": "512M", "python_version": "%s", "steps": [{"run_commands": ["echo %s %s"]}]}\n' \
			"$v" "$name" "$nonce" > "$spec"
		IMAGEBUILDER_CRASH_AT=$name "$IB" build --cache-dir "$C" "$spec" >/dev/null 2>"$T/crash.log"
		crashed "$name" $?
		after_crash "$name"
		sound "$name" "$spec"
		[ -f "$C/downloads/$PBS_DIGEST.tar.gz" ] || fail "$name: the archive is not in the store after the re-run"
		;;
	warm-git)
		repo_n=$((repo_n + 1))
		r="$T/repo$repo_n"
		mkdir -p "$r"
		cp "$spec" "$r/spec.json"
		git -C "$r" init -q -b main && git -C "$r" add spec.json &&
			git -C "$r" -c user.email=t@t -c user.name=t commit -q -m spec || fail "cannot make a repository"
		IMAGEBUILDER_CRASH_AT=$name "$IB" warm --cache-dir "$C" --git "file://$r" --ref main \
			>/dev/null 2>"$T/crash.log"
		crashed "$name" $?
		after_crash "$name"
		"$IB" warm --cache-dir "$C" --git "file://$r" --ref main >"$T/warm.log" 2>&1 ||
			fail "$name: warm again failed: $(cat "$T/warm.log")"
		sound "$name" "$spec"
		;;
	serve)
		export IMAGEBUILDER_CRASH_AT="$name"
		serve_start
		unset IMAGEBUILDER_CRASH_AT
		pid=$SERVE_PID
		rpc BuildImage "{\"spec\": $(cat "$spec")}" >/dev/null
		first=$(out 'd.get("build_id", "")' 2>/dev/null)
		i=0
		while kill -0 "$pid" 2>/dev/null; do
			i=$((i + 1)); [ $i -gt 1200 ] && fail "$name: serve did not reach the crash point"
			sleep 0.1
		done
		wait "$pid"
		crashed "$name" $?
		SERVE_PID=""
		after_crash "$name"
		serve_start
		build_image "$spec"
		wait_build "$BID" READY 300
		if [ -n "$first" ] && [ "$first" != "$BID" ]; then
			rpc GetBuild "{\"build_id\": \"$first\"}" >/dev/null
			case "$(out 'd["status"]')" in
			FAILED) out 'd["error"]["message"]' | grep -q interrupted ||
				fail "$name: the interrupted build's record: $(cat "$T/out.json")" ;;
			READY) ;;
			*) fail "$name: the interrupted build is $(out 'd["status"]') after the restart" ;;
			esac
		fi
		serve_stop
		[ "$SERVE_RC" = 0 ] || fail "$name: serve exited $SERVE_RC"
		sound "$name" "$spec"
		;;
	*)
		fail "crash point $name: no test knows the action '$action'"
		;;
	esac
	ok "$name ($action): crashed there, the cache verifies, its leftovers are collected, the action succeeds again"
done
exec 3<&-
ok "all $npoints crash points walked"

#!/bin/sh
# Benchmark (not a test): two builder nodes sharing a cache through an OCI
# registry (Debian's docker-registry on loopback, storage on this disk).
#
#   node A cold   an empty cache: debian_amd64 + apt_install(git, curl) -> ext4
#   push          warm --push of that spec to an empty registry (every layer
#                 as tar+zstd, the image as ext4+zstd and its bmap)
#   node B        an empty cache, --remote: the same spec; every layer pulled,
#                 verified, the image exported here    (target <= 0.3x node A)
#   image .zst    imagebuilder pull -o X.ext4.zst (the artifact as it is,
#                 digest checked as it comes)  vs  skopeo copy of the same
#                 artifact to dir:, compressed bytes a second (target >= 0.8x)
#   image ext4    imagebuilder pull -o X.ext4 (decompressed as it comes)
#                 vs  skopeo copy + zstd -d of its blob
#   layer pulls   node B's pulls (download, digest, unpack as it comes,
#                 tree digest, sync)  vs  skopeo copy of the same layer
#                 artifacts + tar --zstd -x of each blob (no tree check)
# and the bytes each moves.  Throughputs are the artifacts' (compressed)
# bytes over the time; each ratio is the yardstick's time over ours.
set -eu
BUILD=${1:-build}
top=$(cd "$(dirname "$0")/.." && pwd)
IB="$top/$BUILD/imagebuilder"
W=$(mktemp -d /var/tmp/ib-bench-remote.XXXXXX)
REG=""
trap '[ -n "$REG" ] && kill "$REG" 2>/dev/null; rm -rf "$W"' EXIT INT TERM
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-1686355200}
now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
mb() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
mbs() { awk -v b="$1" -v t="$2" 'BEGIN { printf "%.1f", b / 1048576 / t }'; }

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
printf 'version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: %s/registry\nhttp:\n  addr: 127.0.0.1:%s\n' \
	"$W" "$port" > "$W/registry.yml"
docker-registry serve "$W/registry.yml" >"$W/registry.log" 2>&1 &
REG=$!
i=0
until curl -sf "http://127.0.0.1:$port/v2/" >/dev/null; do
	i=$((i + 1)); [ $i -gt 100 ] && { echo "the registry did not start" >&2; exit 1; }
	sleep 0.1
done
REMOTE="http://127.0.0.1:$port/bench/cache"
printf '{"base":"debian_amd64","steps":[{"apt_install":["git","curl"]}]}' > "$W/spec.json"

echo "imagebuilder remote bench on $(nproc) cores, $(uname -r), $(date -u +%F)"
s=$(now)
"$IB" build --cache-dir "$W/a" --json -o "$W/a.ext4" "$W/spec.json" > "$W/a.json" 2>"$W/a.log"
t_a=$(since "$s")
s=$(now)
"$IB" warm --push --cache-dir "$W/a" --remote "$REMOTE" "$W/spec.json" >/dev/null 2>"$W/push.log"
t_push=$(since "$s")
s=$(now)
"$IB" build --cache-dir "$W/b" --remote "$REMOTE" --json -o "$W/b.ext4" "$W/spec.json" > "$W/b.json" 2>"$W/b.log"
t_b=$(since "$s")
cmp -s "$W/a.ext4" "$W/b.ext4" || { echo "node B's image differs from node A's" >&2; exit 1; }
grep -q '"source": *"built"\|"source": *"cache"' "$W/b.json" && { echo "node B did not pull every layer" >&2; exit 1; }

# what the registry holds for the spec: each artifact's blob sizes
iid=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["image_id"])' "$W/a.json")
keys=$(python3 -c 'import json, sys; print(" ".join(l["key"] for l in json.load(open(sys.argv[1]))["layers"]))' "$W/a.json")
blob_bytes() { # TAG: the bytes of its blobs
	curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json' \
		"http://127.0.0.1:$port/v2/bench/cache/manifests/$1" |
		python3 -c 'import json, sys; print(sum(l["size"] for l in json.load(sys.stdin)["layers"]))'
}
layer_bytes=0
for k in $keys; do layer_bytes=$((layer_bytes + $(blob_bytes "layer-$k"))); done
image_bytes=$(blob_bytes "image-$iid")
t_pulls=$(sed -n 's/.*pulled from the remote in \([0-9.]*\)s.*/\1/p' "$W/b.log" | paste -sd+ | bc)

s=$(now)
n=0
for k in $keys; do
	skopeo copy -q --src-tls-verify=false "docker://127.0.0.1:$port/bench/cache:layer-$k" "dir:$W/sk-layer-$n" >/dev/null
	blob=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["layers"][0]["digest"].split(":")[1])' \
		"$W/sk-layer-$n/manifest.json")
	mkdir "$W/tar-$n"
	tar --zstd --numeric-owner --xattrs --warning=no-unknown-keyword -xf "$W/sk-layer-$n/$blob" -C "$W/tar-$n"
	n=$((n + 1))
done
sync -f "$W"
t_sk_layers=$(since "$s")

s=$(now)
"$IB" pull --remote "$REMOTE" "$iid" -o "$W/pulled.ext4.zst" >/dev/null 2>"$W/pull.log"
t_pull_zst=$(since "$s")
s=$(now)
skopeo copy -q --src-tls-verify=false "docker://127.0.0.1:$port/bench/cache:image-$iid" "dir:$W/sk-image" >/dev/null
t_sk_image=$(since "$s")
zst_bytes=$(stat -c %s "$W/pulled.ext4.zst")

s=$(now)
"$IB" pull --remote "$REMOTE" "$iid" -o "$W/pulled.ext4" >/dev/null 2>"$W/pull.log"
t_pull=$(since "$s")
cmp -s "$W/a.ext4" "$W/pulled.ext4" || { echo "the pulled image differs" >&2; exit 1; }
s=$(now)
skopeo copy -q --src-tls-verify=false "docker://127.0.0.1:$port/bench/cache:image-$iid" "dir:$W/sk-image2" >/dev/null
blob=$(python3 -c 'import json, sys; m = json.load(open(sys.argv[1])); print([l for l in m["layers"] if l["mediaType"].endswith("ext4+zstd")][0]["digest"].split(":")[1])' \
	"$W/sk-image2/manifest.json")
zstd -q -d --sparse "$W/sk-image2/$blob" -o "$W/sk.ext4"
sync -f "$W"
t_sk_ext4=$(since "$s")
cmp -s "$W/a.ext4" "$W/sk.ext4" || { echo "skopeo + zstd made another image" >&2; exit 1; }

printf '\n%-30s %14s %14s %7s %s\n' "case" "imagebuilder" "yardstick" "ratio" "target"
printf '%-30s %13.1fs %14s %7s %s\n' "node A cold build" "$t_a" "" "" ""
printf '%-30s %13.1fs %14s %7s %s\n' "push (warm --push)" "$t_push" "" "" ""
printf '%-30s %13.1fs %13.1fs %7s %s\n' "node B (all pulled) vs node A" "$t_b" "$t_a" "$(ratio "$t_b" "$t_a")" "<= 0.3x"
row() { # NAME BYTES OURS YARDSTICK
	printf '%-30s %10s MB/s %9s MB/s %7s %s\n' "$1" "$(mbs "$2" "$3")" "$(mbs "$2" "$4")" "$(ratio "$4" "$3")" ">= 0.8x"
}
row "image .zst vs skopeo copy" "$zst_bytes" "$t_pull_zst" "$t_sk_image"
row "image ext4 vs skopeo + zstd -d" "$zst_bytes" "$t_pull" "$t_sk_ext4"
row "layers vs skopeo + tar -x" "$layer_bytes" "$t_pulls" "$t_sk_layers"
printf '\nbytes moved: node B pulled %s MB of layers (%s layers, %.1fs in pulls, %.1fs in all); the image\n' \
	"$(mb "$layer_bytes")" "$n" "$t_pulls" "$t_b"
printf 'artifact is %s MB (.zst + bmap) for a %s MB ext4 (%s MB allocated)\n' "$(mb "$image_bytes")" \
	"$(mb "$(stat -c %s "$W/a.ext4")")" "$(mb "$(($(stat -c %b "$W/a.ext4") * 512))")"

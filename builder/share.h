#ifndef IB_SHARE_H
#define IB_SHARE_H

/*
 * Layers shared through the remote (--remote, cache/remote.h): each layer
 * key has one OCI artifact manifest, tagged layer-<key>, whose one blob is
 * the layer's tar+zstd (layer/blob.h) and whose annotations carry the key,
 * the parent, the kind, the step and the tree digest.  Manifests hold no
 * time or place, so two nodes that push the same layer push the same bytes.
 */

#include "cache/cache.h"
#include "cache/remote.h"
#include "layer/walk.h"

#define IB_SHARE_LAYER_TYPE "application/vnd.imagebuilder.layer.v1"
#define IB_SHARE_LAYER_BLOB "application/vnd.imagebuilder.layer.v1.tar+zstd"

typedef struct ib_share_layer {
	const char *key, *parent, *kind, *step; /* parent "" for a base */
} ib_share_layer;

/* Has the remote layer key? 1 yes, 0 no, <0 (error set) the remote failed. */
int ib_share_layer_exists(ib_remote *r, const char *key);

/*
 * Pull layer l into the cache, if the remote has it (the caller holds the
 * layer's exclusive lock and the parent is indexed): unpacked as it
 * arrives, in a child process, at most max_bytes of file content (a
 * layer larger than a build here may write is refused); the blob's size
 * and digest and the unpacked tree's digest are checked before it is
 * committed.  1 pulled,
 * 0 the remote has none, <0 (error set: the reason, for a warning) when the
 * remote failed or what it sent does not verify; nothing enters the cache
 * then.
 */
int ib_share_pull(ib_remote *r, ib_cache *cache, const ib_share_layer *l, const ib_walk_opts *opts,
		  uint64_t max_bytes);

/* Push the cached layer l, unless the remote has it: 1 pushed, 0 it was there, <0 failed. */
int ib_share_push(ib_remote *r, ib_cache *cache, const ib_share_layer *l, const ib_walk_opts *opts);

#define IB_SHARE_IMAGE_TYPE "application/vnd.imagebuilder.image.v1"
#define IB_SHARE_IMAGE_ZST "application/vnd.imagebuilder.rootfs.ext4+zstd"
#define IB_SHARE_IMAGE_BMAP "application/vnd.imagebuilder.rootfs.bmap+xml"

/*
 * Push the cached image (tag image-<id>): its ext4 as zstd and its bmap,
 * annotated with the image id, the ext4's sha256 and size, arch and base.
 * 1 pushed, 0 the remote has it, <0 failed.
 */
int ib_share_image_push(ib_remote *r, ib_cache *cache, const char *image_id);

/*
 * The image from the remote into out_path: decompressed as it arrives,
 * beside out_path (holes where the image has zeros), checked (the blob's
 * digest, zstd's content checksums, the size in the manifest), renamed
 * into place.  With zst, the compressed artifact as it is (checked by its
 * digest), for zstd -d or bmaptool.  IB_ENOTFOUND when the remote has no
 * such image.
 */
int ib_share_image_pull(ib_remote *r, const char *image_id, const char *out_path, bool zst);

#endif

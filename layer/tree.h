#ifndef IB_TREE_H
#define IB_TREE_H

#include <stdint.h>

#include "layer/walk.h"
#include "lib/hash.h"

/*
 * One layer directory on its own (no merging): what a builder does to a
 * finished upper dir, and the digest that the cache index keeps for it.
 */

/*
 * Make a finished upper dir reproducible: strip overlayfs bookkeeping
 * xattrs (keeping opaque markers on directories), clamp every timestamp to
 * epoch.
 */
int ib_tree_normalise(const char *dir, int64_t epoch, const ib_walk_opts *opts);

/*
 * SHA-256 over a sorted walk (names, types, modes, owners, sizes, mtimes,
 * device numbers, link targets, xattrs, contents): whiteouts and opaque
 * markers included, so it covers what the layer means.  Version 1 hashes
 * file contents byte for byte (layers indexed before 0.1.5); version 2
 * counts runs of zero blocks instead of hashing them and never reads a
 * hole.  *out_bytes (allocated) and *out_files may be NULL.
 */
#define IB_TREE_DIGEST_V1	1
#define IB_TREE_DIGEST_V2	2
#define IB_TREE_DIGEST_CURRENT	IB_TREE_DIGEST_V2
int ib_tree_digest(char hex[IB_SHA256_HEX], const char *dir, int version, const ib_walk_opts *opts,
		   uint64_t *out_bytes, uint64_t *out_files);

#endif

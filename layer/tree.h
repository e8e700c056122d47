#ifndef IB_TREE_H
#define IB_TREE_H

#include <stdint.h>

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
int ib_tree_normalise(const char *dir, int64_t epoch);

/*
 * SHA-256 over a sorted walk (names, types, modes, owners, sizes, mtimes,
 * device numbers, link targets, xattrs, contents): whiteouts and opaque
 * markers included, so it covers what the layer means.  *out_bytes
 * (allocated) and *out_files may be NULL.
 */
int ib_tree_digest(char hex[IB_SHA256_HEX], const char *dir, uint64_t *out_bytes, uint64_t *out_files);

#endif

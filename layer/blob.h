#ifndef IB_LAYER_BLOB_H
#define IB_LAYER_BLOB_H

/*
 * One layer's own tree (an overlay upper dir as the cache keeps it:
 * whiteouts, opaque directories and all) as a tar+zstd blob, the form a
 * layer takes in an OCI registry, and back.
 *
 * The blob is a function of the tree: entries in the walk's sorted order,
 * named "./path", numeric owners only, mtime the one time kept, xattrs in
 * pax headers, a second name of a file as a hard link, zstd level 3 on one
 * thread.  So two nodes that built the same layer push the same bytes.
 */

#include <stdint.h>

#include "lib/hash.h"
#include "layer/walk.h"

/* Pack the tree at dir into out_path; its SHA-256 in digest_hex, its size in *size. */
int ib_layer_blob_pack(const char *dir, const char *out_path, const ib_walk_opts *opts,
		       char digest_hex[IB_SHA256_HEX], uint64_t *size);

/*
 * Unpack a blob into the empty directory dir, in a child process that
 * works inside dir and lets no entry out of it (absolute names, "..",
 * paths through symlinks are refused).  Owners, modes, times and xattrs
 * are kept.  At most max_entries entries.
 */
int ib_layer_blob_unpack(const char *blob, const char *dir, uint64_t max_entries);
/*
 * The same from a stream: the blob's bytes as they are read from fd (a
 * download as it arrives), at most max_bytes of file content.  What it
 * unpacked is trusted only once the stream is verified.
 */
int ib_layer_blob_unpack_fd(int fd, const char *dir, uint64_t max_entries, uint64_t max_bytes);

#endif

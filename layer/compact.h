#ifndef IB_COMPACT_H
#define IB_COMPACT_H

#include <stdbool.h>
#include <stdint.h>

/*
 * Compact forms of an image file for transfer: both read only the file's
 * data (SEEK_DATA/SEEK_HOLE), so a 4 GiB image that holds 300 MiB costs
 * 300 MiB of reading.
 *
 * ib_zstd_write(): a zstd stream (RFC 8878) of the exact bytes of in_path,
 * holes as zeros, with a content checksum and the content size in the
 * frame header; libzstd's workers (threads of them, 0: one per CPU) at
 * level 3.  The same input gives the same bytes, whatever the thread count.
 *
 * ib_bmap_write(): bmaptool's block map, format 2.0: the 4 KiB blocks that
 * hold data, as ranges, each with the SHA-256 of its bytes, and the file's
 * own SHA-256 (BmapFileChecksum), so `bmaptool copy` writes only those
 * blocks and checks them.
 *
 * Both write beside out_path and rename into place; *out_bytes (may be
 * NULL) receives the size written.
 */
int ib_zstd_write(const char *in_path, const char *out_path, unsigned threads, uint64_t *out_bytes);

/*
 * The other way, as a stream (a download as it arrives): a zstd stream
 * decompressed into out_path, zero blocks left as holes (an image file as
 * the cache keeps it), at most max bytes, written in place (the caller
 * renames).  Open out_path, write the compressed bytes as they come, close.  ib_unzstd_close() with finish
 * checks that the stream ended where a frame does (zstd checks each
 * frame's content checksum as it ends), writes the tail and syncs; without
 * it, it only frees.
 */
typedef struct ib_unzstd ib_unzstd;
int ib_unzstd_open(ib_unzstd **out, const char *out_path, uint64_t max);
int ib_unzstd_write(ib_unzstd *u, const void *data, size_t len);
int ib_unzstd_close(ib_unzstd *u, bool finish);
int ib_bmap_write(const char *in_path, const char *out_path, uint64_t *out_bytes);

#endif

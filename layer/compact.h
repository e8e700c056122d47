#ifndef IB_COMPACT_H
#define IB_COMPACT_H

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
 * The other way: the zstd stream at in_path decompressed into out_path,
 * zero blocks left as holes (an image file as the cache keeps it); at most
 * max bytes.  Written in place: the caller renames.
 */
int ib_zstd_read(const char *in_path, const char *out_path, uint64_t max);
int ib_bmap_write(const char *in_path, const char *out_path, uint64_t *out_bytes);

#endif

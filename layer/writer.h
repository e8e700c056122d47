#ifndef IB_WRITER_H
#define IB_WRITER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/*
 * Writing a layer stack (layers[] bottom first, merged by the rules of
 * layer/overlay.h) as one file system image or archive, directly from the
 * layers: no flattened copy, nothing mounted.
 */

typedef struct ib_export_opts {
	const char *image_id; /* 64 hex digits: UUID and hash seed derive from it */
	int64_t epoch;        /* every timestamp is clamped to this (SOURCE_DATE_EPOCH) */
	/*
	 * ext4: the file system's size in bytes (a multiple of 4 KiB), with
	 * at least one inode per 16 KiB; 0: the content plus headroom (images
	 * made before disk_size).
	 */
	uint64_t size;
	/* no /lost+found made when the layers have none (a VM's view of the layers, not an image) */
	bool no_lost_found;
} ib_export_opts;

/*
 * Write a raw ext4 image (no partition table) to out_path, replacing it.
 * Of opts->size bytes (or sized to the content plus headroom, see ext4.c),
 * sparse, e2fsck clean, the same bytes for the same layers and options.
 * Content that does not fit opts->size is IB_EINVALID, the message naming
 * disk_size, the content's size and the smallest size that fits.
 * *out_bytes (may be NULL) receives the image's apparent size.
 */
int ib_ext4_write(const char *out_path, const char *const *layers, size_t nlayers,
		  const ib_export_opts *opts, uint64_t *out_bytes);

/*
 * The same, into the open file fd (emptied first, then sized), in place:
 * for a file another program holds open, such as a VM's disk.  what names
 * it in messages.
 */
int ib_ext4_write_fd(int fd, const char *what, const char *const *layers, size_t nlayers,
		     const ib_export_opts *opts, uint64_t *out_bytes);

/* Write the merged tree as a tar (pax, sorted, numeric owners, clamped times). */
int ib_tar_write(const char *out_path, const char *const *layers, size_t nlayers,
		 const ib_export_opts *opts);

#endif

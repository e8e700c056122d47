#ifndef IB_EXT4READ_H
#define IB_EXT4READ_H

#include <stdint.h>

/*
 * Reading a directory back out of an ext4 image without mounting it: a VM
 * step's guest leaves its overlayfs upper dir on a scratch disk, and the
 * host copies it out with libext2fs.  The guest is not trusted, so the
 * image is hostile input: every name, inode number, type, size and block
 * reference is checked, nothing is made but beneath dest (each entry by an
 * *at() call on the fd of the parent this copy made, no symlink followed),
 * and the walk is bounded by IB_TREE_DEPTH_MAX, IB_TREE_ENTRIES_MAX,
 * IB_TREE_PATH_MAX, max_bytes and the deadline.
 */

typedef struct ib_ext4_extract_opts {
	uint64_t max_bytes;   /* file data copied, holes not counted (0: no limit): over it, IB_ERROR naming --disk */
	double deadline;      /* ib_now() after which it stops with IB_ETIMEOUT; 0: none */
	volatile int *cancel; /* non-zero: stop with IB_ECANCELED; may be NULL */
} ib_ext4_extract_opts;

/*
 * Copy the directory src_path (absolute in the image, "/s3/upper") of the
 * ext4 image file image into dest, an existing empty directory: types,
 * contents (holes kept), owners, modes (setuid included), atime and mtime
 * to the nanosecond, xattrs (overlayfs markers, capabilities, POSIX ACLs
 * in the kernel's format), device numbers (whiteouts are char 0:0), hard
 * links as links.  dest's own owner, mode, xattrs and times become those
 * of src_path.  Runs as root.  The image must be cleanly unmounted (or
 * remounted read-only); it is only read.  opts may be NULL (no limits).
 * 0, IB_ENOTFOUND when src_path is not in the image, or another negative
 * code with the message set; on error dest may hold a partial copy, for
 * the caller to remove.
 */
int ib_ext4_extract(const char *image, const char *src_path, const char *dest, const ib_ext4_extract_opts *opts);

/*
 * The same from the image open at fd (only read, with pread: its offset is
 * not used), image naming it in messages.  Its superblock's geometry is
 * checked against the file before libext2fs reads it.
 */
int ib_ext4_extract_fd(int fd, const char *image, const char *src_path, const char *dest,
		       const ib_ext4_extract_opts *opts);

#endif

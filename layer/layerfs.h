#ifndef IB_LAYERFS_H
#define IB_LAYERFS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/stat.h>

#include "lib/limits.h"

/*
 * The merged view of a stack of overlayfs upper directories, walked without
 * mounting anything.  layers[] is bottom first, merged by the rules of
 * layer/overlay.h.  Metadata (stat, xattrs) of a merged directory is its
 * topmost layer's; trusted.overlay.* xattrs are never reported.
 *
 * Entries come in pre-order, siblings sorted by strcmp() of their names, so
 * two walks of the same layers see the same sequence.  Every access is
 * relative to an open directory (openat, fstatat, readlinkat) and no
 * symlink is ever followed.
 */

/* Directory levels below the root that a walk accepts. */
#define IB_LAYERFS_DEPTH_MAX	IB_TREE_DEPTH_MAX
/* Longest relative path a walk accepts, like PATH_MAX. */
#define IB_LAYERFS_PATH_MAX	4096

typedef struct ib_layerfs_xattr {
	const char *name;	/* full name: "user.foo", "security.capability" */
	const void *value;
	size_t size;
} ib_layerfs_xattr;

typedef struct ib_layerfs_entry ib_layerfs_entry;

/*
 * One entry of the merged tree.  Everything here belongs to the walk and is
 * valid during the callback only, with two exceptions: a directory's entry
 * lives from its enter() to its leave() (children reach it through
 * ->parent), and ->name lives until leave() of the parent has returned, so a
 * writer may keep the names of a directory's children until it writes that
 * directory.
 */
struct ib_layerfs_entry {
	const ib_layerfs_entry *parent;	/* NULL for the root */
	const char *path;		/* relative, "usr/bin/ls"; "" for the root */
	const char *name;		/* last component; "" for the root */
	unsigned depth;			/* 0 for the root */
	size_t layer;			/* index into layers[] of the layer it comes from */
	int dirfd;			/* directory in that layer holding name; -1 for the root */
	int fd;				/* regular files and directories: open O_RDONLY; else -1 */
	struct stat st;			/* lstat() of the entry in its layer */
	const char *symlink;		/* symlinks: the target; else NULL */
	const ib_layerfs_xattr *xattrs;	/* sorted by name */
	size_t nxattrs;
	/*
	 * Hard links: a non-directory with st_nlink > 1 gets an id (1, 2, ...)
	 * shared by every entry of the walk that is the same file (same
	 * layer, st_dev, st_ino).  link_first is the path of the first such
	 * entry, NULL on the first one itself.  0 and NULL otherwise.  The
	 * number of entries sharing an id is what the merged tree shows and
	 * can be lower than st_nlink (other names may be hidden).
	 */
	uint64_t link_id;
	const char *link_first;
	void *data;			/* the caller's, for directories: set in enter() */
};

typedef struct ib_layerfs_ops {
	/* Every entry, the root first; a negative return stops the walk. */
	int (*enter)(void *ctx, ib_layerfs_entry *e);
	/* Directories, after their contents; may be NULL. */
	int (*leave)(void *ctx, ib_layerfs_entry *e);
} ib_layerfs_ops;

/*
 * Walk the merged tree of layers[0..nlayers) (bottom first).  Returns 0,
 * the first negative value a callback returned, or IB_ERROR with the
 * message set when a layer cannot be read.
 */
int ib_layerfs_walk(const char *const *layers, size_t nlayers,
		    const ib_layerfs_ops *ops, void *ctx);

/*
 * The data of a regular file entry, as segments [start, end) in order,
 * holes left out (SEEK_DATA/SEEK_HOLE).  A file whose blocks cover its size,
 * or on a file system without hole support, is one segment, and
 * *out_holes (may be NULL) is false.  A negative return of fn stops it.
 */
typedef int (*ib_layerfs_segment_cb)(void *arg, off_t start, off_t end);
int ib_layerfs_data_segments(const ib_layerfs_entry *e, ib_layerfs_segment_cb fn, void *arg, bool *out_holes);

#endif

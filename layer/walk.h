#ifndef IB_WALK_H
#define IB_WALK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/stat.h>

/*
 * A walk of one directory tree (a layer's upper dir, a scratch dir), in
 * sorted name order, iterative: it follows no symlink (every entry is
 * reached by openat() from its parent's fd with O_NOFOLLOW), keeps one open
 * fd per level, and stops with an error that names the limit when the tree
 * is deeper than IB_TREE_DEPTH_MAX or holds more than IB_TREE_ENTRIES_MAX
 * entries, and with IB_ETIMEOUT/IB_ECANCELED at the deadline or on cancel.
 */

typedef struct ib_walk_entry {
	int dirfd;        /* the directory that holds it */
	const char *name; /* its name there ("." for the root: dirfd is the root) */
	const char *path; /* below the root: "" for the root, "etc/passwd" */
	struct stat st;   /* lstat */
	int fd;           /* a directory's own fd, open while it is walked; -1 otherwise */
	size_t depth;     /* 0 for the root */
} ib_walk_entry;

typedef struct ib_walk_ops {
	/* Before a directory's children.  <0 stops the walk; 1 skips the children (leave still runs). */
	int (*enter)(void *arg, const ib_walk_entry *e);
	/* A directory after its children; may be NULL. */
	int (*leave)(void *arg, const ib_walk_entry *e);
} ib_walk_ops;

typedef struct ib_walk_opts {
	double deadline;        /* ib_now() after which the walk stops with IB_ETIMEOUT; 0: none */
	volatile int *cancel;   /* non-zero: stop with IB_ECANCELED; may be NULL */
	const char *what;       /* names the tree in messages ("the layer") */
} ib_walk_opts;

int ib_walk(const char *root, const ib_walk_opts *opts, const ib_walk_ops *ops, void *arg);

/* Check the deadline and cancel flag of opts (NULL: none): 0, IB_ETIMEOUT or IB_ECANCELED. */
int ib_walk_check_time(const ib_walk_opts *opts);

/*
 * The path of an entry for the *xattr(2) calls that take one:
 * /proc/self/fd/<dirfd>/<name>, which resolves the entry in its parent
 * without following it when it is a symlink.
 */
void ib_walk_proc_path(char out[64 + 256], const ib_walk_entry *e);

/* The longest list of xattr names, and the largest value, the walks read. */
#define IB_XATTR_LIST_MAX 65536

/* Sorted xattr names of an entry (not following it); *out NULL when none. */
int ib_walk_xattrs(const ib_walk_entry *e, char ***out, size_t *out_n);
void ib_walk_free_names(char **names, size_t n);

#endif

/*
 * The tree copy: a step's upper dir from the build's own disk (the loop
 * file system that --disk bounds) into the cache.  One walk of src
 * (layer/walk.c: no link followed, limits and deadline kept), and each
 * entry made in dst by openat()/mkdirat()/mknodat() on the fd of its
 * parent, so nothing resolves outside dst either.  A directory's own
 * owner, mode, xattrs and times are set when the walk leaves it, after its
 * children changed its mtime.
 */
#include "layer/copy.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#include "lib/limits.h"
#include "lib/util.h"

/* The first copy of each multiply linked inode: later names link to it. */
struct link {
	dev_t dev;
	ino_t ino;
	char *path;
};

struct copy_state {
	const char *dst;
	int fds[IB_TREE_DEPTH_MAX + 2]; /* per depth: the dst directory being filled */
	struct link *links;             /* open addressing, cap a power of two */
	size_t nlinks, cap;
	size_t link_bytes;              /* of the paths kept, at most IB_TREE_LINK_NAMES_MAX */
	char *xval;
};

static struct link *link_slot(struct copy_state *cs, dev_t dev, ino_t ino)
{
	size_t i = ((size_t)ino * 0x9E3779B97F4A7C15ULL ^ (size_t)dev) & (cs->cap - 1);

	while (cs->links[i].path && (cs->links[i].ino != ino || cs->links[i].dev != dev))
		i = (i + 1) & (cs->cap - 1);
	return &cs->links[i];
}

/* The path of an earlier name of e's inode, or NULL (e is then remembered); *err on too many. */
static const char *first_link(struct copy_state *cs, const ib_walk_entry *e, int *err)
{
	struct link *slot;
	size_t len = strlen(e->path) + 1;

	if (cs->nlinks * 2 >= cs->cap) {
		struct link *old = cs->links;
		size_t old_cap = cs->cap;

		cs->cap = cs->cap ? cs->cap * 2 : 64;
		cs->links = ib_xcalloc(cs->cap, sizeof(*cs->links));
		for (size_t i = 0; i < old_cap; i++)
			if (old[i].path)
				*link_slot(cs, old[i].dev, old[i].ino) = old[i];
		free(old);
	}
	slot = link_slot(cs, e->st.st_dev, e->st.st_ino);
	if (slot->path)
		return slot->path;
	if ((cs->link_bytes += len) > IB_TREE_LINK_NAMES_MAX) {
		*err = ib_error_set("'%.200s' in %s: more than %d MiB of hard-linked names (IB_TREE_LINK_NAMES_MAX)",
				    e->path, cs->dst, IB_TREE_LINK_NAMES_MAX >> 20);
		return NULL;
	}
	*slot = (struct link){ .dev = e->st.st_dev, .ino = e->st.st_ino, .path = ib_xstrdup(e->path) };
	cs->nlinks++;
	return NULL;
}

/* xattrs of src entry e onto dst: fd when open, else dst_path (a /proc/self/fd path). */
static int copy_xattrs(struct copy_state *cs, const ib_walk_entry *e, int fd, const char *dst_path)
{
	char src_path[64 + 256];
	char **names;
	size_t n;
	int err;

	if ((err = ib_walk_xattrs(e, &names, &n)) < 0)
		return err;
	ib_walk_proc_path(src_path, e);
	for (size_t i = 0; i < n && !err; i++) {
		ssize_t len = lgetxattr(src_path, names[i], cs->xval, IB_XATTR_LIST_MAX);

		if (len < 0)
			err = ib_error_set_errno(errno, "cannot read attribute '%s' of '%s'", names[i], e->path);
		else if ((fd >= 0 ? fsetxattr(fd, names[i], cs->xval, (size_t)len, 0)
				  : lsetxattr(dst_path, names[i], cs->xval, (size_t)len, 0)) < 0)
			err = ib_error_set_errno(errno, "cannot set attribute '%s' of '%s' in %s", names[i], e->path,
						 cs->dst);
	}
	ib_walk_free_names(names, n);
	return err;
}

/* Owner, then mode (chown clears setuid), xattrs and times of an open dst fd. */
static int finish_fd(struct copy_state *cs, const ib_walk_entry *e, int fd)
{
	struct timespec ts[2] = { e->st.st_atim, e->st.st_mtim };
	int err;

	if (fchown(fd, e->st.st_uid, e->st.st_gid) < 0 || fchmod(fd, e->st.st_mode & 07777) < 0)
		return ib_error_set_errno(errno, "cannot set the owner and mode of '%s' in %s", e->path, cs->dst);
	if ((err = copy_xattrs(cs, e, fd, NULL)) < 0)
		return err;
	if (futimens(fd, ts) < 0)
		return ib_error_set_errno(errno, "cannot set the times of '%s' in %s", e->path, cs->dst);
	return 0;
}

static int copy_file(struct copy_state *cs, const ib_walk_entry *e, int parent)
{
	int in, out, err;

	in = openat(e->dirfd, e->name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
	if (in < 0)
		return ib_error_set_errno(errno, "cannot open '%s'", e->path);
	out = openat(parent, e->name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (out < 0) {
		err = ib_error_set_errno(errno, "cannot create '%s' in %s", e->path, cs->dst);
		close(in);
		return err;
	}
	err = ib_copy_data(in, out, e->st.st_size, e->path, e->path);
	if (!err)
		err = finish_fd(cs, e, out);
	close(in);
	if (close(out) < 0 && !err)
		err = ib_error_set_errno(errno, "cannot write '%s' in %s", e->path, cs->dst);
	return err;
}

/* A symlink, device, fifo or socket. */
static int copy_special(struct copy_state *cs, const ib_walk_entry *e, int parent)
{
	struct timespec ts[2] = { e->st.st_atim, e->st.st_mtim };
	char path[64 + 256];
	int err;

	if (S_ISLNK(e->st.st_mode)) {
		char target[PATH_MAX];
		ssize_t len = readlinkat(e->dirfd, e->name, target, sizeof(target) - 1);

		if (len < 0)
			return ib_error_set_errno(errno, "cannot read link '%s'", e->path);
		target[len] = '\0';
		if (symlinkat(target, parent, e->name) < 0)
			return ib_error_set_errno(errno, "cannot create link '%s' in %s", e->path, cs->dst);
	} else if (mknodat(parent, e->name, (e->st.st_mode & S_IFMT) | 0600, e->st.st_rdev) < 0) {
		return ib_error_set_errno(errno, "cannot create '%s' in %s", e->path, cs->dst);
	}
	if (fchownat(parent, e->name, e->st.st_uid, e->st.st_gid, AT_SYMLINK_NOFOLLOW) < 0 ||
	    (!S_ISLNK(e->st.st_mode) && fchmodat(parent, e->name, e->st.st_mode & 07777, 0) < 0))
		return ib_error_set_errno(errno, "cannot set the owner and mode of '%s' in %s", e->path, cs->dst);
	snprintf(path, sizeof(path), "/proc/self/fd/%d/%s", parent, e->name);
	if ((err = copy_xattrs(cs, e, -1, path)) < 0)
		return err;
	if (utimensat(parent, e->name, ts, AT_SYMLINK_NOFOLLOW) < 0)
		return ib_error_set_errno(errno, "cannot set the times of '%s' in %s", e->path, cs->dst);
	return 0;
}

static int copy_enter(void *arg, const ib_walk_entry *e)
{
	struct copy_state *cs = arg;
	int parent = e->depth ? cs->fds[e->depth - 1] : -1;
	const char *first;
	int err = 0;

	if (S_ISDIR(e->st.st_mode)) {
		int fd;

		if (e->depth == 0) {
			if (mkdir(cs->dst, 0700) < 0)
				return ib_error_set_errno(errno, "cannot create '%s'", cs->dst);
			fd = open(cs->dst, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
		} else {
			if (mkdirat(parent, e->name, 0700) < 0)
				return ib_error_set_errno(errno, "cannot create '%s' in %s", e->path, cs->dst);
			fd = openat(parent, e->name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
		}
		if (fd < 0)
			return ib_error_set_errno(errno, "cannot open '%s' in %s", e->path, cs->dst);
		cs->fds[e->depth] = fd;
		return 0;
	}
	if (e->st.st_nlink > 1 && ((first = first_link(cs, e, &err)) || err)) {
		if (err)
			return err;
		if (linkat(cs->fds[0], first, parent, e->name, 0) < 0)
			return ib_error_set_errno(errno, "cannot link '%s' to '%s' in %s", e->path, first, cs->dst);
		return 0;
	}
	if (S_ISREG(e->st.st_mode))
		return copy_file(cs, e, parent);
	return copy_special(cs, e, parent);
}

static int copy_leave(void *arg, const ib_walk_entry *e)
{
	struct copy_state *cs = arg;
	int err = finish_fd(cs, e, cs->fds[e->depth]);

	/* the root's fd stays open for linkat() until the walk is over */
	if (e->depth) {
		close(cs->fds[e->depth]);
		cs->fds[e->depth] = -1;
	}
	return err;
}

int ib_tree_copy(const char *src, const char *dst, const ib_walk_opts *opts)
{
	static const ib_walk_ops ops = { copy_enter, copy_leave };
	struct copy_state cs = { .dst = dst, .xval = ib_xmalloc(IB_XATTR_LIST_MAX) };
	int err;

	for (size_t i = 0; i < sizeof(cs.fds) / sizeof(cs.fds[0]); i++)
		cs.fds[i] = -1;
	err = ib_walk(src, opts, &ops, &cs);
	for (size_t i = 0; i < sizeof(cs.fds) / sizeof(cs.fds[0]); i++)
		if (cs.fds[i] >= 0)
			close(cs.fds[i]);
	for (size_t i = 0; i < cs.cap; i++)
		free(cs.links[i].path);
	free(cs.links);
	free(cs.xval);
	return err;
}

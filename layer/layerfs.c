#include "layer/layerfs.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <unistd.h>

#include "layer/overlay.h"
#include "lib/util.h"

/* The kernel's XATTR_LIST_MAX and XATTR_SIZE_MAX. */
#define XATTR_LIST_BUF		65536
#define XATTR_VALUE_BUF		65536

/* A layer directory that contributes to the merged directory being read. */
struct source {
	DIR *dir;
	size_t layer;
};

/* One name as found in one source. */
struct name {
	char *name;
	unsigned src;		/* index into the sources, 0 = topmost */
	unsigned char type;	/* d_type */
};

/* A hard-link candidate seen before; path == NULL marks a free slot. */
struct link {
	dev_t dev;
	ino_t ino;
	size_t layer;
	uint64_t id;
	char *path;
};

struct walk {
	const char *const *layers;
	size_t nlayers;
	const ib_layerfs_ops *ops;
	void *ctx;
	char *listbuf;		/* XATTR_LIST_BUF bytes */
	char *valbuf;		/* XATTR_VALUE_BUF bytes */
	struct link *links;	/* open addressing, linear probing, power of two */
	size_t links_cap;
	size_t links_used;
	uint64_t next_link_id;
};

struct xattr_list {
	ib_layerfs_xattr *v;
	size_t n;
	size_t cap;
};

static void xattr_list_free(struct xattr_list *xl)
{
	for (size_t i = 0; i < xl->n; i++) {
		free((char *)xl->v[i].name);
		free((void *)xl->v[i].value);
	}
	free(xl->v);
	xl->v = NULL;
	xl->n = xl->cap = 0;
}

static int xattr_cmp(const void *a, const void *b)
{
	const ib_layerfs_xattr *x = a, *y = b;

	return strcmp(x->name, y->name);
}

static const char *layer_name(const struct walk *w, size_t layer)
{
	return w->layers[layer];
}

static const char *shown_path(const char *path)
{
	return *path ? path : ".";
}

/*
 * Read the xattrs of an open file.  by_proc: fd is an O_PATH descriptor
 * (symlinks, devices, fifos, sockets), read through /proc/self/fd, whose
 * link resolves to the inode itself and is not followed further.
 * *opaque (may be NULL) reports trusted.overlay.opaque="y".
 */
static int read_xattrs(struct walk *w, struct xattr_list *out, bool *opaque, int fd,
		       bool by_proc, const ib_layerfs_entry *e)
{
	char proc[64];
	ssize_t len, vlen;

	if (by_proc)
		snprintf(proc, sizeof(proc), "/proc/self/fd/%d", fd);
	len = by_proc ? listxattr(proc, w->listbuf, XATTR_LIST_BUF)
		      : flistxattr(fd, w->listbuf, XATTR_LIST_BUF);
	if (len < 0) {
		if (errno == ENOTSUP)
			return 0;
		return ib_error_set_errno(errno, "cannot list xattrs of '%s' in layer '%s'",
					  shown_path(e->path), layer_name(w, e->layer));
	}
	for (char *p = w->listbuf; p < w->listbuf + len; p += strlen(p) + 1) {
		ib_overlay_xattr_kind kind = ib_overlay_xattr(p);
		bool ovl = kind != IB_OVL_XATTR_CONTENT;

		if (kind == IB_OVL_XATTR_UNSUPPORTED)
			return ib_error_set("'%s' in layer '%s' carries '%s': overlayfs redirect_dir, "
					    "metacopy and xattr whiteouts are not supported",
					    shown_path(e->path), layer_name(w, e->layer), p);
		if (kind == IB_OVL_XATTR_BOOKKEEPING)
			continue;
		vlen = by_proc ? getxattr(proc, p, w->valbuf, XATTR_VALUE_BUF)
			       : fgetxattr(fd, p, w->valbuf, XATTR_VALUE_BUF);
		if (vlen < 0 && errno == ENODATA)
			continue;
		if (vlen < 0)
			return ib_error_set_errno(errno, "cannot read xattr '%s' of '%s' in layer '%s'",
						  p, shown_path(e->path), layer_name(w, e->layer));
		if (ovl) {
			if (opaque && vlen == 1 && w->valbuf[0] == 'y')
				*opaque = true;
			continue;
		}
		if (out->n == out->cap) {
			out->cap = out->cap ? out->cap * 2 : 4;
			out->v = ib_xrealloc(out->v, out->cap * sizeof(*out->v));
		}
		void *value = ib_xmalloc((size_t)vlen);
		memcpy(value, w->valbuf, (size_t)vlen);
		out->v[out->n++] = (ib_layerfs_xattr){ ib_xstrdup(p), value, (size_t)vlen };
	}
	if (out->n > 1)
		qsort(out->v, out->n, sizeof(*out->v), xattr_cmp);
	return 0;
}

static uint64_t link_hash(dev_t dev, ino_t ino, size_t layer)
{
	uint64_t h = (uint64_t)ino * 0x9e3779b97f4a7c15ULL;

	h ^= ((uint64_t)dev + ((uint64_t)layer << 48)) * 0xc2b2ae3d27d4eb4fULL;
	h ^= h >> 31;
	h *= 0xff51afd7ed558ccdULL;
	return h ^ (h >> 29);
}

static struct link *link_slot(struct link *tab, size_t cap, dev_t dev, ino_t ino, size_t layer)
{
	size_t i = link_hash(dev, ino, layer) & (cap - 1);

	while (tab[i].path && !(tab[i].dev == dev && tab[i].ino == ino && tab[i].layer == layer))
		i = (i + 1) & (cap - 1);
	return &tab[i];
}

/* Find or record the hard-link group of e; fills link_id and link_first. */
static void link_lookup(struct walk *w, ib_layerfs_entry *e)
{
	struct link *l;

	if (w->links_used * 2 >= w->links_cap) {
		size_t cap = w->links_cap ? w->links_cap * 2 : 64;
		struct link *tab = ib_xcalloc(cap, sizeof(*tab));

		for (size_t i = 0; i < w->links_cap; i++) {
			struct link *o = &w->links[i];
			if (o->path)
				*link_slot(tab, cap, o->dev, o->ino, o->layer) = *o;
		}
		free(w->links);
		w->links = tab;
		w->links_cap = cap;
	}
	l = link_slot(w->links, w->links_cap, e->st.st_dev, e->st.st_ino, e->layer);
	if (l->path) {
		e->link_id = l->id;
		e->link_first = l->path;
		return;
	}
	*l = (struct link){ e->st.st_dev, e->st.st_ino, e->layer, ++w->next_link_id,
			    ib_xstrdup(e->path) };
	w->links_used++;
	e->link_id = l->id;
}

static int name_cmp(const void *a, const void *b)
{
	const struct name *x = a, *y = b;
	int c = strcmp(x->name, y->name);

	if (c)
		return c;
	return x->src < y->src ? -1 : x->src > y->src;
}

static void names_free(struct name *v, size_t n)
{
	for (size_t i = 0; i < n; i++)
		free(v[i].name);
	free(v);
}

static void sources_close(struct source *s, size_t n)
{
	for (size_t i = 0; i < n; i++)
		if (s[i].dir)
			closedir(s[i].dir);
}

static int read_names(struct walk *w, struct name **out, size_t *out_n, struct source *srcs,
		      size_t nsrc, const char *path)
{
	struct name *v = NULL;
	size_t n = 0, cap = 0;
	struct dirent *de;

	for (size_t s = 0; s < nsrc; s++) {
		for (;;) {
			errno = 0;
			de = readdir(srcs[s].dir);
			if (!de)
				break;
			if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
				continue;
			if (n == cap) {
				cap = cap ? cap * 2 : 32;
				v = ib_xrealloc(v, cap * sizeof(*v));
			}
			v[n++] = (struct name){ ib_xstrdup(de->d_name), (unsigned)s, de->d_type };
		}
		if (errno) {
			int err = ib_error_set_errno(errno, "cannot read directory '%s' in layer '%s'",
						     shown_path(path), layer_name(w, srcs[s].layer));
			names_free(v, n);
			return err;
		}
	}
	if (n > 1)
		qsort(v, n, sizeof(*v), name_cmp);
	*out = v;
	*out_n = n;
	return 0;
}

static int visit(struct walk *w, ib_layerfs_entry *parent, struct source *srcs,
		 const struct name *g, size_t ng);

/*
 * The contents of directory e (already entered), then leave(e).  The names
 * live until after leave(e), as layerfs.h promises.
 */
static int walk_dir(struct walk *w, ib_layerfs_entry *e, struct source *srcs, size_t nsrc)
{
	struct name *names = NULL;
	size_t n = 0, i, j;
	int err;

	err = read_names(w, &names, &n, srcs, nsrc, e->path);
	if (err)
		return err;
	for (i = 0; i < n && !err; i = j) {
		for (j = i + 1; j < n && !strcmp(names[j].name, names[i].name); j++)
			;
		err = visit(w, e, srcs, &names[i], j - i);
	}
	if (!err && w->ops->leave)
		err = w->ops->leave(w->ctx, e);
	names_free(names, n);
	return err;
}

static int open_dir_source(struct walk *w, struct source *out, int dirfd, const char *name,
			   const char *path, size_t layer)
{
	int fd = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);

	if (fd < 0)
		return ib_error_set_errno(errno, "cannot open directory '%s' in layer '%s'",
					  path, layer_name(w, layer));
	out->dir = fdopendir(fd);
	if (!out->dir) {
		int err = ib_error_set_errno(errno, "cannot read directory '%s' in layer '%s'",
					     path, layer_name(w, layer));
		close(fd);
		return err;
	}
	out->layer = layer;
	return 0;
}

/* The merged directory whose occurrences, topmost first, are g[0..ng). */
static int visit_dir(struct walk *w, ib_layerfs_entry *e, struct source *srcs,
		     const struct name *g, size_t ng)
{
	struct xattr_list xl = { 0 };
	struct source *sub = ib_xcalloc(ng, sizeof(*sub));
	size_t nsub = 0;
	bool opaque = false;
	int err;

	if (e->depth > IB_LAYERFS_DEPTH_MAX) {
		err = ib_error_set("'%s' in layer '%s' is nested deeper than %d directories (IB_TREE_DEPTH_MAX)",
				   e->path, layer_name(w, e->layer), IB_LAYERFS_DEPTH_MAX);
		goto out;
	}
	err = open_dir_source(w, &sub[0], e->dirfd, e->name, e->path, e->layer);
	if (err)
		goto out;
	nsub = 1;
	e->fd = dirfd(sub[0].dir);
	err = read_xattrs(w, &xl, &opaque, e->fd, false, e);
	if (err)
		goto out;
	for (size_t k = 1; k < ng && !opaque; k++) {
		int sdfd = dirfd(srcs[g[k].src].dir);
		size_t layer = srcs[g[k].src].layer;
		unsigned char type = g[k].type;
		struct stat st;

		if (type == DT_UNKNOWN) {
			if (fstatat(sdfd, g[k].name, &st, AT_SYMLINK_NOFOLLOW) < 0) {
				err = ib_error_set_errno(errno, "cannot stat '%s' in layer '%s'",
							 e->path, layer_name(w, layer));
				goto out;
			}
			type = S_ISDIR(st.st_mode) ? DT_DIR : DT_REG;
		}
		/* A whiteout or any other non-directory ends the merge. */
		if (type != DT_DIR)
			break;
		err = open_dir_source(w, &sub[nsub], sdfd, g[k].name, e->path, layer);
		if (err)
			goto out;
		nsub++;
		char what[IB_LAYERFS_PATH_MAX + 64];
		snprintf(what, sizeof(what), "'%s' in layer '%s'", e->path, layer_name(w, layer));
		err = ib_overlay_dir_opaque(dirfd(sub[nsub - 1].dir), &opaque, what);
		if (err)
			goto out;
	}
	e->xattrs = xl.v;
	e->nxattrs = xl.n;
	err = w->ops->enter(w->ctx, e);
	if (!err)
		err = walk_dir(w, e, sub, nsub);
out:
	sources_close(sub, nsub);
	free(sub);
	xattr_list_free(&xl);
	return err;
}

static int visit_other(struct walk *w, ib_layerfs_entry *e)
{
	struct xattr_list xl = { 0 };
	char *target = NULL;
	int fd = -1, err = 0;

	if (S_ISREG(e->st.st_mode)) {
		fd = openat(e->dirfd, e->name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC | O_NOATIME);
		if (fd < 0 && errno == EPERM)
			fd = openat(e->dirfd, e->name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
		e->fd = fd;
	} else {
		fd = openat(e->dirfd, e->name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
	}
	if (fd < 0) {
		err = ib_error_set_errno(errno, "cannot open '%s' in layer '%s'",
					 e->path, layer_name(w, e->layer));
		goto out;
	}
	err = read_xattrs(w, &xl, NULL, fd, !S_ISREG(e->st.st_mode), e);
	if (err)
		goto out;
	if (S_ISLNK(e->st.st_mode)) {
		size_t cap = IB_LAYERFS_PATH_MAX + 1;
		ssize_t n;

		target = ib_xmalloc(cap);
		n = readlinkat(e->dirfd, e->name, target, cap);
		if (n < 0) {
			err = ib_error_set_errno(errno, "cannot read symlink '%s' in layer '%s'",
						 e->path, layer_name(w, e->layer));
			goto out;
		}
		if ((size_t)n >= cap) {
			err = ib_error_set("symlink '%s' in layer '%s' has a target longer than %d bytes",
					   e->path, layer_name(w, e->layer), IB_LAYERFS_PATH_MAX);
			goto out;
		}
		target[n] = '\0';
		e->symlink = target;
	}
	if (e->st.st_nlink > 1)
		link_lookup(w, e);
	e->xattrs = xl.v;
	e->nxattrs = xl.n;
	err = w->ops->enter(w->ctx, e);
out:
	if (fd >= 0)
		close(fd);
	free(target);
	xattr_list_free(&xl);
	return err;
}

static int visit(struct walk *w, ib_layerfs_entry *parent, struct source *srcs,
		 const struct name *g, size_t ng)
{
	ib_layerfs_entry e;
	char *path;
	int err;

	memset(&e, 0, sizeof(e));
	e.parent = parent;
	e.name = g[0].name;
	e.depth = parent->depth + 1;
	e.layer = srcs[g[0].src].layer;
	e.dirfd = dirfd(srcs[g[0].src].dir);
	e.fd = -1;
	if (parent->depth == 0)
		path = ib_xstrdup(e.name);
	else
		path = ib_xasprintf("%s/%s", parent->path, e.name);
	e.path = path;
	if (strlen(path) > IB_LAYERFS_PATH_MAX) {
		err = ib_error_set("a path in layer '%s' is longer than %d bytes: '%.64s...'",
				   layer_name(w, e.layer), IB_LAYERFS_PATH_MAX, path);
		goto out;
	}
	if (fstatat(e.dirfd, e.name, &e.st, AT_SYMLINK_NOFOLLOW) < 0) {
		err = ib_error_set_errno(errno, "cannot stat '%s' in layer '%s'",
					 path, layer_name(w, e.layer));
		goto out;
	}
	if (ib_overlay_is_whiteout(&e.st)) {
		err = 0;	/* a whiteout: the name is gone */
		goto out;
	}
	if (S_ISDIR(e.st.st_mode))
		err = visit_dir(w, &e, srcs, g, ng);
	else
		err = visit_other(w, &e);
out:
	free(path);
	return err;
}

int ib_layerfs_walk(const char *const *layers, size_t nlayers,
		    const ib_layerfs_ops *ops, void *ctx)
{
	struct walk w;
	struct source *srcs = NULL;
	struct xattr_list xl = { 0 };
	ib_layerfs_entry root;
	size_t nsrc = 0;
	int err = 0;

	if (nlayers == 0)
		return ib_error_set("no layers to export");
	memset(&w, 0, sizeof(w));
	w.layers = layers;
	w.nlayers = nlayers;
	w.ops = ops;
	w.ctx = ctx;
	w.listbuf = ib_xmalloc(XATTR_LIST_BUF);
	w.valbuf = ib_xmalloc(XATTR_VALUE_BUF);

	/* Every layer's root merges; opacity does not apply at the root. */
	srcs = ib_xcalloc(nlayers, sizeof(*srcs));
	for (size_t i = nlayers; i-- > 0; ) {
		err = open_dir_source(&w, &srcs[nsrc], AT_FDCWD, layers[i], ".", i);
		if (err)
			goto out;
		nsrc++;
	}

	memset(&root, 0, sizeof(root));
	root.path = "";
	root.name = "";
	root.layer = nlayers - 1;
	root.dirfd = -1;
	root.fd = dirfd(srcs[0].dir);
	if (fstat(root.fd, &root.st) < 0) {
		err = ib_error_set_errno(errno, "cannot stat layer '%s'", layers[nlayers - 1]);
		goto out;
	}
	err = read_xattrs(&w, &xl, NULL, root.fd, false, &root);
	if (err)
		goto out;
	root.xattrs = xl.v;
	root.nxattrs = xl.n;
	err = ops->enter(ctx, &root);
	if (!err)
		err = walk_dir(&w, &root, srcs, nsrc);
out:
	xattr_list_free(&xl);
	sources_close(srcs, nsrc);
	free(srcs);
	for (size_t i = 0; i < w.links_cap; i++)
		free(w.links[i].path);
	free(w.links);
	free(w.listbuf);
	free(w.valbuf);
	return err;
}

int ib_layerfs_data_segments(const ib_layerfs_entry *e, ib_layerfs_segment_cb fn, void *arg, bool *out_holes)
{
	off_t size = e->st.st_size, pos = 0;
	int err = 0;

	if (out_holes)
		*out_holes = false;
	if (size == 0)
		return 0;
	if ((off_t)e->st.st_blocks * 512 >= size)
		return fn(arg, 0, size);
	while (!err && pos < size) {
		off_t data = lseek(e->fd, pos, SEEK_DATA), hole = size;

		if (data < 0 && errno == ENXIO)
			break;
		if (data < 0 && errno == EINVAL)
			return fn(arg, pos, size); /* no hole support: the rest is data */
		if (data >= 0)
			hole = lseek(e->fd, data, SEEK_HOLE);
		if (data < 0 || hole < 0)
			return ib_error_set_errno(errno, "cannot find the data of '%s' in layer %zu", e->path,
						  e->layer);
		if (data >= size)
			break;
		if (hole > size)
			hole = size;
		if (out_holes)
			*out_holes = true;
		err = fn(arg, data, hole);
		pos = hole;
	}
	if (out_holes && (pos != size || err))
		*out_holes = true;
	return err;
}

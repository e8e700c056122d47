#include "layer/overlay.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <unistd.h>

#include "lib/util.h"

#define OVL_XATTR_REDIRECT	"trusted.overlay.redirect"
#define OVL_XATTR_METACOPY	"trusted.overlay.metacopy"
#define OVL_XATTR_WHITEOUT	"trusted.overlay.whiteout"

bool ib_overlay_is_whiteout(const struct stat *st)
{
	return S_ISCHR(st->st_mode) && st->st_rdev == makedev(0, 0);
}

ib_overlay_xattr_kind ib_overlay_xattr(const char *name)
{
	if (strncmp(name, IB_OVL_XATTR_PREFIX, strlen(IB_OVL_XATTR_PREFIX)))
		return IB_OVL_XATTR_CONTENT;
	if (!strcmp(name, IB_OVL_XATTR_OPAQUE))
		return IB_OVL_XATTR_OPAQUE_MARK;
	if (!strcmp(name, OVL_XATTR_REDIRECT) || !strcmp(name, OVL_XATTR_METACOPY) ||
	    !strcmp(name, OVL_XATTR_WHITEOUT))
		return IB_OVL_XATTR_UNSUPPORTED;
	return IB_OVL_XATTR_BOOKKEEPING;
}

int ib_overlay_dir_opaque(int fd, bool *out, const char *what)
{
	char v[2];
	ssize_t n;

	*out = false;
	n = fgetxattr(fd, OVL_XATTR_REDIRECT, v, sizeof(v));
	if (n >= 0 || errno == ERANGE)
		return ib_error_set("%s carries '%s': overlayfs redirect_dir is not supported", what,
				    OVL_XATTR_REDIRECT);
	n = fgetxattr(fd, IB_OVL_XATTR_OPAQUE, v, sizeof(v));
	if (n < 0 && errno != ENODATA && errno != ENOTSUP && errno != ERANGE)
		return ib_error_set_errno(errno, "cannot read xattrs of %s", what);
	*out = n == 1 && v[0] == 'y';
	return 0;
}

void ib_overlay_entry_clear(ib_overlay_entry *e)
{
	if (e->dirfd >= 0)
		close(e->dirfd);
	*e = (ib_overlay_entry)IB_OVERLAY_ENTRY_INIT;
}

/* One layer's directory that is part of the merged directory being looked in. */
struct source {
	int fd;
	size_t layer;
};

static void sources_close(struct source *s, size_t *n)
{
	for (size_t i = 0; i < *n; i++)
		close(s[i].fd);
	*n = 0;
}

static int open_dir(struct source *out, int dirfd, const char *name, size_t layer, const char *const *layers)
{
	out->fd = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	out->layer = layer;
	if (out->fd < 0)
		return ib_error_set_errno(errno, "cannot open '%s' in layer '%s'", name, layers[layer]);
	return 0;
}

/* The layers' roots, topmost first: they always merge. */
static int open_roots(struct source *cur, size_t *ncur, const char *const *layers, size_t n)
{
	int err;

	*ncur = 0;
	for (size_t i = n; i-- > 0;) {
		if ((err = open_dir(&cur[*ncur], AT_FDCWD, layers[i], i, layers)) < 0)
			return err;
		(*ncur)++;
	}
	return 0;
}

/*
 * One component of a lookup in the merged directory cur[0..*ncur) (topmost
 * first).  1: comp is a directory there, and cur becomes its sources; 2:
 * comp is something else, *out describes it (when out is given; cur is
 * left alone); 0: absent (a whiteout, or no layer has it); <0 error.
 */
static int descend(struct source **cur, size_t *ncur, struct source **next, const char *comp,
		   const char *const *layers, const char *rel, ib_overlay_entry *out)
{
	size_t nnext = 0;
	bool found = false, merging = true;
	int err;

	for (size_t s = 0; s < *ncur && merging; s++) {
		struct stat st;
		bool opaque;

		if (fstatat((*cur)[s].fd, comp, &st, AT_SYMLINK_NOFOLLOW) < 0) {
			if (errno == ENOENT || errno == ENOTDIR)
				continue;
			err = ib_error_set_errno(errno, "cannot stat '%s' in layer '%s'", rel, layers[(*cur)[s].layer]);
			goto fail;
		}
		if (!found) {
			/* the topmost occurrence decides what the name is */
			found = true;
			if (ib_overlay_is_whiteout(&st))
				return 0;
			if (!S_ISDIR(st.st_mode)) {
				if (out) {
					out->layer = (*cur)[s].layer;
					out->st = st;
					out->dirfd = fcntl((*cur)[s].fd, F_DUPFD_CLOEXEC, 0);
					snprintf(out->name, sizeof(out->name), "%s", comp);
					if (out->dirfd < 0)
						return ib_error_set_errno(errno, "cannot look up '%s'", rel);
				}
				return 2;
			}
			if (out) {
				out->layer = (*cur)[s].layer;
				out->st = st;
			}
		} else if (!S_ISDIR(st.st_mode)) {
			break; /* a whiteout or any other non-directory ends the merge */
		}
		if ((err = open_dir(&(*next)[nnext], (*cur)[s].fd, comp, (*cur)[s].layer, layers)) < 0)
			goto fail;
		nnext++;
		if ((err = ib_overlay_dir_opaque((*next)[nnext - 1].fd, &opaque, layers[(*cur)[s].layer])) < 0)
			goto fail;
		merging = !opaque;
	}
	if (!found)
		return 0;
	sources_close(*cur, ncur);
	{
		struct source *t = *cur;
		*cur = *next;
		*next = t;
	}
	*ncur = nnext;
	return 1;
fail:
	sources_close(*next, &nnext);
	return err;
}

/*
 * Walk rel from the roots: on 1, cur holds the sources of the last
 * component when it is a directory (*is_dir), or *out describes it.
 */
static int resolve(struct source **cur, size_t *ncur, struct source **next, const char *const *layers, size_t n,
		   const char *rel, ib_overlay_entry *out, bool *is_dir)
{
	const char *p = rel;
	int r;

	if ((r = open_roots(*cur, ncur, layers, n)) < 0)
		return r;
	while (*p == '/')
		p++;
	*is_dir = true;
	while (*p) {
		char comp[sizeof(out->name)];
		size_t len = strcspn(p, "/");
		bool last;

		if (len >= sizeof(comp) || (len == 1 && p[0] == '.') || (len == 2 && !strncmp(p, "..", 2)))
			return ib_error_set("cannot look up '%s' in a layer stack: bad component", rel);
		memcpy(comp, p, len);
		comp[len] = '\0';
		p += len;
		while (*p == '/')
			p++;
		last = !*p;
		r = descend(cur, ncur, next, comp, layers, rel, last ? out : NULL);
		if (r <= 0)
			return r;
		if (r == 2) {
			/* a file or a link: the end of the path, or in its way */
			*is_dir = false;
			return last ? 1 : 0;
		}
	}
	return 1;
}

int ib_overlay_lookup(ib_overlay_entry *out, const char *const *layers, size_t n, const char *rel)
{
	struct source *cur = ib_xcalloc(n ? n : 1, sizeof(*cur)), *next = ib_xcalloc(n ? n : 1, sizeof(*next));
	size_t ncur = 0;
	const char *p = rel + strspn(rel, "/");
	const char *last = strrchr(p, '/');
	char *parent = last ? ib_xstrndup(p, (size_t)(last - p)) : ib_xstrdup("");
	bool is_dir;
	int r;

	*out = (ib_overlay_entry)IB_OVERLAY_ENTRY_INIT;
	if (!*p) {
		r = ib_error_set("cannot look up '%s' in a layer stack: not a path below the root", rel);
		goto out;
	}
	/* the parent as a directory, then the entry in it */
	r = resolve(&cur, &ncur, &next, layers, n, parent, NULL, &is_dir);
	if (r <= 0 || !is_dir) {
		r = r < 0 ? r : 0;
		goto out;
	}
	r = descend(&cur, &ncur, &next, last ? last + 1 : p, layers, rel, out);
	if (r == 1) {
		/* a directory: its topmost occurrence */
		out->dirfd = -1;
		for (size_t s = 0; s < ncur; s++)
			if (cur[s].layer == out->layer) {
				out->dirfd = fcntl(cur[s].fd, F_DUPFD_CLOEXEC, 0);
				break;
			}
		snprintf(out->name, sizeof(out->name), ".");
	}
	r = r < 0 ? r : r > 0;
out:
	sources_close(cur, &ncur);
	free(cur);
	free(next);
	free(parent);
	if (r <= 0)
		ib_overlay_entry_clear(out);
	return r;
}

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

int ib_overlay_list(ib_strv *out, const char *const *layers, size_t n, const char *rel)
{
	struct source *cur = ib_xcalloc(n ? n : 1, sizeof(*cur)), *next = ib_xcalloc(n ? n : 1, sizeof(*next));
	ib_strv seen = IB_STRV_INIT, names = IB_STRV_INIT;
	size_t ncur = 0;
	bool is_dir;
	int r;

	r = resolve(&cur, &ncur, &next, layers, n, rel, NULL, &is_dir);
	if (r <= 0 || !is_dir) {
		r = r < 0 ? r : 0;
		goto out;
	}
	for (size_t s = 0; s < ncur; s++) {
		int fd = fcntl(cur[s].fd, F_DUPFD_CLOEXEC, 0);
		DIR *d = fd >= 0 ? fdopendir(fd) : NULL;
		struct dirent *de;

		if (!d) {
			if (fd >= 0)
				close(fd);
			r = ib_error_set_errno(errno, "cannot read '%s' in layer '%s'", rel, layers[cur[s].layer]);
			goto out;
		}
		while ((de = readdir(d))) {
			struct stat st;
			bool dup = false;

			if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
				continue;
			for (size_t k = 0; k < seen.n && !dup; k++)
				dup = !strcmp(seen.v[k], de->d_name);
			if (dup)
				continue;
			ib_strv_push(&seen, de->d_name);
			if (fstatat(dirfd(d), de->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 && ib_overlay_is_whiteout(&st))
				continue;
			ib_strv_push(&names, de->d_name);
		}
		closedir(d);
	}
	if (names.n > 1)
		qsort(names.v, names.n, sizeof(*names.v), cmp_str);
	*out = names;
	names = (ib_strv)IB_STRV_INIT;
	r = 1;
out:
	sources_close(cur, &ncur);
	free(cur);
	free(next);
	ib_strv_free(&seen);
	ib_strv_free(&names);
	return r;
}

int ib_overlay_read_file(char **out, size_t *out_len, const char *const *layers, size_t n, const char *rel,
			 size_t max, const char *limit_name)
{
	ib_overlay_entry e = IB_OVERLAY_ENTRY_INIT;
	struct stat st;
	char *data = NULL;
	size_t got = 0;
	int fd = -1, r;

	if ((r = ib_overlay_lookup(&e, layers, n, rel)) <= 0 || !S_ISREG(e.st.st_mode)) {
		ib_overlay_entry_clear(&e);
		return r < 0 ? r : 0;
	}
	fd = openat(e.dirfd, e.name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
	if (fd < 0 || fstat(fd, &st) < 0) {
		r = ib_error_set_errno(errno, "cannot open '%s' in layer '%s'", rel, layers[e.layer]);
		goto out;
	}
	if (!S_ISREG(st.st_mode)) {
		r = 0;
		goto out;
	}
	if ((uint64_t)st.st_size > max) {
		r = ib_error_set("/%s is %lld bytes; at most %zu are allowed (%s)", rel, (long long)st.st_size, max,
				 limit_name);
		goto out;
	}
	data = ib_xmalloc((size_t)st.st_size + 1);
	while (got < (size_t)st.st_size) {
		ssize_t k = read(fd, data + got, (size_t)st.st_size - got);
		if (k < 0 && errno == EINTR)
			continue;
		if (k < 0) {
			r = ib_error_set_errno(errno, "cannot read '%s' in layer '%s'", rel, layers[e.layer]);
			goto out;
		}
		if (k == 0)
			break;
		got += (size_t)k;
	}
	data[got] = '\0';
	*out = data;
	data = NULL;
	if (out_len)
		*out_len = got;
	r = 1;
out:
	if (fd >= 0)
		close(fd);
	free(data);
	ib_overlay_entry_clear(&e);
	return r;
}

int ib_overlay_readlink(char **out, const char *const *layers, size_t n, const char *rel)
{
	ib_overlay_entry e = IB_OVERLAY_ENTRY_INIT;
	char target[4096];
	ssize_t len;
	int r;

	if ((r = ib_overlay_lookup(&e, layers, n, rel)) <= 0 || !S_ISLNK(e.st.st_mode)) {
		ib_overlay_entry_clear(&e);
		return r < 0 ? r : 0;
	}
	len = readlinkat(e.dirfd, e.name, target, sizeof(target) - 1);
	if (len < 0)
		r = ib_error_set_errno(errno, "cannot read link '%s' in layer '%s'", rel, layers[e.layer]);
	else {
		target[len] = '\0';
		*out = ib_xstrdup(target);
	}
	ib_overlay_entry_clear(&e);
	return r;
}

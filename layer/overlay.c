#include "layer/overlay.h"

#include <errno.h>
#include <fcntl.h>
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

int ib_overlay_lookup(ib_overlay_entry *out, const char *const *layers, size_t n, const char *rel)
{
	struct source *cur = ib_xcalloc(n ? n : 1, sizeof(*cur)), *next = ib_xcalloc(n ? n : 1, sizeof(*next));
	size_t ncur = 0, nnext = 0;
	const char *p = rel;
	int ret = 0;

	for (size_t i = n; i-- > 0;) {
		if ((ret = open_dir(&cur[ncur], AT_FDCWD, layers[i], i, layers)) < 0)
			goto out;
		ncur++;
	}
	while (*p == '/')
		p++;
	if (!*p) {
		ret = ib_error_set("cannot look up '%s' in a layer stack: not a path below the root", rel);
		goto out;
	}
	while (*p) {
		char comp[sizeof(out->name)];
		size_t len = strcspn(p, "/");
		bool last, found = false, merging = true;

		if (len >= sizeof(comp) || (len == 1 && p[0] == '.') || (len == 2 && !strncmp(p, "..", 2))) {
			ret = ib_error_set("cannot look up '%s' in a layer stack: bad component", rel);
			goto out;
		}
		memcpy(comp, p, len);
		comp[len] = '\0';
		p += len;
		while (*p == '/')
			p++;
		last = !*p;

		nnext = 0;
		for (size_t s = 0; s < ncur && merging; s++) {
			struct stat st;
			bool opaque;

			if (fstatat(cur[s].fd, comp, &st, AT_SYMLINK_NOFOLLOW) < 0) {
				if (errno == ENOENT || errno == ENOTDIR)
					continue;
				ret = ib_error_set_errno(errno, "cannot stat '%s' in layer '%s'", rel,
							 layers[cur[s].layer]);
				goto out;
			}
			if (!found) {
				/* the topmost occurrence decides what the name is */
				found = true;
				if (ib_overlay_is_whiteout(&st))
					goto out; /* absent */
				if (last) {
					out->layer = cur[s].layer;
					out->st = st;
					out->dirfd = cur[s].fd;
					memcpy(out->name, comp, len + 1);
					cur[s].fd = -1; /* now the entry's */
					ret = 1;
					goto out;
				}
				if (!S_ISDIR(st.st_mode))
					goto out; /* a file or a link in the middle of the path */
			} else if (!S_ISDIR(st.st_mode)) {
				break; /* a whiteout or any other non-directory ends the merge */
			}
			if ((ret = open_dir(&next[nnext], cur[s].fd, comp, cur[s].layer, layers)) < 0)
				goto out;
			nnext++;
			if ((ret = ib_overlay_dir_opaque(next[nnext - 1].fd, &opaque, layers[cur[s].layer])) < 0)
				goto out;
			merging = !opaque;
		}
		if (!found)
			goto out;
		for (size_t s = 0; s < ncur; s++)
			if (cur[s].fd >= 0)
				close(cur[s].fd);
		struct source *t = cur;
		cur = next;
		next = t;
		ncur = nnext;
		nnext = 0;
	}
out:
	for (size_t s = 0; s < ncur; s++)
		if (cur[s].fd >= 0)
			close(cur[s].fd);
	sources_close(next, &nnext);
	free(cur);
	free(next);
	return ret;
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

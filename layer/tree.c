#include "layer/tree.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <unistd.h>

#include "layer/overlay.h"
#include "lib/util.h"

#define XATTR_LIST_MAX_ 65536

static int cmp_names(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

static void free_names(char **names, size_t n)
{
	for (size_t i = 0; i < n; i++)
		free(names[i]);
	free(names);
}

/* Sorted names of the directory at path, "." and ".." left out. */
static int list_dir(const char *path, char ***out, size_t *out_n)
{
	DIR *d = opendir(path);
	struct dirent *de;
	char **names = NULL;
	size_t n = 0, cap = 0;

	if (!d)
		return ib_error_set_errno(errno, "cannot read '%s'", path);
	while ((de = readdir(d))) {
		if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
			continue;
		if (n == cap) {
			cap = cap ? cap * 2 : 32;
			names = ib_xrealloc(names, cap * sizeof(*names));
		}
		names[n++] = ib_xstrdup(de->d_name);
	}
	closedir(d);
	if (n)
		qsort(names, n, sizeof(*names), cmp_names);
	*out = names;
	*out_n = n;
	return 0;
}

/* Sorted xattr names of path (not following links); *out NULL when none. */
static int list_xattrs(const char *path, char ***out, size_t *out_n)
{
	char buf[XATTR_LIST_MAX_];
	ssize_t len = llistxattr(path, buf, sizeof(buf));
	char **names = NULL;
	size_t n = 0;

	*out = NULL;
	*out_n = 0;
	if (len < 0) {
		if (errno == ENOTSUP)
			return 0;
		return ib_error_set_errno(errno, "cannot list attributes of '%s'", path);
	}
	for (ssize_t off = 0; off < len; off += (ssize_t)strlen(buf + off) + 1)
		n++;
	if (!n)
		return 0;
	names = ib_xcalloc(n, sizeof(*names));
	n = 0;
	for (ssize_t off = 0; off < len; off += (ssize_t)strlen(buf + off) + 1)
		names[n++] = ib_xstrdup(buf + off);
	qsort(names, n, sizeof(*names), cmp_names);
	*out = names;
	*out_n = n;
	return 0;
}

static int normalise_entry(ib_buf *path, int64_t epoch);

/* Call fn on each child of the directory at path, in name order, with path extended. */
static int for_each_child(ib_buf *path, int (*fn)(ib_buf *path, void *arg), void *arg)
{
	char **names = NULL;
	size_t n = 0, len = path->len;
	int err;

	if ((err = list_dir(path->ptr, &names, &n)) < 0)
		return err;
	for (size_t i = 0; i < n && !err; i++) {
		ib_buf_puts(path, "/");
		ib_buf_puts(path, names[i]);
		err = fn(path, arg);
		path->len = len;
		path->ptr[len] = '\0';
	}
	free_names(names, n);
	return err;
}

static int normalise_child(ib_buf *path, void *arg)
{
	return normalise_entry(path, *(const int64_t *)arg);
}

static int normalise_entry(ib_buf *path, int64_t epoch)
{
	char **xs = NULL;
	size_t nx = 0;
	struct stat st;
	struct timespec ts[2];
	int err;

	if (lstat(path->ptr, &st) < 0)
		return ib_error_set_errno(errno, "cannot stat '%s'", path->ptr);

	if (S_ISDIR(st.st_mode) && (err = for_each_child(path, normalise_child, &epoch)) < 0)
		return err;

	if ((err = list_xattrs(path->ptr, &xs, &nx)) < 0)
		return err;
	for (size_t i = 0; i < nx; i++) {
		ib_overlay_xattr_kind kind = ib_overlay_xattr(xs[i]);

		if (kind == IB_OVL_XATTR_CONTENT || (kind == IB_OVL_XATTR_OPAQUE_MARK && S_ISDIR(st.st_mode)))
			continue;
		if (lremovexattr(path->ptr, xs[i]) < 0 && errno != ENODATA) {
			err = ib_error_set_errno(errno, "cannot remove attribute '%s' of '%s'", xs[i], path->ptr);
			break;
		}
	}
	free_names(xs, nx);
	if (err)
		return err;

	ts[1] = st.st_mtim;
	if (ts[1].tv_sec >= epoch) {
		ts[1].tv_sec = epoch;
		ts[1].tv_nsec = 0;
	}
	ts[0] = ts[1];
	if (utimensat(AT_FDCWD, path->ptr, ts, AT_SYMLINK_NOFOLLOW) < 0)
		return ib_error_set_errno(errno, "cannot set times of '%s'", path->ptr);
	return 0;
}

int ib_tree_normalise(const char *dir, int64_t epoch)
{
	ib_buf path = IB_BUF_INIT;
	int err;

	ib_buf_puts(&path, dir);
	err = normalise_entry(&path, epoch);
	ib_buf_free(&path);
	return err;
}

struct digest_state {
	ib_sha256 *h;
	size_t root_len;
	uint64_t bytes;
	uint64_t files;
	char *buf;
	char *xval; /* one attribute's value: on the heap, as digest_entry recurses */
};

static int hash_content(struct digest_state *ds, const char *path)
{
	static const size_t bufsz = 1 << 20;
	int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
	ib_sha256 *h;
	char hex[IB_SHA256_HEX];
	ssize_t n;

	if (fd < 0)
		return ib_error_set_errno(errno, "cannot open '%s'", path);
	if (!ds->buf)
		ds->buf = ib_xmalloc(bufsz);
	h = ib_sha256_new();
	while ((n = read(fd, ds->buf, bufsz)) != 0) {
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			int e = errno;
			ib_sha256_free(h);
			close(fd);
			return ib_error_set_errno(e, "cannot read '%s'", path);
		}
		ib_sha256_update(h, ds->buf, (size_t)n);
	}
	close(fd);
	ib_sha256_final_hex(h, hex);
	ib_sha256_field(ds->h, hex);
	return 0;
}

static int digest_entry(struct digest_state *ds, ib_buf *path);

static int digest_child(ib_buf *path, void *arg)
{
	return digest_entry(arg, path);
}

static int digest_entry(struct digest_state *ds, ib_buf *path)
{
	char **xs = NULL;
	size_t nx = 0;
	struct stat st;
	char line[256];
	int err = 0;

	if (lstat(path->ptr, &st) < 0)
		return ib_error_set_errno(errno, "cannot stat '%s'", path->ptr);
	ib_sha256_field(ds->h, path->len > ds->root_len ? path->ptr + ds->root_len : "/");
	snprintf(line, sizeof(line), "%o %u %u %lld", (unsigned)st.st_mode, (unsigned)st.st_uid,
		 (unsigned)st.st_gid, (long long)st.st_mtim.tv_sec);
	ib_sha256_field(ds->h, line);
	ds->files++;
	ds->bytes += (uint64_t)st.st_blocks * 512;

	if ((err = list_xattrs(path->ptr, &xs, &nx)) < 0)
		return err;
	for (size_t i = 0; i < nx && !err; i++) {
		char *val = ds->xval;
		ssize_t vl = lgetxattr(path->ptr, xs[i], val, XATTR_LIST_MAX_);
		if (vl < 0) {
			err = ib_error_set_errno(errno, "cannot read attribute '%s' of '%s'", xs[i], path->ptr);
			break;
		}
		ib_sha256_field(ds->h, xs[i]);
		snprintf(line, sizeof(line), "%zd", vl);
		ib_sha256_field(ds->h, line);
		ib_sha256_update(ds->h, val, (size_t)vl);
	}
	free_names(xs, nx);
	if (err)
		return err;

	if (S_ISREG(st.st_mode)) {
		snprintf(line, sizeof(line), "%lld", (long long)st.st_size);
		ib_sha256_field(ds->h, line);
		return hash_content(ds, path->ptr);
	}
	if (S_ISLNK(st.st_mode)) {
		char target[4096];
		ssize_t tl = readlink(path->ptr, target, sizeof(target) - 1);
		if (tl < 0)
			return ib_error_set_errno(errno, "cannot read link '%s'", path->ptr);
		target[tl] = '\0';
		ib_sha256_field(ds->h, target);
		return 0;
	}
	if (S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode)) {
		snprintf(line, sizeof(line), "%u:%u", major(st.st_rdev), minor(st.st_rdev));
		ib_sha256_field(ds->h, line);
		return 0;
	}
	if (S_ISDIR(st.st_mode)) {
		if ((err = for_each_child(path, digest_child, ds)) < 0)
			return err;
		ib_sha256_field(ds->h, "end-of-dir");
	}
	return 0;
}

int ib_tree_digest(char hex[IB_SHA256_HEX], const char *dir, uint64_t *out_bytes, uint64_t *out_files)
{
	struct digest_state ds = { 0 };
	ib_buf path = IB_BUF_INIT;
	int err;

	ds.h = ib_sha256_new();
	ds.xval = ib_xmalloc(XATTR_LIST_MAX_);
	ib_sha256_field(ds.h, "imagebuilder/tree/v1");
	ib_buf_puts(&path, dir);
	ds.root_len = path.len;
	err = digest_entry(&ds, &path);
	ib_buf_free(&path);
	free(ds.buf);
	free(ds.xval);
	if (err) {
		ib_sha256_free(ds.h);
		return err;
	}
	ib_sha256_final_hex(ds.h, hex);
	if (out_bytes)
		*out_bytes = ds.bytes;
	if (out_files)
		*out_files = ds.files;
	return 0;
}

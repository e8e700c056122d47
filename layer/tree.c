#include "layer/tree.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <unistd.h>

#include "layer/overlay.h"
#include "layer/walk.h"
#include "lib/util.h"

/* ---- normalise ---- */

struct normalise_state {
	int64_t epoch;
};

static int normalise_one(void *arg, const ib_walk_entry *e)
{
	const struct normalise_state *ns = arg;
	char path[64 + 256];
	char **xs = NULL;
	size_t nx = 0;
	struct timespec ts[2];
	int err;

	ib_walk_proc_path(path, e);
	if ((err = ib_walk_xattrs(e, &xs, &nx)) < 0)
		return err;
	for (size_t i = 0; i < nx; i++) {
		ib_overlay_xattr_kind kind = ib_overlay_xattr(xs[i]);

		if (kind == IB_OVL_XATTR_CONTENT || (kind == IB_OVL_XATTR_OPAQUE_MARK && S_ISDIR(e->st.st_mode)))
			continue;
		if (lremovexattr(path, xs[i]) < 0 && errno != ENODATA) {
			err = ib_error_set_errno(errno, "cannot remove attribute '%s' of '%s'", xs[i], e->path);
			break;
		}
	}
	ib_walk_free_names(xs, nx);
	if (err)
		return err;
	/* overlayfs makes its whiteouts as the mounter: they belong to root, as in any layer */
	if (ib_overlay_is_whiteout(&e->st) && (e->st.st_uid || e->st.st_gid) &&
	    fchownat(e->dirfd, e->name, 0, 0, AT_SYMLINK_NOFOLLOW) < 0)
		return ib_error_set_errno(errno, "cannot chown whiteout '%s'", e->path);

	ts[1] = e->st.st_mtim;
	if (ts[1].tv_sec >= ns->epoch) {
		ts[1].tv_sec = ns->epoch;
		ts[1].tv_nsec = 0;
	}
	ts[0] = ts[1];
	if (utimensat(e->dirfd, e->name, ts, AT_SYMLINK_NOFOLLOW) < 0)
		return ib_error_set_errno(errno, "cannot set times of '%s'", e->path);
	return 0;
}

/* non-directories as they come; a directory after its children */
static int normalise_enter(void *arg, const ib_walk_entry *e)
{
	return S_ISDIR(e->st.st_mode) ? 0 : normalise_one(arg, e);
}

int ib_tree_normalise(const char *dir, int64_t epoch, const ib_walk_opts *opts)
{
	static const ib_walk_ops ops = { normalise_enter, normalise_one };
	struct normalise_state ns = { epoch };

	return ib_walk(dir, opts, &ops, &ns);
}

/* ---- digest ---- */

#define CONTENT_BLOCK (64 * 1024)
#define CHECK_EVERY   (64ULL << 20)	/* bytes between two looks at the deadline */

struct digest_state {
	ib_sha256 *h;
	const ib_walk_opts *opts;
	int version;
	uint64_t bytes;
	uint64_t files;
	char *buf;
	char *xval;
};

static bool all_zero(const char *p, size_t n)
{
	static const char zeros[256];

	while (n >= sizeof(zeros)) {
		if (memcmp(p, zeros, sizeof(zeros)))
			return false;
		p += sizeof(zeros);
		n -= sizeof(zeros);
	}
	return !n || !memcmp(p, zeros, n);
}

static ssize_t pread_full(int fd, char *buf, size_t len, off_t off)
{
	size_t got = 0;

	while (got < len) {
		ssize_t n = pread(fd, buf + got, len - got, off + (off_t)got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -1;
		if (n == 0)
			break;
		got += (size_t)n;
	}
	return (ssize_t)got;
}

/*
 * v1: SHA-256 of the bytes.  v2: the file in blocks of 64 KiB; a run of
 * blocks that are all zeros goes in as its length, the others as their
 * bytes, so holes (found with SEEK_DATA) are never read and a sparse file
 * costs what its data costs.  Either is a function of the content alone.
 */
static int hash_content(struct digest_state *ds, const ib_walk_entry *e)
{
	int fd = openat(e->dirfd, e->name, O_RDONLY | O_NOFOLLOW | O_NOCTTY | O_CLOEXEC);
	uint64_t size = (uint64_t)e->st.st_size, off = 0, zeros = 0, since_check = 0;
	char hex[IB_SHA256_HEX], line[64];
	ib_sha256 *h;
	int err = 0;

	if (fd < 0)
		return ib_error_set_errno(errno, "cannot open '%s'", e->path);
	if (!ds->buf)
		ds->buf = ib_xmalloc(CONTENT_BLOCK);
	h = ib_sha256_new();
	while (off < size) {
		size_t want = size - off < CONTENT_BLOCK ? (size_t)(size - off) : CONTENT_BLOCK;
		ssize_t n;

		if (ds->version >= 2) {
			off_t data = lseek(fd, (off_t)off, SEEK_DATA);
			uint64_t skip;

			if (data < 0 && errno != ENXIO) {
				err = ib_error_set_errno(errno, "cannot read '%s'", e->path);
				break;
			}
			/* whole blocks of hole before the next data: zeros, unread */
			skip = (data < 0 ? size : (uint64_t)data) / CONTENT_BLOCK * CONTENT_BLOCK;
			if (skip > off) {
				if (skip > size)
					skip = size;
				zeros += skip - off;
				off = skip;
				continue;
			}
		}
		n = pread_full(fd, ds->buf, want, (off_t)off);
		if (n < 0) {
			err = ib_error_set_errno(errno, "cannot read '%s'", e->path);
			break;
		}
		if (n == 0)
			break; /* shrank meanwhile: hash what was there */
		if (ds->version >= 2 && all_zero(ds->buf, (size_t)n)) {
			zeros += (uint64_t)n;
		} else {
			if (zeros) {
				snprintf(line, sizeof(line), "zeros %llu", (unsigned long long)zeros);
				ib_sha256_field(h, line);
				zeros = 0;
			}
			if (ds->version >= 2)
				ib_sha256_field(h, "data");
			ib_sha256_update(h, ds->buf, (size_t)n);
		}
		off += (uint64_t)n;
		if ((since_check += (uint64_t)n) >= CHECK_EVERY) {
			since_check = 0;
			if ((err = ib_walk_check_time(ds->opts)) < 0)
				break;
		}
	}
	close(fd);
	if (!err && zeros) {
		snprintf(line, sizeof(line), "zeros %llu", (unsigned long long)zeros);
		ib_sha256_field(h, line);
	}
	if (err) {
		ib_sha256_free(h);
		return err;
	}
	ib_sha256_final_hex(h, hex);
	ib_sha256_field(ds->h, hex);
	return 0;
}

static int digest_enter(void *arg, const ib_walk_entry *e)
{
	struct digest_state *ds = arg;
	const struct stat *st = &e->st;
	char **xs = NULL, path[64 + 256], line[256];
	size_t nx = 0;
	int err = 0;

	snprintf(line, sizeof(line), "/%s", e->path);
	ib_sha256_field(ds->h, line);
	snprintf(line, sizeof(line), "%o %u %u %lld", (unsigned)st->st_mode, (unsigned)st->st_uid,
		 (unsigned)st->st_gid, (long long)st->st_mtim.tv_sec);
	ib_sha256_field(ds->h, line);
	ds->files++;
	ds->bytes += (uint64_t)st->st_blocks * 512;

	ib_walk_proc_path(path, e);
	if ((err = ib_walk_xattrs(e, &xs, &nx)) < 0)
		return err;
	for (size_t i = 0; i < nx && !err; i++) {
		ssize_t vl = lgetxattr(path, xs[i], ds->xval, IB_XATTR_LIST_MAX);
		if (vl < 0) {
			err = ib_error_set_errno(errno, "cannot read attribute '%s' of '%s'", xs[i], e->path);
			break;
		}
		ib_sha256_field(ds->h, xs[i]);
		snprintf(line, sizeof(line), "%zd", vl);
		ib_sha256_field(ds->h, line);
		ib_sha256_update(ds->h, ds->xval, (size_t)vl);
	}
	ib_walk_free_names(xs, nx);
	if (err)
		return err;

	if (S_ISREG(st->st_mode)) {
		snprintf(line, sizeof(line), "%lld", (long long)st->st_size);
		ib_sha256_field(ds->h, line);
		return hash_content(ds, e);
	}
	if (S_ISLNK(st->st_mode)) {
		char target[4096];
		ssize_t tl = readlinkat(e->dirfd, e->name, target, sizeof(target) - 1);
		if (tl < 0)
			return ib_error_set_errno(errno, "cannot read link '%s'", e->path);
		target[tl] = '\0';
		ib_sha256_field(ds->h, target);
		return 0;
	}
	if (S_ISCHR(st->st_mode) || S_ISBLK(st->st_mode)) {
		snprintf(line, sizeof(line), "%u:%u", major(st->st_rdev), minor(st->st_rdev));
		ib_sha256_field(ds->h, line);
	}
	return 0;
}

static int digest_leave(void *arg, const ib_walk_entry *e)
{
	struct digest_state *ds = arg;

	(void)e;
	ib_sha256_field(ds->h, "end-of-dir");
	return 0;
}

int ib_tree_digest(char hex[IB_SHA256_HEX], const char *dir, int version, const ib_walk_opts *opts,
		   uint64_t *out_bytes, uint64_t *out_files)
{
	static const ib_walk_ops ops = { digest_enter, digest_leave };
	struct digest_state ds = { .opts = opts, .version = version };
	int err;

	if (version != IB_TREE_DIGEST_V1 && version != IB_TREE_DIGEST_V2)
		return ib_error_set("unknown tree digest version %d", version);
	ds.h = ib_sha256_new();
	ds.xval = ib_xmalloc(IB_XATTR_LIST_MAX);
	ib_sha256_field(ds.h, version == 1 ? "imagebuilder/tree/v1" : "imagebuilder/tree/v2");
	err = ib_walk(dir, opts, &ops, &ds);
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

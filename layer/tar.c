/*
 * The tar writer: the merged tree of a layer stack as a pax archive, with
 * libarchive.  Entries come in walk order (sorted, parents first) and are
 * named "./path" ("./" for the root); owners are numeric only; the only
 * time recorded is mtime, clamped to the epoch with nanoseconds dropped;
 * a second name of a file is a hard-link entry; xattrs go into pax
 * headers (SCHILY.xattr and LIBARCHIVE.xattr); files with holes are
 * written as GNU sparse 1.0 entries.  Sockets cannot be archived and are
 * left out, as GNU tar does.  Nothing depends on the time or place of the
 * run, so the same layers give the same bytes.
 */
#include "layer/writer.h"

#include <errno.h>
#include <fcntl.h>
#include <locale.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <archive.h>
#include <archive_entry.h>

#include "lib/error.h"
#include "layer/layerfs.h"
#include "lib/util.h"

#define TAR_BUF_SIZE	(1024 * 1024)

/* A data range of a file with holes. */
struct segment {
	off_t start;
	off_t end;
};

struct tar_writer {
	struct archive *a;
	struct archive_entry *entry;
	int64_t epoch;
	char *buf;		/* TAR_BUF_SIZE, file data */
	char *zeros;		/* TAR_BUF_SIZE of zeros, stands for holes */
	struct segment *segs;
	size_t nsegs;
	size_t segs_cap;
};

static int archive_fail(struct archive *a, const char *what, const char *path)
{
	return ib_error_set("cannot write %s '%s' to the tar: %s", what, *path ? path : ".",
			    archive_error_string(a) ? archive_error_string(a) : "unknown error");
}

static int add_segment(void *arg, off_t start, off_t end)
{
	struct tar_writer *t = arg;

	if (t->nsegs == t->segs_cap) {
		t->segs_cap = t->segs_cap ? t->segs_cap * 2 : 16;
		t->segs = ib_xrealloc(t->segs, t->segs_cap * sizeof(*t->segs));
	}
	t->segs[t->nsegs++] = (struct segment){ start, end };
	return 0;
}

/* The data segments of e, when it has holes; *out_sparse false when it has none. */
static int find_segments(struct tar_writer *t, bool *out_sparse, const ib_layerfs_entry *e)
{
	t->nsegs = 0;
	return ib_layerfs_data_segments(e, add_segment, t, out_sparse);
}

static int write_zeros(struct tar_writer *t, off_t len, const char *path)
{
	while (len > 0) {
		size_t n = len < TAR_BUF_SIZE ? (size_t)len : TAR_BUF_SIZE;

		if (archive_write_data(t->a, t->zeros, n) < 0)
			return archive_fail(t->a, "file", path);
		len -= (off_t)n;
	}
	return 0;
}

static int write_range(struct tar_writer *t, const ib_layerfs_entry *e, off_t start, off_t end)
{
	while (start < end) {
		size_t want = end - start < TAR_BUF_SIZE ? (size_t)(end - start) : TAR_BUF_SIZE;
		ssize_t n = pread(e->fd, t->buf, want, start);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return ib_error_set_errno(errno, "cannot read '%s' in layer %zu", e->path, e->layer);
		if (n == 0)
			return ib_error_set("'%s' in layer %zu shrank while being read", e->path, e->layer);
		if (archive_write_data(t->a, t->buf, (size_t)n) < 0)
			return archive_fail(t->a, "file", e->path);
		start += n;
	}
	return 0;
}

/*
 * The body of a regular file.  For a sparse entry libarchive drops the
 * bytes that fall in holes, so holes are fed from the zero buffer and
 * never read.
 */
static int write_body(struct tar_writer *t, const ib_layerfs_entry *e, bool sparse)
{
	off_t pos = 0;
	int err;

	if (!sparse)
		return write_range(t, e, 0, e->st.st_size);
	for (size_t i = 0; i < t->nsegs; i++) {
		err = write_zeros(t, t->segs[i].start - pos, e->path);
		if (!err)
			err = write_range(t, e, t->segs[i].start, t->segs[i].end);
		if (err)
			return err;
		pos = t->segs[i].end;
	}
	return write_zeros(t, e->st.st_size - pos, e->path);
}

static int tar_enter(void *ctx, ib_layerfs_entry *e)
{
	struct tar_writer *t = ctx;
	struct archive_entry *entry = t->entry;
	int64_t mtime = e->st.st_mtime;
	bool sparse = false;
	char *path, *link = NULL;
	int err = 0, r;

	if (S_ISSOCK(e->st.st_mode))
		return 0;
	if (mtime > t->epoch)
		mtime = t->epoch;
	if (mtime < 0)
		mtime = 0;
	path = ib_xasprintf("./%s", e->path);
	archive_entry_clear(entry);
	archive_entry_copy_pathname(entry, path);
	archive_entry_set_mode(entry, e->st.st_mode);
	archive_entry_set_uid(entry, e->st.st_uid);
	archive_entry_set_gid(entry, e->st.st_gid);
	archive_entry_set_mtime(entry, mtime, 0);
	for (size_t i = 0; i < e->nxattrs; i++)
		archive_entry_xattr_add_entry(entry, e->xattrs[i].name, e->xattrs[i].value,
					      e->xattrs[i].size);
	if (e->link_first) {
		link = ib_xasprintf("./%s", e->link_first);
		archive_entry_copy_hardlink(entry, link);
		archive_entry_set_size(entry, 0);
	} else if (S_ISLNK(e->st.st_mode)) {
		archive_entry_copy_symlink(entry, e->symlink);
	} else if (S_ISCHR(e->st.st_mode) || S_ISBLK(e->st.st_mode)) {
		archive_entry_set_rdev(entry, e->st.st_rdev);
	} else if (S_ISREG(e->st.st_mode)) {
		archive_entry_set_size(entry, e->st.st_size);
		err = find_segments(t, &sparse, e);
		if (err)
			goto out;
		for (size_t i = 0; sparse && i < t->nsegs; i++)
			archive_entry_sparse_add_entry(entry, t->segs[i].start,
						       t->segs[i].end - t->segs[i].start);
		if (sparse && !t->nsegs)
			archive_entry_sparse_add_entry(entry, e->st.st_size, 0);
	}
	r = archive_write_header(t->a, entry);
	if (r < ARCHIVE_WARN) {
		err = archive_fail(t->a, "entry", e->path);
		goto out;
	}
	if (S_ISREG(e->st.st_mode) && !e->link_first)
		err = write_body(t, e, sparse);
out:
	free(path);
	free(link);
	return err;
}

int ib_tar_write(const char *out_path, const char *const *layers, size_t nlayers,
		 const ib_export_opts *opts)
{
	static const ib_layerfs_ops ops = { tar_enter, NULL };
	struct tar_writer t;
	locale_t utf8 = (locale_t)0, old_locale = (locale_t)0;
	char *tmp = NULL;
	int fd = -1, err = 0;

	if (!opts || opts->epoch < 0) {
		ib_error_set("the export epoch is before 1970");
		return IB_EINVALID;
	}
	memset(&t, 0, sizeof(t));
	t.epoch = opts->epoch;

	if ((err = ib_output_open(out_path, &tmp, &fd)) < 0)
		return err;
	t.a = archive_write_new();
	t.entry = archive_entry_new();
	if (!t.a || !t.entry) {
		err = ib_error_set("cannot start a tar: out of memory");
		goto out;
	}
	t.buf = ib_xmalloc(TAR_BUF_SIZE);
	utf8 = newlocale(LC_CTYPE_MASK, "C.UTF-8", (locale_t)0);
	t.zeros = ib_xcalloc(1, TAR_BUF_SIZE);
	/*
	 * libarchive converts names from the thread's locale to UTF-8 for pax
	 * headers; a fixed UTF-8 locale makes that independent of the caller's
	 * (names that are not UTF-8 go in as bytes, with hdrcharset=BINARY).
	 * Without C.UTF-8, every name is stored as bytes.
	 */
	if (utf8)
		old_locale = uselocale(utf8);
	if (archive_write_set_format_pax(t.a) != ARCHIVE_OK ||
	    (!utf8 && archive_write_set_format_option(t.a, "pax", "hdrcharset", "BINARY") != ARCHIVE_OK) ||
	    archive_write_open_fd(t.a, fd) != ARCHIVE_OK) {
		err = archive_fail(t.a, "archive", out_path);
		goto out;
	}
	err = ib_layerfs_walk(layers, nlayers, &ops, &t);
	if (err)
		goto out;
	if (archive_write_close(t.a) != ARCHIVE_OK) {
		err = archive_fail(t.a, "archive", out_path);
		goto out;
	}
	if ((err = ib_output_commit(tmp, fd, out_path, 0644)) < 0)
		goto out;
	free(tmp);
	tmp = NULL;
out:
	if (t.a)
		archive_write_free(t.a);
	if (old_locale)
		uselocale(old_locale);
	if (utf8)
		freelocale(utf8);
	if (t.entry)
		archive_entry_free(t.entry);
	if (fd >= 0 && close(fd) < 0 && !err)
		err = ib_error_set_errno(errno, "cannot write '%s'", out_path);
	if (tmp) {
		unlink(tmp);
		free(tmp);
	}
	free(t.buf);
	free(t.zeros);
	free(t.segs);
	return err;
}

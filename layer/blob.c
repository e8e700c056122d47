/*
 * A layer's own tree as a tar+zstd blob, and back (blob.h), with
 * libarchive: the pax writer fed from the sorted, fd-based walk (walk.h),
 * and the disk writer in a child that works inside the target.
 */
#include "layer/blob.h"

#include <archive.h>
#include <archive_entry.h>
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

#include "lib/error.h"
#include "lib/util.h"

#define ZSTD_LEVEL "3"

struct packer {
	struct archive *a;
	const ib_walk_opts *opts;
	/* the first name of each file with more than one, by (dev, ino) */
	struct link {
		dev_t dev;
		ino_t ino;
		char *path;
	} *links;
	size_t nlinks;
	char *buf;
	/* the data segments of the file at hand */
	struct segment {
		off_t start, end;
	} *segs;
	size_t nsegs, segs_cap;
	bool sparse;
};

static int fail(struct archive *a, const char *what, const char *path)
{
	return ib_error_set("cannot pack '%s' (%s): %s", path, what, archive_error_string(a));
}

static const char *first_name(struct packer *p, const struct stat *st, const char *path)
{
	for (size_t i = 0; i < p->nlinks; i++)
		if (p->links[i].dev == st->st_dev && p->links[i].ino == st->st_ino)
			return p->links[i].path;
	p->links = ib_xrealloc(p->links, (p->nlinks + 1) * sizeof(*p->links));
	p->links[p->nlinks++] = (struct link){ st->st_dev, st->st_ino, ib_xasprintf("./%s", path) };
	return NULL;
}

static int add_xattrs(struct archive_entry *ae, const ib_walk_entry *e)
{
	char proc[64 + 256], **names = NULL;
	size_t n = 0;
	int err;

	if ((err = ib_walk_xattrs(e, &names, &n)) < 0)
		return err;
	ib_walk_proc_path(proc, e);
	for (size_t i = 0; i < n && !err; i++) {
		char *val = ib_xmalloc(IB_XATTR_LIST_MAX);
		ssize_t len = lgetxattr(proc, names[i], val, IB_XATTR_LIST_MAX);
		if (len < 0)
			err = ib_error_set_errno(errno, "cannot read xattr '%s' of '%s'", names[i], e->path);
		else
			archive_entry_xattr_add_entry(ae, names[i], val, (size_t)len);
		free(val);
	}
	ib_walk_free_names(names, n);
	return err;
}

/* The data segments of the file, by SEEK_DATA/SEEK_HOLE; p->sparse when it has a hole. */
static int find_segments(struct packer *p, int fd, const ib_walk_entry *e)
{
	off_t pos = 0, size = e->st.st_size;

	p->nsegs = 0;
	p->sparse = false;
	while (pos < size) {
		off_t start = lseek(fd, pos, SEEK_DATA), end;

		if (start < 0 && errno == ENXIO)
			break; /* a hole to the end */
		if (start < 0)
			return ib_error_set_errno(errno, "cannot find the data of '%s'", e->path);
		end = lseek(fd, start, SEEK_HOLE);
		if (end < 0)
			return ib_error_set_errno(errno, "cannot find the holes of '%s'", e->path);
		if (end > size)
			end = size;
		if (p->nsegs == p->segs_cap) {
			p->segs_cap = p->segs_cap ? p->segs_cap * 2 : 16;
			p->segs = ib_xrealloc(p->segs, p->segs_cap * sizeof(*p->segs));
		}
		p->segs[p->nsegs].start = start;
		p->segs[p->nsegs++].end = end;
		pos = end;
	}
	p->sparse = !(p->nsegs == 1 && p->segs[0].start == 0 && p->segs[0].end == size) && size > 0;
	return 0;
}

/* len bytes from fd at off (or zeros, fd -1) into the archive. */
static int copy_out(struct packer *p, int fd, off_t off, off_t len, const char *path)
{
	while (len > 0) {
		size_t want = len < (1 << 16) ? (size_t)len : (1 << 16);
		ssize_t n = want;

		if (fd >= 0) {
			n = pread(fd, p->buf, want, off);
			if (n < 0 && errno == EINTR)
				continue;
			if (n < 0)
				return ib_error_set_errno(errno, "cannot read '%s'", path);
			if (n == 0)
				return ib_error_set("'%s' shrank while it was packed", path);
		} else {
			memset(p->buf, 0, want);
		}
		if (archive_write_data(p->a, p->buf, (size_t)n) != n)
			return fail(p->a, "data", path);
		off += n;
		len -= n;
	}
	return 0;
}

/* A file's bytes; for a sparse entry the holes go in as zeros, which libarchive drops. */
static int write_body(struct packer *p, int fd, const ib_walk_entry *e)
{
	off_t pos = 0;
	int err = 0;

	if (!p->sparse)
		return copy_out(p, fd, 0, e->st.st_size, e->path);
	for (size_t i = 0; i < p->nsegs && !err; i++) {
		err = copy_out(p, -1, pos, p->segs[i].start - pos, e->path);
		if (!err)
			err = copy_out(p, fd, p->segs[i].start, p->segs[i].end - p->segs[i].start, e->path);
		pos = p->segs[i].end;
	}
	return err ? err : copy_out(p, -1, pos, e->st.st_size - pos, e->path);
}

static int pack_entry(void *arg, const ib_walk_entry *e)
{
	struct packer *p = arg;
	struct archive_entry *ae;
	const char *link = NULL;
	char *name, target[4096];
	int err = 0, fd = -1;

	if ((err = ib_walk_check_time(p->opts)) < 0)
		return err;
	if (S_ISSOCK(e->st.st_mode))
		return 0; /* tar has no sockets (GNU tar leaves them out too) */
	name = e->depth ? ib_xasprintf("./%s", e->path) : ib_xstrdup("./");
	ae = archive_entry_new();
	archive_entry_copy_stat(ae, &e->st);
	archive_entry_set_pathname(ae, name);
	archive_entry_unset_atime(ae);
	archive_entry_unset_ctime(ae);
	archive_entry_unset_birthtime(ae);
	archive_entry_set_ino64(ae, 0);
	archive_entry_set_dev(ae, 0);
	archive_entry_set_nlink(ae, 1);
	if (S_ISLNK(e->st.st_mode)) {
		ssize_t n = readlinkat(e->dirfd, e->name, target, sizeof(target) - 1);
		if (n < 0) {
			err = ib_error_set_errno(errno, "cannot read the link '%s'", e->path);
			goto out;
		}
		target[n] = '\0';
		archive_entry_set_symlink(ae, target);
	} else if (S_ISREG(e->st.st_mode) && e->st.st_nlink > 1 && (link = first_name(p, &e->st, e->path))) {
		archive_entry_set_hardlink(ae, link);
		archive_entry_set_size(ae, 0);
	}
	if ((err = add_xattrs(ae, e)) < 0)
		goto out;
	if (S_ISREG(e->st.st_mode) && !link) {
		fd = openat(e->dirfd, e->name, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
		if (fd < 0) {
			err = ib_error_set_errno(errno, "cannot open '%s'", e->path);
			goto out;
		}
		/* holes stay holes: a sparse entry of the data segments (GNU sparse 1.0 in pax) */
		if ((err = find_segments(p, fd, e)) < 0)
			goto out;
		if (p->sparse)
			for (size_t i = 0; i < p->nsegs; i++)
				archive_entry_sparse_add_entry(ae, p->segs[i].start, p->segs[i].end - p->segs[i].start);
	}
	if (archive_write_header(p->a, ae) != ARCHIVE_OK) {
		err = fail(p->a, "header", e->path);
		goto out;
	}
	if (fd >= 0)
		err = write_body(p, fd, e);
out:
	if (fd >= 0)
		close(fd);
	archive_entry_free(ae);
	free(name);
	return err;
}

int ib_layer_blob_pack(const char *dir, const char *out_path, const ib_walk_opts *opts,
		       char digest_hex[IB_SHA256_HEX], uint64_t *size)
{
	struct packer p = { .a = archive_write_new(), .opts = opts, .buf = ib_xmalloc(1 << 16) };
	ib_walk_ops ops = { .enter = pack_entry };
	struct stat st;
	int err = 0;

	archive_write_set_format_pax_restricted(p.a);
	/* pax headers spell names as they are (no locale conversion) */
	archive_write_set_format_option(p.a, "pax", "hdrcharset", "BINARY");
	if (archive_write_add_filter_zstd(p.a) != ARCHIVE_OK ||
	    archive_write_set_filter_option(p.a, "zstd", "compression-level", ZSTD_LEVEL) != ARCHIVE_OK) {
		err = ib_error_set("libarchive has no zstd: %s", archive_error_string(p.a));
		goto out;
	}
	/* one block size for every run, and no padding that depends on it */
	archive_write_set_bytes_per_block(p.a, 10240);
	archive_write_set_bytes_in_last_block(p.a, 1);
	if (archive_write_open_filename(p.a, out_path) != ARCHIVE_OK) {
		err = ib_error_set("cannot create '%s': %s", out_path, archive_error_string(p.a));
		goto out;
	}
	err = ib_walk(dir, opts, &ops, &p);
	if (archive_write_close(p.a) != ARCHIVE_OK && !err)
		err = ib_error_set("cannot finish '%s': %s", out_path, archive_error_string(p.a));
	if (!err && (err = ib_sha256_file(digest_hex, out_path)) == 0) {
		if (stat(out_path, &st) < 0)
			err = ib_error_set_errno(errno, "cannot stat '%s'", out_path);
		else
			*size = (uint64_t)st.st_size;
	}
out:
	archive_write_free(p.a);
	for (size_t i = 0; i < p.nlinks; i++)
		free(p.links[i].path);
	free(p.links);
	free(p.segs);
	free(p.buf);
	return err;
}

struct unpacker {
	const char *blob;    /* the file, or */
	int fd;              /* a stream */
	uint64_t max_entries, max_bytes;
};

/* In the child, inside the target: every name relative, libarchive's guards on. */
static int unpack_here(void *arg)
{
	struct unpacker *u = arg;
	struct archive *in = archive_read_new(), *out = archive_write_disk_new();
	struct archive_entry *e, *root = NULL;
	const char *src = u->blob ? u->blob : "the layer stream";
	uint64_t n = 0, bytes = 0;
	int err = 0, r;

	archive_read_support_filter_zstd(in);
	archive_read_support_format_tar(in);
	archive_write_disk_set_options(out, ARCHIVE_EXTRACT_OWNER | ARCHIVE_EXTRACT_PERM | ARCHIVE_EXTRACT_TIME |
						    ARCHIVE_EXTRACT_XATTR | ARCHIVE_EXTRACT_SECURE_NODOTDOT |
						    ARCHIVE_EXTRACT_SECURE_SYMLINKS |
						    ARCHIVE_EXTRACT_SECURE_NOABSOLUTEPATHS);
	if ((u->blob ? archive_read_open_filename(in, u->blob, 1 << 16) : archive_read_open_fd(in, u->fd, 1 << 16)) !=
	    ARCHIVE_OK) {
		err = ib_error_set("cannot read '%s': %s", src, archive_error_string(in));
		goto out;
	}
	while ((r = archive_read_next_header(in, &e)) == ARCHIVE_OK) {
		const char *name = archive_entry_pathname(e);

		if (++n > u->max_entries) {
			err = ib_error_set("'%s': more than %llu entries", src, (unsigned long long)u->max_entries);
			goto out;
		}
		if (strncmp(name, "./", 2)) {
			err = ib_error_set("'%s': entry '%.200s' is not below ./", src, name);
			goto out;
		}
		if (!strcmp(name, "./") || !strcmp(name, "./.")) {
			/* the root is the directory we are in: its owner, mode and time, set last */
			root = archive_entry_clone(e);
			continue;
		}
		if (archive_write_header(out, e) != ARCHIVE_OK) {
			err = ib_error_set("cannot unpack '%.200s': %s", name, archive_error_string(out));
			goto out;
		}
		if (archive_entry_size(e) > 0) {
			const void *buf;
			size_t size;
			la_int64_t off;
			while ((r = archive_read_data_block(in, &buf, &size, &off)) == ARCHIVE_OK) {
				if ((bytes += size) > u->max_bytes) {
					err = ib_error_set("'%s': more than %llu bytes of content", src,
							   (unsigned long long)u->max_bytes);
					goto out;
				}
				if (archive_write_data_block(out, buf, size, off) != ARCHIVE_OK) {
					err = ib_error_set("cannot write '%.200s': %s", name, archive_error_string(out));
					goto out;
				}
			}
			if (r != ARCHIVE_EOF) {
				err = ib_error_set("cannot read '%.200s': %s", name, archive_error_string(in));
				goto out;
			}
		}
		if (archive_write_finish_entry(out) != ARCHIVE_OK) {
			err = ib_error_set("cannot finish '%.200s': %s", name, archive_error_string(out));
			goto out;
		}
	}
	if (r != ARCHIVE_EOF)
		err = ib_error_set("cannot read '%s': %s", src, archive_error_string(in));
out:
	if (archive_write_close(out) != ARCHIVE_OK && !err)
		err = ib_error_set("cannot unpack '%s': %s", src, archive_error_string(out));
	if (!err && root) {
		struct timespec t[2] = { { .tv_nsec = UTIME_OMIT },
					 { archive_entry_mtime(root), archive_entry_mtime_nsec(root) } };
		if (chown(".", archive_entry_uid(root), archive_entry_gid(root)) < 0 ||
		    chmod(".", archive_entry_perm(root)) < 0 || utimensat(AT_FDCWD, ".", t, 0) < 0)
			err = ib_error_set_errno(errno, "cannot set the layer root's owner, mode and time");
		archive_entry_xattr_reset(root);
		while (!err && archive_entry_xattr_count(root) > 0) {
			const char *xname;
			const void *val;
			size_t len;
			if (archive_entry_xattr_next(root, &xname, &val, &len) != ARCHIVE_OK)
				break;
			if (lsetxattr(".", xname, val, len, 0) < 0)
				err = ib_error_set_errno(errno, "cannot set xattr '%s' of the layer root", xname);
		}
	}
	if (root)
		archive_entry_free(root);
	archive_read_free(in);
	archive_write_free(out);
	return err;
}

static int unpack(struct unpacker *u, const char *dir)
{
	int fd = open(dir, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC), err;

	if (fd < 0)
		return ib_error_set_errno(errno, "cannot open '%s'", dir);
	err = ib_in_child_at(fd, u->blob ? -1 : u->fd, unpack_here, u, "unpacking a layer failed");
	close(fd);
	return err;
}

int ib_layer_blob_unpack(const char *blob, const char *dir, uint64_t max_entries)
{
	struct unpacker u = { .blob = blob, .fd = -1, .max_entries = max_entries, .max_bytes = UINT64_MAX };

	return unpack(&u, dir);
}

int ib_layer_blob_unpack_fd(int fd, const char *dir, uint64_t max_entries, uint64_t max_bytes)
{
	struct unpacker u = { .fd = fd, .max_entries = max_entries, .max_bytes = max_bytes };

	return unpack(&u, dir);
}

/*
 * Copying a directory out of an ext4 image a guest wrote, with libext2fs,
 * nothing mounted.  The image is hostile: libext2fs checks the structures
 * it parses (superblock, checksums, directory records, extent headers,
 * cycles in an extent path), and this file checks what it leaves to its
 * caller:
 *
 *  - names: not empty, no '/', no NUL, no "." or ".." but the first of
 *    each in a directory (its own entries), refused when already made
 *    (O_EXCL, mkdirat, mknodat and symlinkat all fail on EEXIST);
 *  - inodes: numbers in range and not reserved, in use, of one of the
 *    seven types, not encrypted; a directory reached twice (a loop, a
 *    linked directory) is an error, as is a one-link inode under two names;
 *  - data: block numbers inside the file system, extents in order, nothing
 *    copied past i_size, inline data as long as i_size, the total under
 *    max_bytes; uninitialised extents are holes;
 *  - work: depth, entries and path length under the tree limits, directory
 *    records read bounded by the entries limit and the file system's size,
 *    the deadline and cancel flag looked at every 256 steps.
 *
 * The walk is iterative: a stack of directories, each with its entries
 * read whole before any is made (as layer/walk.c).  A directory's owner,
 * mode, xattrs and times are set when it is left, after its children
 * changed its mtime.
 */
#include "layer/ext4read.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <et/com_err.h>
#include <linux/posix_acl.h>
#include <linux/posix_acl_xattr.h>
#include <ext2fs/ext2_fs.h>
#include <ext2fs/ext2fs.h>

#include "layer/ext2fs-err.h"
#include "layer/walk.h"
#include "lib/limits.h"
#include "lib/util.h"

/* Bytes read from the image at a time. */
#define CHUNK_BYTES (1024 * 1024)
/* The kernel's limits on one xattr (XATTR_NAME_MAX, XATTR_SIZE_MAX). */
#define XATTR_NAME_LIMIT  255
#define XATTR_VALUE_LIMIT 65536
/* The version of ACLs as ext4 stores them (fs/ext4/acl.h). */
#define EXT4_ACL_VERSION 1

/* An inode met in the tree: directories once only, multiply linked non-directories linked to their first name. */
struct seen {
	ext2_ino_t ino; /* 0: a free slot */
	bool dir;
	char *first; /* a non-directory with more than one link: its first name below dest; else NULL */
};

/* A directory being copied: its entries (read whole first), the next one to make. */
struct frame {
	ext2_ino_t ino;
	int fd;       /* its copy in dest */
	ib_buf names; /* NUL-terminated names, one after another */
	size_t *offs; /* of each name in names */
	ext2_ino_t *inos;
	size_t n, cap, next;
	size_t path_len; /* of its path in the extract's path buffer */
};

struct xattr {
	char *name;
	char *value;
	size_t len;
};

/* An inode's xattrs as the kernel would list them, and its inline data (system.data). */
struct xattrs {
	struct xattr *v;
	size_t n, cap;
	char *data;
	size_t data_len;
};

struct extract {
	ext2_filsys fs;
	const char *image;
	uint64_t max_bytes;
	ib_walk_opts time; /* deadline and cancel, for ib_walk_check_time() */
	ib_buf path;       /* the entry at hand, as a path in the image */
	size_t root_len;   /* of src_path in path: past it and a '/' is the name below dest */
	int rootfd;        /* dest */
	struct seen *seen; /* open addressing, cap a power of two */
	size_t nseen, seen_cap;
	size_t link_bytes; /* of first names kept, at most IB_TREE_LINK_NAMES_MAX */
	uint64_t bytes;    /* file data copied */
	uint64_t entries;  /* names read, against IB_TREE_ENTRIES_MAX */
	uint64_t records;  /* directory records read, live or not */
	uint64_t ticks;
	char *buf; /* CHUNK_BYTES (at least a block) read from the image */
	size_t buf_len;
};


/* The entry at hand, as a path in the image. */
static const char *shown(const struct extract *x)
{
	return x->path.len ? x->path.ptr : "/";
}

/* The entry at hand below dest (for linkat() from the root's fd). */
static const char *below(const struct extract *x)
{
	return x->path.ptr + x->root_len + 1;
}

static int check_time(struct extract *x)
{
	int err = ib_walk_check_time(&x->time);

	if (err < 0)
		ib_error_prefix("copying out of '%s' stopped at '%s'", x->image, shown(x));
	return err;
}

static int tick(struct extract *x)
{
	return (++x->ticks & 255) == 0 ? check_time(x) : 0;
}

/* Making the entry at hand failed: a name made already is one its directory holds twice. */
static int make_error(struct extract *x, const char *what)
{
	if (errno == EEXIST)
		return ib_error_set("'%s' in '%s' is a name its directory holds twice", shown(x), x->image);
	return ib_error_set_errno(errno, "cannot %s '%s' from '%s'", what, shown(x), x->image);
}

/* ---- inodes seen --------------------------------------------------- */

static struct seen *seen_slot(struct extract *x, ext2_ino_t ino)
{
	size_t i = ((size_t)ino * 0x9E3779B97F4A7C15ULL) & (x->seen_cap - 1);

	while (x->seen[i].ino && x->seen[i].ino != ino)
		i = (i + 1) & (x->seen_cap - 1);
	return &x->seen[i];
}

/* The record of ino, made (empty, ino set) when it is new; *fresh tells which. */
static struct seen *seen_get(struct extract *x, ext2_ino_t ino, bool *fresh)
{
	struct seen *s;

	if (x->nseen * 2 >= x->seen_cap) {
		struct seen *old = x->seen;
		size_t old_cap = x->seen_cap;

		x->seen_cap = x->seen_cap ? x->seen_cap * 2 : 256;
		x->seen = ib_xcalloc(x->seen_cap, sizeof(*x->seen));
		for (size_t i = 0; i < old_cap; i++)
			if (old[i].ino)
				*seen_slot(x, old[i].ino) = old[i];
		free(old);
	}
	s = seen_slot(x, ino);
	*fresh = !s->ino;
	if (*fresh) {
		s->ino = ino;
		x->nseen++;
	}
	return s;
}

/* ---- inodes -------------------------------------------------------- */

/* Read inode ino of the entry at hand, refusing what no name may lead to. */
static int read_inode(struct extract *x, ext2_ino_t ino, struct ext2_inode_large *in)
{
	struct ext2_super_block *sb = x->fs->super;
	errcode_t code;

	if (ino < 1 || ino > sb->s_inodes_count)
		return ib_error_set("'%s' in '%s' names inode %u, out of range (1 to %u)", shown(x), x->image, ino,
				    sb->s_inodes_count);
	memset(in, 0, sizeof(*in));
	code = ext2fs_read_inode_full(x->fs, ino, EXT2_INODE(in), sizeof(*in));
	if (code)
		return ib_ext2fs_error(code, "cannot read inode %u ('%s') of '%s'", ino, shown(x), x->image);
	if (!in->i_links_count)
		return ib_error_set("'%s' in '%s' names inode %u, which is not in use", shown(x), x->image, ino);
	if (in->i_flags & EXT4_ENCRYPT_FL)
		return ib_error_set("'%s' in '%s' is encrypted", shown(x), x->image);
	if (in->i_flags & EXT4_EA_INODE_FL)
		return ib_error_set("'%s' in '%s' names inode %u, which holds an xattr value", shown(x), x->image, ino);
	switch (in->i_mode & LINUX_S_IFMT) {
	case LINUX_S_IFDIR:
	case LINUX_S_IFREG:
	case LINUX_S_IFLNK:
	case LINUX_S_IFCHR:
	case LINUX_S_IFBLK:
	case LINUX_S_IFIFO:
	case LINUX_S_IFSOCK: return 0;
	}
	return ib_error_set("'%s' in '%s' has a bad file type (mode 0%o)", shown(x), x->image, in->i_mode);
}

/* The kernel's ext4_decode_extra_time(); false for nanoseconds past a second. */
static bool decode_time(struct timespec *ts, uint32_t sec, uint32_t extra, bool has_extra)
{
	ts->tv_sec = (int32_t)sec;
	ts->tv_nsec = 0;
	if (!has_extra)
		return true;
	ts->tv_sec += (time_t)(extra & EXT4_EPOCH_MASK) << 32;
	ts->tv_nsec = (long)(extra >> EXT4_EPOCH_BITS);
	return ts->tv_nsec < 1000000000L;
}

/* Owner, permission bits and times of an inode, checked for what the host can take. */
struct meta {
	uid_t uid;
	gid_t gid;
	mode_t mode;
	struct timespec ts[2]; /* atime, mtime, for utimensat() */
};

static int inode_meta(struct extract *x, const struct ext2_inode_large *in, struct meta *m)
{
	size_t size = EXT2_INODE_SIZE(x->fs->super);
	size_t have = size > EXT2_GOOD_OLD_INODE_SIZE ? EXT2_GOOD_OLD_INODE_SIZE + in->i_extra_isize : 0;

	if (have > size)
		have = size;
	m->uid = inode_uid(*in);
	m->gid = inode_gid(*in);
	if (m->uid == (uid_t)-1 || m->gid == (gid_t)-1)
		return ib_error_set("'%s' in '%s' has owner %u:%u, which cannot be set", shown(x), x->image,
				    (unsigned)m->uid, (unsigned)m->gid);
	m->mode = in->i_mode & 07777;
	if (!decode_time(&m->ts[0], in->i_atime, in->i_atime_extra, inode_includes(have, i_atime_extra)) ||
	    !decode_time(&m->ts[1], in->i_mtime, in->i_mtime_extra, inode_includes(have, i_mtime_extra)))
		return ib_error_set("'%s' in '%s' has a bad timestamp (nanoseconds past a second)", shown(x), x->image);
	return 0;
}

/* ---- xattrs -------------------------------------------------------- */

static void xattrs_free(struct xattrs *xa)
{
	for (size_t i = 0; i < xa->n; i++) {
		free(xa->v[i].name);
		free(xa->v[i].value);
	}
	free(xa->v);
	free(xa->data);
	memset(xa, 0, sizeof(*xa));
}

/* What the kernel lists for ext4 (its xattr handlers): nothing of "system." but the two ACLs. */
static bool listed(const char *name)
{
	return !strncmp(name, "user.", 5) || !strncmp(name, "trusted.", 8) || !strncmp(name, "security.", 9) ||
	       !strcmp(name, "system.posix_acl_access") || !strcmp(name, "system.posix_acl_default");
}

static void put_le16(ib_buf *b, uint16_t v)
{
	unsigned char c[2] = { (unsigned char)v, (unsigned char)(v >> 8) };

	ib_buf_add(b, c, 2);
}

static void put_le32(ib_buf *b, uint32_t v)
{
	unsigned char c[4] = { (unsigned char)v, (unsigned char)(v >> 8), (unsigned char)(v >> 16),
			       (unsigned char)(v >> 24) };

	ib_buf_add(b, c, 4);
}

static uint32_t get_le(const unsigned char *p, size_t n)
{
	uint32_t v = 0;

	while (n--)
		v = v << 8 | p[n];
	return v;
}

/*
 * An ACL as ext4 stores it (version 1, short entries for the owner, group,
 * mask and other) into the xattr format the kernel reads and writes
 * (version 2, every entry with an id; ACL_UNDEFINED_ID where none).
 * libext2fs converts only in ext2fs_xattr_get(), and without checking that
 * the entries fill the value exactly; this does.
 */
static bool acl_from_disk(ib_buf *out, const unsigned char *v, size_t len)
{
	size_t off = 4;

	if (len < 4 || get_le(v, 4) != EXT4_ACL_VERSION)
		return false;
	put_le32(out, POSIX_ACL_XATTR_VERSION);
	while (off < len) {
		uint16_t tag, perm;
		uint32_t id = (uint32_t)ACL_UNDEFINED_ID;

		if (len - off < 4)
			return false;
		tag = (uint16_t)get_le(v + off, 2);
		perm = (uint16_t)get_le(v + off + 2, 2);
		if (tag == ACL_USER || tag == ACL_GROUP) {
			if (len - off < 8)
				return false;
			id = get_le(v + off + 4, 4);
			off += 8;
		} else if (tag == ACL_USER_OBJ || tag == ACL_GROUP_OBJ || tag == ACL_MASK || tag == ACL_OTHER) {
			off += 4;
		} else {
			return false;
		}
		put_le16(out, tag);
		put_le16(out, perm);
		put_le32(out, id);
	}
	return true;
}

struct xattr_walk {
	struct extract *x;
	struct xattrs *xa;
	int err;
};

static int xattr_one(char *name, char *value, size_t len, void *arg)
{
	struct xattr_walk *w = arg;
	struct xattrs *xa = w->xa;
	ib_buf acl = IB_BUF_INIT;
	struct xattr *a;

	if (!strcmp(name, "system.data")) {
		free(xa->data);
		xa->data = ib_xmalloc(len ? len : 1);
		if (len)
			memcpy(xa->data, value, len);
		xa->data_len = len;
		return 0;
	}
	if (!listed(name))
		return 0;
	if (strlen(name) > XATTR_NAME_LIMIT || len > XATTR_VALUE_LIMIT) {
		w->err = ib_error_set("'%s' in '%s' has an xattr '%.64s...' longer than the kernel allows", shown(w->x),
				      w->x->image, name);
		return XATTR_ABORT;
	}
	if (!strncmp(name, "system.posix_acl_", 17) && !acl_from_disk(&acl, (const unsigned char *)value, len)) {
		ib_buf_free(&acl);
		w->err = ib_error_set("'%s' in '%s' has a malformed ACL '%s'", shown(w->x), w->x->image, name);
		return XATTR_ABORT;
	}
	if (xa->n == xa->cap) {
		xa->cap = xa->cap ? xa->cap * 2 : 8;
		xa->v = ib_xrealloc(xa->v, xa->cap * sizeof(*xa->v));
	}
	a = &xa->v[xa->n++];
	a->name = ib_xstrdup(name);
	if (acl.ptr) {
		a->len = acl.len;
		a->value = ib_buf_detach(&acl);
	} else {
		a->len = len;
		a->value = ib_xmalloc(len ? len : 1);
		if (len)
			memcpy(a->value, value, len);
	}
	return 0;
}

/* The xattrs (and inline data) of inode ino, the entry at hand. */
static int xattrs_load(struct extract *x, ext2_ino_t ino, struct xattrs *xa)
{
	struct ext2_xattr_handle *h = NULL;
	struct xattr_walk w = { x, xa, 0 };
	errcode_t code;

	code = ext2fs_xattrs_open(x->fs, ino, &h);
	if (code == EXT2_ET_MISSING_EA_FEATURE)
		return 0;
	if (!code)
		code = ext2fs_xattrs_read(h);
	if (!code)
		code = ext2fs_xattrs_iterate(h, xattr_one, &w);
	if (h)
		ext2fs_xattrs_close(&h);
	if (w.err)
		return w.err;
	if (code)
		return ib_ext2fs_error(code, "cannot read the xattrs of '%s' in '%s'", shown(x), x->image);
	return 0;
}

/* Onto fd, or when fd is -1 onto proc_path (the entry itself, not followed). */
static int xattrs_apply(struct extract *x, const struct xattrs *xa, int fd, const char *proc_path)
{
	for (size_t i = 0; i < xa->n; i++) {
		const struct xattr *a = &xa->v[i];

		if ((fd >= 0 ? fsetxattr(fd, a->name, a->value, a->len, 0)
			     : lsetxattr(proc_path, a->name, a->value, a->len, 0)) < 0)
			return ib_error_set_errno(errno, "cannot set xattr '%s' of '%s' from '%s'", a->name, shown(x),
						  x->image);
	}
	return 0;
}

/* Owner, then mode (chown clears setuid and capabilities), xattrs, times of an open copy. */
static int finish_fd(struct extract *x, int fd, const struct meta *m, const struct xattrs *xa)
{
	int err;

	if (fchown(fd, m->uid, m->gid) < 0 || fchmod(fd, m->mode) < 0)
		return ib_error_set_errno(errno, "cannot set the owner and mode of '%s' from '%s'", shown(x), x->image);
	if ((err = xattrs_apply(x, xa, fd, NULL)) < 0)
		return err;
	if (futimens(fd, m->ts) < 0)
		return ib_error_set_errno(errno, "cannot set the times of '%s' from '%s'", shown(x), x->image);
	return 0;
}

/* The same for name in parent, not followed (a symlink keeps its mode: Linux has none to set). */
static int finish_at(struct extract *x, int parent, const char *name, bool symlink, const struct meta *m,
		     const struct xattrs *xa)
{
	char proc_path[64 + 256];
	int err;

	if (fchownat(parent, name, m->uid, m->gid, AT_SYMLINK_NOFOLLOW) < 0 ||
	    (!symlink && fchmodat(parent, name, m->mode, 0) < 0))
		return ib_error_set_errno(errno, "cannot set the owner and mode of '%s' from '%s'", shown(x), x->image);
	snprintf(proc_path, sizeof(proc_path), "/proc/self/fd/%d/%s", parent, name);
	if ((err = xattrs_apply(x, xa, -1, proc_path)) < 0)
		return err;
	if (utimensat(parent, name, m->ts, AT_SYMLINK_NOFOLLOW) < 0)
		return ib_error_set_errno(errno, "cannot set the times of '%s' from '%s'", shown(x), x->image);
	return 0;
}

/* ---- file data ----------------------------------------------------- */

static int pwrite_all(int fd, const char *p, size_t len, off_t off)
{
	while (len) {
		ssize_t n = pwrite(fd, p, len, off);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		p += n;
		len -= (size_t)n;
		off += n;
	}
	return 0;
}

/* Count len more bytes of file data against max_bytes. */
static int spend(struct extract *x, uint64_t len)
{
	char limit[32];

	if (x->max_bytes && (x->bytes > x->max_bytes || len > x->max_bytes - x->bytes)) {
		ib_format_size(limit, x->max_bytes);
		return ib_error_set("the step wrote more than %s (--disk): '%s' in '%s' goes past it", limit, shown(x),
				    x->image);
	}
	x->bytes += len;
	return 0;
}

static int write_at(struct extract *x, int out, const char *p, size_t len, uint64_t off)
{
	int err;

	if ((err = spend(x, len)) < 0)
		return err;
	if (pwrite_all(out, p, len, (off_t)off) < 0)
		return ib_error_set_errno(errno, "cannot write '%s' from '%s'", shown(x), x->image);
	return 0;
}

/* Blocks [lblk, lblk + len) of a file, at pblk in the image, into out; nothing from size on. */
static int copy_run(struct extract *x, int out, uint64_t size, uint64_t lblk, uint64_t pblk, uint64_t len)
{
	struct ext2_super_block *sb = x->fs->super;
	uint64_t bs = x->fs->blocksize, chunk = x->buf_len / bs, blocks = ext2fs_blocks_count(sb);
	int err;

	if (lblk * bs >= size || !len)
		return 0;
	if (pblk < sb->s_first_data_block || pblk >= blocks || len > blocks - pblk)
		return ib_error_set("'%s' in '%s' refers to blocks %llu-%llu, outside the file system", shown(x),
				    x->image, (unsigned long long)pblk, (unsigned long long)(pblk + len - 1));
	while (len && lblk * bs < size) {
		uint64_t left = size - lblk * bs, n = len < chunk ? len : chunk, bytes;
		errcode_t code;

		if (n > (left + bs - 1) / bs)
			n = (left + bs - 1) / bs;
		bytes = n * bs < left ? n * bs : left;
		if ((err = check_time(x)) < 0)
			return err;
		code = io_channel_read_blk64(x->fs->io, pblk, (int)n, x->buf);
		if (code)
			return ib_ext2fs_error(code, "cannot read '%s' in '%s'", shown(x), x->image);
		if ((err = write_at(x, out, x->buf, (size_t)bytes, lblk * bs)) < 0)
			return err;
		lblk += n;
		pblk += n;
		len -= n;
	}
	return 0;
}

/* An extent-mapped file: its initialised extents, in order, as data; the rest stays holes. */
static int copy_extents(struct extract *x, ext2_ino_t ino, struct ext2_inode_large *in, int out, uint64_t size)
{
	ext2_extent_handle_t h = NULL;
	struct ext2fs_extent e;
	uint64_t next = 0; /* the first logical block no extent has covered yet */
	errcode_t code;
	int err = 0;

	code = ext2fs_extent_open2(x->fs, ino, EXT2_INODE(in), &h);
	if (code)
		return ib_ext2fs_error(code, "cannot read the extents of '%s' in '%s'", shown(x), x->image);
	for (code = ext2fs_extent_get(h, EXT2_EXTENT_ROOT, &e); !code;
	     code = ext2fs_extent_get(h, EXT2_EXTENT_NEXT_LEAF, &e)) {
		if ((err = tick(x)) < 0)
			break;
		if (!(e.e_flags & EXT2_EXTENT_FLAGS_LEAF))
			continue;
		if (e.e_lblk < next) {
			err = ib_error_set("'%s' in '%s' has extents out of order or overlapping (block %llu)",
					   shown(x), x->image, (unsigned long long)e.e_lblk);
			break;
		}
		next = e.e_lblk + (uint64_t)e.e_len;
		if (e.e_lblk * (uint64_t)x->fs->blocksize >= size)
			break;
		if (e.e_flags & EXT2_EXTENT_FLAGS_UNINIT)
			continue;
		if ((err = copy_run(x, out, size, e.e_lblk, e.e_pblk, e.e_len)) < 0)
			break;
	}
	if (!err && code && code != EXT2_ET_EXTENT_NO_NEXT)
		err = ib_ext2fs_error(code, "cannot read the extents of '%s' in '%s'", shown(x), x->image);
	ext2fs_extent_free(h);
	return err;
}

/* A block-mapped file (ext2/ext3 style): its blocks in order, gathered into runs. */
struct block_walk {
	struct extract *x;
	int out;
	uint64_t size;
	uint64_t lblk, pblk, len; /* the run so far */
	int err;
};

static int block_one(ext2_filsys fs, blk64_t *blocknr, e2_blkcnt_t blockcnt, blk64_t ref_blk, int ref_offset, void *arg)
{
	struct block_walk *w = arg;

	(void)ref_blk;
	(void)ref_offset;
	if (blockcnt < 0)
		return 0;
	if ((w->err = tick(w->x)) < 0)
		return BLOCK_ABORT;
	if ((uint64_t)blockcnt * fs->blocksize >= w->size)
		return BLOCK_ABORT;
	if (w->len && (uint64_t)blockcnt == w->lblk + w->len && *blocknr == w->pblk + w->len) {
		w->len++;
		return 0;
	}
	if ((w->err = copy_run(w->x, w->out, w->size, w->lblk, w->pblk, w->len)) < 0)
		return BLOCK_ABORT;
	w->lblk = (uint64_t)blockcnt;
	w->pblk = *blocknr;
	w->len = 1;
	return 0;
}

static int copy_blocks(struct extract *x, ext2_ino_t ino, int out, uint64_t size)
{
	struct block_walk w = { .x = x, .out = out, .size = size };
	errcode_t code;

	code = ext2fs_block_iterate3(x->fs, ino, BLOCK_FLAG_READ_ONLY | BLOCK_FLAG_DATA_ONLY, NULL, block_one, &w);
	if (w.err)
		return w.err;
	if (code)
		return ib_ext2fs_error(code, "cannot read the blocks of '%s' in '%s'", shown(x), x->image);
	return copy_run(x, out, size, w.lblk, w.pblk, w.len);
}

/* Inline data: the 60 bytes of i_block, then system.data; exactly size of them. */
static int copy_inline(struct extract *x, int out, const struct ext2_inode_large *in, const struct xattrs *xa,
		       uint64_t size)
{
	size_t head = sizeof(in->i_block);
	int err;

	if (size > head + xa->data_len)
		return ib_error_set("'%s' in '%s' is %llu bytes but has %zu bytes of inline data", shown(x), x->image,
				    (unsigned long long)size, head + xa->data_len);
	if ((err = write_at(x, out, (const char *)in->i_block, size < head ? (size_t)size : head, 0)) < 0)
		return err;
	if (size > head)
		err = write_at(x, out, xa->data, (size_t)(size - head), head);
	return err;
}

static int copy_file(struct extract *x, int parent, const char *name, ext2_ino_t ino, struct ext2_inode_large *in,
		     const struct meta *m, const struct xattrs *xa)
{
	uint64_t size = EXT2_I_SIZE(EXT2_INODE(in));
	struct stat st;
	int out, err;

	if (size > (uint64_t)INT64_MAX)
		return ib_error_set("'%s' in '%s' has a bad size", shown(x), x->image);
	out = openat(parent, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (out < 0)
		return make_error(x, "create");
	if (in->i_flags & EXT4_INLINE_DATA_FL)
		err = copy_inline(x, out, in, xa, size);
	else if (in->i_flags & EXT4_EXTENTS_FL)
		err = copy_extents(x, ino, in, out, size);
	else
		err = copy_blocks(x, ino, out, size);
	if (!err && ftruncate(out, (off_t)size) < 0)
		err = ib_error_set_errno(errno, "cannot write '%s' from '%s'", shown(x), x->image);
	if (!err && (fstat(out, &st) < 0 || (uint64_t)st.st_size != size))
		err = ib_error_set("'%s' from '%s': the copy is not %llu bytes", shown(x), x->image,
				   (unsigned long long)size);
	if (!err)
		err = finish_fd(x, out, m, xa);
	if (close(out) < 0 && !err)
		err = ib_error_set_errno(errno, "cannot write '%s' from '%s'", shown(x), x->image);
	return err;
}

/* ---- the other kinds ------------------------------------------------ */

/* A symlink's target: inline data, in i_block (fast), or in a data block (slow). */
static int read_target(struct extract *x, ext2_ino_t ino, struct ext2_inode_large *in, const struct xattrs *xa,
		       char target[PATH_MAX])
{
	uint64_t size = EXT2_I_SIZE(EXT2_INODE(in));
	size_t head = sizeof(in->i_block);

	if (!size || size >= PATH_MAX || size > x->fs->blocksize)
		return ib_error_set("'%s' in '%s' is a symlink of %llu bytes", shown(x), x->image,
				    (unsigned long long)size);
	if (in->i_flags & EXT4_INLINE_DATA_FL) {
		if (size > head + xa->data_len)
			return ib_error_set("'%s' in '%s' is a symlink of %llu bytes with %zu bytes of inline data",
					    shown(x), x->image, (unsigned long long)size, head + xa->data_len);
		memcpy(target, in->i_block, size < head ? (size_t)size : head);
		if (size > head)
			memcpy(target + head, xa->data, (size_t)(size - head));
	} else if (ext2fs_is_fast_symlink(EXT2_INODE(in))) {
		memcpy(target, in->i_block, (size_t)size);
	} else {
		ext2_file_t f = NULL;
		unsigned int got = 0;
		errcode_t code = ext2fs_file_open(x->fs, ino, 0, &f);

		if (!code) {
			code = ext2fs_file_read(f, target, (unsigned int)size, &got);
			ext2fs_file_close(f);
		}
		if (code)
			return ib_ext2fs_error(code, "cannot read the symlink '%s' in '%s'", shown(x), x->image);
		if (got != size)
			return ib_error_set("'%s' in '%s' is a symlink of %llu bytes, %u of them readable", shown(x),
					    x->image, (unsigned long long)size, got);
	}
	target[size] = '\0';
	if (strlen(target) != size)
		return ib_error_set("'%s' in '%s' is a symlink with a NUL byte in its target", shown(x), x->image);
	return 0;
}

/* A device's number: the old 16-bit encoding in i_block[0], else the new one in i_block[1] (the kernel's). */
static dev_t device_number(const struct ext2_inode_large *in)
{
	uint32_t old16 = in->i_block[0], new32 = in->i_block[1];

	if (old16)
		return makedev((old16 >> 8) & 0xff, old16 & 0xff);
	return makedev((new32 & 0xfff00) >> 8, (new32 & 0xff) | ((new32 >> 12) & 0xfff00));
}

/* A symlink, device, fifo or socket. */
static int make_special(struct extract *x, int parent, const char *name, ext2_ino_t ino, struct ext2_inode_large *in,
			const struct meta *m, const struct xattrs *xa)
{
	bool symlink = (in->i_mode & LINUX_S_IFMT) == LINUX_S_IFLNK;
	int r, err;

	if (symlink) {
		char target[PATH_MAX];

		if ((err = read_target(x, ino, in, xa, target)) < 0)
			return err;
		r = symlinkat(target, parent, name);
	} else {
		r = mknodat(parent, name, (in->i_mode & LINUX_S_IFMT) | 0600,
			    S_ISCHR(in->i_mode) || S_ISBLK(in->i_mode) ? device_number(in) : 0);
	}
	if (r < 0)
		return make_error(x, "create");
	return finish_at(x, parent, name, symlink, m, xa);
}

/* Anything but a directory: a link to its first name, or made anew. */
static int copy_nondir(struct extract *x, int parent, const char *name, ext2_ino_t ino, struct ext2_inode_large *in)
{
	struct xattrs xa = { 0 };
	struct meta m;
	struct seen *s;
	bool fresh;
	int err;

	s = seen_get(x, ino, &fresh);
	if (!fresh) {
		if (s->dir || !s->first)
			return ib_error_set("'%s' in '%s' names inode %u again, which has one link", shown(x), x->image,
					    ino);
		if (linkat(x->rootfd, s->first, parent, name, 0) < 0)
			return make_error(x, "link");
		return 0;
	}
	if (in->i_links_count > 1) {
		size_t len = strlen(below(x)) + 1;

		if ((x->link_bytes += len) > IB_TREE_LINK_NAMES_MAX)
			return ib_error_set("'%s' in '%s': more than %d MiB of hard-linked names "
					    "(IB_TREE_LINK_NAMES_MAX)",
					    shown(x), x->image, IB_TREE_LINK_NAMES_MAX >> 20);
		s->first = ib_xstrdup(below(x));
	}
	if ((err = inode_meta(x, in, &m)) < 0 || (err = xattrs_load(x, ino, &xa)) < 0)
		goto out;
	if ((in->i_mode & LINUX_S_IFMT) == LINUX_S_IFREG)
		err = copy_file(x, parent, name, ino, in, &m, &xa);
	else
		err = make_special(x, parent, name, ino, in, &m, &xa);
out:
	xattrs_free(&xa);
	return err;
}

/* ---- directories --------------------------------------------------- */

static void frame_free(struct frame *f)
{
	if (f->fd >= 0)
		close(f->fd);
	ib_buf_free(&f->names);
	free(f->offs);
	free(f->inos);
	memset(f, 0, sizeof(*f));
	f->fd = -1;
}

struct dir_walk {
	struct extract *x;
	struct frame *f;
	bool dot, dotdot;
	int err;
};

/* A name made safe to print: bytes outside printable ASCII as \xNN. */
static void name_shown(char out[4 * EXT2_NAME_LEN + 1], const char *name, size_t len)
{
	size_t o = 0;

	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)name[i];

		if (c >= 0x20 && c < 0x7f && c != '\\')
			out[o++] = (char)c;
		else
			o += (size_t)snprintf(out + o, 5, "\\x%02x", c);
	}
	out[o] = '\0';
}

static int bad_name(struct dir_walk *w, const char *name, size_t len, const char *why)
{
	char s[4 * EXT2_NAME_LEN + 1];

	name_shown(s, name, len);
	return ib_error_set("'%s' in '%s' holds a bad name '%s': %s", shown(w->x), w->x->image, s, why);
}

static int dir_one(ext2_ino_t dir, int entry, struct ext2_dir_entry *de, int offset, int blocksize, char *buf,
		   void *arg)
{
	struct dir_walk *w = arg;
	struct extract *x = w->x;
	struct frame *f = w->f;
	size_t len = (size_t)ext2fs_dirent_name_len(de);
	const char *name = de->name;

	(void)entry;
	(void)offset;
	(void)blocksize;
	(void)buf;
	if ((w->err = tick(x)) < 0)
		return DIRENT_ABORT;
	/* each record is looked at once; a block read again and again (a crafted map) is not read forever */
	if (++x->records > 3 * (uint64_t)IB_TREE_ENTRIES_MAX + ext2fs_blocks_count(x->fs->super)) {
		w->err = ib_error_set("'%s' in '%s': more directory records than the file system can hold", shown(x),
				      x->image);
		return DIRENT_ABORT;
	}
	if (!de->inode)
		return 0;
	if (len == 1 && name[0] == '.' && !w->dot) {
		w->dot = true;
		return 0;
	}
	if (len == 2 && name[0] == '.' && name[1] == '.' && !w->dotdot) {
		w->dotdot = true;
		return 0;
	}
	if (!len)
		w->err = bad_name(w, name, len, "it is empty");
	else if ((len == 1 && name[0] == '.') || (len == 2 && name[0] == '.' && name[1] == '.'))
		w->err = bad_name(w, name, len, "a second entry of that name");
	else if (memchr(name, '/', len))
		w->err = bad_name(w, name, len, "it contains '/'");
	else if (memchr(name, '\0', len))
		w->err = bad_name(w, name, len, "it contains a NUL byte");
	if (w->err)
		return DIRENT_ABORT;
	/* lost+found is the file system's, not the step's */
	if (dir == EXT2_ROOT_INO && len == 10 && !memcmp(name, "lost+found", 10))
		return 0;
	if (++x->entries > IB_TREE_ENTRIES_MAX) {
		w->err = ib_error_set("'%s' in '%s': more than %d entries (IB_TREE_ENTRIES_MAX): refusing the tree",
				      shown(x), x->image, IB_TREE_ENTRIES_MAX);
		return DIRENT_ABORT;
	}
	if (f->n == f->cap) {
		f->cap = f->cap ? f->cap * 2 : 32;
		f->offs = ib_xrealloc(f->offs, f->cap * sizeof(*f->offs));
		f->inos = ib_xrealloc(f->inos, f->cap * sizeof(*f->inos));
	}
	f->offs[f->n] = f->names.len;
	f->inos[f->n] = de->inode;
	f->n++;
	ib_buf_add(&f->names, name, len);
	ib_buf_add(&f->names, "", 1);
	return 0;
}

/* Read the entries of f->ino (the entry at hand) into f. */
static int dir_read(struct extract *x, struct frame *f)
{
	struct dir_walk w = { .x = x, .f = f };
	errcode_t code;

	code = ext2fs_dir_iterate2(x->fs, f->ino, DIRENT_FLAG_INCLUDE_EMPTY, NULL, dir_one, &w);
	if (w.err)
		return w.err;
	if (code)
		return ib_ext2fs_error(code, "cannot read the directory '%s' in '%s'", shown(x), x->image);
	return 0;
}

/* Mark directory inode ino (the entry at hand) as copied; a second time is a loop or a linked directory. */
static int dir_seen(struct extract *x, ext2_ino_t ino)
{
	bool fresh;
	struct seen *s = seen_get(x, ino, &fresh);

	if (!fresh)
		return ib_error_set("'%s' in '%s' is directory inode %u again: a loop or a hard-linked directory",
				    shown(x), x->image, ino);
	s->dir = true;
	return 0;
}

/* A directory's own owner, mode, xattrs and times, after its children. */
static int dir_finish(struct extract *x, struct frame *f)
{
	struct ext2_inode_large in;
	struct xattrs xa = { 0 };
	struct meta m;
	int err;

	if ((err = read_inode(x, f->ino, &in)) < 0 || (err = inode_meta(x, &in, &m)) < 0 ||
	    (err = xattrs_load(x, f->ino, &xa)) < 0)
		goto out;
	err = finish_fd(x, f->fd, &m, &xa);
out:
	xattrs_free(&xa);
	return err;
}

/* The inode of src_path: each component looked up (not followed), each a directory. */
static int lookup_src(struct extract *x, const char *src_path, ext2_ino_t *out)
{
	ext2_ino_t ino = EXT2_ROOT_INO;
	const char *p = src_path;

	if (*p != '/')
		return ib_error_set("'%s' is not an absolute path in '%s'", src_path, x->image);
	for (;;) {
		struct ext2_inode_large in;
		size_t len;
		errcode_t code;
		int err;

		while (*p == '/')
			p++;
		if (!*p)
			break;
		len = strcspn(p, "/");
		if (len > EXT2_NAME_LEN || (len == 1 && p[0] == '.') || (len == 2 && p[0] == '.' && p[1] == '.'))
			return ib_error_set("bad path '%s' in '%s'", src_path, x->image);
		ib_buf_puts(&x->path, "/");
		ib_buf_add(&x->path, p, len);
		code = ext2fs_lookup(x->fs, ino, p, (int)len, NULL, &ino);
		if (code == EXT2_ET_FILE_NOT_FOUND) {
			ib_error_set("'%s' is not in '%s'", shown(x), x->image);
			return IB_ENOTFOUND;
		}
		if (code)
			return ib_ext2fs_error(code, "cannot look up '%s' in '%s'", shown(x), x->image);
		if ((err = read_inode(x, ino, &in)) < 0)
			return err;
		if ((in.i_mode & LINUX_S_IFMT) != LINUX_S_IFDIR)
			return ib_error_set("'%s' in '%s' is not a directory", shown(x), x->image);
		p += len;
	}
	*out = ino;
	return 0;
}

/*
 * Before libext2fs reads a byte: the superblock's geometry must fit the
 * file, and its group descriptor table (which ext2fs_open allocates and
 * reads whole) must be small, or a crafted superblock of 2^29 groups has the
 * builder allocate gigabytes.
 */
#define GDT_BYTES_MAX (16u << 20)

static int check_geometry(int fd, const char *image)
{
	struct ext2_super_block sb;
	struct stat st;
	uint64_t blocks, groups, bsize, desc;

	if (fstat(fd, &st) < 0)
		return ib_error_set_errno(errno, "cannot stat '%s'", image);
	if (!S_ISREG(st.st_mode))
		return ib_error_set("'%s' is not a regular file", image);
	if (pread(fd, &sb, sizeof(sb), 1024) != (ssize_t)sizeof(sb))
		return ib_error_set("'%s' is too short for an ext4 superblock", image);
	if (sb.s_magic != EXT2_SUPER_MAGIC || sb.s_log_block_size > 6)
		return ib_error_set("'%s' is not an ext4 file system", image);
	bsize = 1024ULL << sb.s_log_block_size;
	blocks = sb.s_blocks_count;
	if (sb.s_feature_incompat & EXT4_FEATURE_INCOMPAT_64BIT)
		blocks |= (uint64_t)sb.s_blocks_count_hi << 32;
	desc = (sb.s_feature_incompat & EXT4_FEATURE_INCOMPAT_64BIT) && sb.s_desc_size ? sb.s_desc_size : 32;
	if (!sb.s_blocks_per_group || sb.s_blocks_per_group > 8 * bsize || !sb.s_inodes_per_group ||
	    sb.s_inodes_per_group > 8 * bsize)
		return ib_error_set("'%s' has a bad group geometry", image);
	if (blocks > (uint64_t)st.st_size / bsize)
		return ib_error_set("'%s' claims %llu blocks of %llu bytes: more than the file holds", image,
				    (unsigned long long)blocks, (unsigned long long)bsize);
	groups = (blocks + sb.s_blocks_per_group - 1) / sb.s_blocks_per_group;
	if (groups * desc > GDT_BYTES_MAX)
		return ib_error_set("'%s' has %llu block groups: more than an extraction reads", image,
				    (unsigned long long)groups);
	return 0;
}

int ib_ext4_extract(const char *image, const char *src_path, const char *dest, const ib_ext4_extract_opts *opts)
{
	int fd = open(image, O_RDONLY | O_NOFOLLOW | O_CLOEXEC), err;

	if (fd < 0)
		return ib_error_set_errno(errno, "cannot open '%s'", image);
	err = ib_ext4_extract_fd(fd, image, src_path, dest, opts);
	close(fd);
	return err;
}

int ib_ext4_extract_fd(int imgfd, const char *image, const char *src_path, const char *dest,
		       const ib_ext4_extract_opts *opts)
{
	struct frame *stack = ib_xcalloc(IB_TREE_DEPTH_MAX + 2, sizeof(*stack));
	struct extract x = { .image = image, .rootfd = -1 };
	size_t depth = 0;
	ext2_ino_t root = 0;
	errcode_t code;
	int err;

	for (size_t i = 0; i < IB_TREE_DEPTH_MAX + 2; i++)
		stack[i].fd = -1;
	if (opts) {
		x.max_bytes = opts->max_bytes;
		x.time.deadline = opts->deadline;
		x.time.cancel = opts->cancel;
	}
	ib_buf_puts(&x.path, "");
	ib_ext2fs_init();
	if ((err = check_geometry(imgfd, image)) < 0)
		goto out;
	{
		char name[32];
		int iofd = fcntl(imgfd, F_DUPFD_CLOEXEC, 0);

		if (iofd < 0) {
			err = ib_error_set_errno(errno, "cannot duplicate the descriptor of '%s'", image);
			goto out;
		}
		snprintf(name, sizeof(name), "%d", iofd);
		/* the channel owns iofd from here, and closes it even on failure */
		code = ext2fs_open(name, EXT2_FLAG_64BITS, 0, 0, unixfd_io_manager, &x.fs);
	}
	if (code) {
		x.fs = NULL;
		err = ib_ext2fs_error(code, "cannot open '%s' as ext4", image);
		goto out;
	}
	if (ext2fs_has_feature_journal_needs_recovery(x.fs->super)) {
		err = ib_error_set("'%s' was not cleanly unmounted (its journal needs recovery)", image);
		goto out;
	}
	if (x.fs->super->s_creator_os != EXT2_OS_LINUX) {
		err = ib_error_set("'%s' was not made for Linux (creator OS %u)", image, x.fs->super->s_creator_os);
		goto out;
	}
	x.buf_len = CHUNK_BYTES > x.fs->blocksize ? CHUNK_BYTES : x.fs->blocksize;
	x.buf = ib_xmalloc(x.buf_len);
	if ((err = lookup_src(&x, src_path, &root)) < 0)
		goto out;
	x.root_len = x.path.len;
	x.rootfd = open(dest, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (x.rootfd < 0) {
		err = ib_error_set_errno(errno, "cannot open '%s'", dest);
		goto out;
	}
	stack[0].ino = root;
	stack[0].path_len = x.path.len;
	stack[0].fd = fcntl(x.rootfd, F_DUPFD_CLOEXEC, 0);
	if (stack[0].fd < 0) {
		err = ib_error_set_errno(errno, "cannot open '%s'", dest);
		goto out;
	}
	if ((err = dir_seen(&x, root)) < 0 || (err = dir_read(&x, &stack[0])) < 0)
		goto out;

	for (;;) {
		struct frame *f = &stack[depth], *child;
		struct ext2_inode_large in;
		const char *name;
		ext2_ino_t ino;

		x.path.len = f->path_len;
		x.path.ptr[x.path.len] = '\0';
		if (f->next == f->n) {
			/* the directory is done */
			if ((err = dir_finish(&x, f)) < 0)
				goto out;
			if (depth == 0)
				break;
			frame_free(f);
			depth--;
			continue;
		}
		if ((err = tick(&x)) < 0)
			goto out;
		name = f->names.ptr + f->offs[f->next];
		ino = f->inos[f->next];
		f->next++;
		ib_buf_puts(&x.path, "/");
		ib_buf_puts(&x.path, name);
		if (x.path.len - x.root_len >= IB_TREE_PATH_MAX) {
			err = ib_error_set("'%.200s...' in '%s' is a path longer than %d bytes (IB_TREE_PATH_MAX)",
					   shown(&x), image, IB_TREE_PATH_MAX);
			goto out;
		}
		if (ino < EXT2_FIRST_INO(x.fs->super)) {
			err = ib_error_set("'%s' in '%s' names inode %u, reserved for the file system", shown(&x),
					   image, ino);
			goto out;
		}
		if ((err = read_inode(&x, ino, &in)) < 0)
			goto out;
		if ((in.i_mode & LINUX_S_IFMT) != LINUX_S_IFDIR) {
			if ((err = copy_nondir(&x, f->fd, name, ino, &in)) < 0)
				goto out;
			continue;
		}
		if (depth + 1 > IB_TREE_DEPTH_MAX) {
			err = ib_error_set(
				"'%.200s...' in '%s' is nested deeper than %d directories (IB_TREE_DEPTH_MAX)",
				shown(&x), image, IB_TREE_DEPTH_MAX);
			goto out;
		}
		if ((err = dir_seen(&x, ino)) < 0)
			goto out;
		if (mkdirat(f->fd, name, 0700) < 0) {
			err = make_error(&x, "create");
			goto out;
		}
		child = &stack[depth + 1];
		child->fd = openat(f->fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
		if (child->fd < 0) {
			err = ib_error_set_errno(errno, "cannot open '%s' from '%s'", shown(&x), image);
			goto out;
		}
		child->ino = ino;
		child->path_len = x.path.len;
		depth++;
		if ((err = dir_read(&x, child)) < 0)
			goto out;
	}
	err = 0;
out:
	for (size_t i = 0; i < IB_TREE_DEPTH_MAX + 2; i++)
		frame_free(&stack[i]);
	free(stack);
	if (x.rootfd >= 0)
		close(x.rootfd);
	for (size_t i = 0; i < x.seen_cap; i++)
		free(x.seen[i].first);
	free(x.seen);
	free(x.buf);
	ib_buf_free(&x.path);
	if (x.fs)
		ext2fs_close_free(&x.fs);
	return err;
}

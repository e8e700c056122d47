/*
 * The ext4 writer: the merged tree of a layer stack written straight into a
 * fresh image file with libext2fs, in-process.
 *
 * Shape of the output.  mke2fs' ext4 defaults (extents, flex_bg of 16,
 * 64bit, dir_index, filetype, sparse_super, large_file, huge_file,
 * dir_nlink, extra_isize, ext_attr, metadata_csum, a journal), 4 KiB blocks
 * and 256-byte inodes; no resize_inode (images are grown by rewriting), no
 * reserved blocks.  Inodes are numbered in walk order from 11 (lost+found
 * first, as mke2fs does) and blocks are taken from one cursor that only
 * moves forward, so the layout is a function of the tree alone.
 * Directories of more than one block get an htree index, as the kernel
 * would build them.
 *
 * Sparse output.  The file is ftruncate()d to its size and only blocks that
 * hold something are written: file data, directory blocks, inode table
 * blocks that hold inodes, bitmaps, group descriptors, superblocks, the
 * journal superblock.  A fresh file reads as zeros, so the inode tables are
 * marked zeroed (as mke2fs does after a discard that zeroes) and the
 * journal is created lazily.
 *
 * Speed.  File data does not go through libext2fs' block I/O: each file's
 * blocks are allocated as contiguous runs, its extents are written into
 * the inode directly (up to four, the common case; the library's extent
 * tree code beyond that), and the bytes are copied with copy_file_range()
 * from the layer into the image at the run's offset, one call per run.
 * Directory blocks are built whole in memory from the sorted children
 * (no ext2fs_link(), whose cost grows with the directory).  Metadata goes
 * through libext2fs and its unix I/O cache.
 *
 * Determinism.  UUID and htree hash seed come from the image id, every
 * timestamp is min(mtime, epoch) (atime, ctime, mtime and crtime alike;
 * nanoseconds dropped; negative times become 0), the superblock's times
 * are the epoch, libext2fs' clock is pinned to the epoch, and every inode
 * and block is built from zeroed memory.
 */
#include "layer/writer.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <et/com_err.h>
#include <ext2fs/ext2_fs.h>
#include <ext2fs/ext2fs.h>
#include <ext2fs/ext3_extents.h>

#include "lib/error.h"
#include "layer/ext2fs-err.h"
#include "layer/layerfs.h"
#include "lib/util.h"

#define BLOCK_LOG		2		/* s_log_block_size: 1024 << 2 */
#define BLOCK_SIZE		4096
#define INODE_SIZE		256
#define FLEX_BG_LOG		4		/* 16 groups per flex group */
#define LPF_BLOCKS		4		/* lost+found: 16 KiB, as mke2fs */
#define MAX_EXTENT_LEN		32768		/* longest initialized extent */
#define INODE_EXTENTS		4		/* extents that fit in i_block */
#define COPY_BUF_SIZE		(1024 * 1024)
#define DIRENT_TAIL_SIZE	12		/* struct ext2_dir_entry_tail */
#define DX_TAIL_SIZE		8		/* struct ext2_dx_tail */
#define FAST_SYMLINK_MAX	(EXT2_N_BLOCKS * 4)	/* shorter targets live in i_block */

/*
 * Sizing (see estimate_*() and choose_geometry()):
 *
 *   content = data blocks of every regular file (holes excluded)
 *           + directory blocks (entries packed into 4 KiB blocks, htree
 *             index blocks included)
 *           + one block per symlink of 60 bytes or more
 *           + one block per inode whose xattrs do not fit in the inode
 *           + extent tree blocks of large or fragmented files
 *           + lost+found
 *   free blocks wanted = content + 20% + 64 MiB
 *   image blocks = free blocks wanted + fixed metadata (superblocks and
 *           their backups, group descriptors, bitmaps, inode tables, the
 *           journal of mke2fs' default size for that many blocks),
 *           rounded up to 1 MiB
 *   inodes = entries + 20% + 1024 (libext2fs rounds up to fill whole
 *           inode table blocks in every group)
 *
 * The metadata term is found by laying the file system out in memory and
 * counting, repeated until the free space is enough (two rounds at most in
 * practice).  Headroom costs no disk: the image is sparse.
 */
#define HEADROOM_PERCENT	20
#define HEADROOM_BLOCKS		((64 * 1024 * 1024) / BLOCK_SIZE)
#define INODE_HEADROOM		1024
#define ROUND_BLOCKS		((1024 * 1024) / BLOCK_SIZE)
#define INODE_RATIO		16384		/* bytes per inode of a sized image, as mke2fs' ext4 */

/* Room for xattrs in a 256-byte inode: after extra_isize, magic, end marker. */
#define IBODY_XATTR_ROOM	(INODE_SIZE - EXT2_GOOD_OLD_INODE_SIZE - 32 - 4 - 4)

_Static_assert(sizeof(struct ext2_inode_large) <= INODE_SIZE, "inode buffer too small");

/* An inode as written: the library's struct padded to the on-disk size. */
union inode_buf {
	struct ext2_inode_large in;
	char raw[INODE_SIZE];
};

/* Logical-to-physical block runs of the file being written. */
struct run {
	blk64_t lblk;
	blk64_t pblk;
	blk64_t len;
};

/* A child of a directory being written; name lives in the walk. */
struct dent {
	const char *name;
	ext2_ino_t ino;
	ext2_dirhash_t hash;
	ext2_dirhash_t minor;
	uint8_t len;
	uint8_t type;
};

/*
 * A directory between enter() and leave(): its children so far.  One per
 * depth, reused, so that nothing leaks when a walk stops half-way.
 */
struct wdir {
	ext2_ino_t ino;
	ext2_ino_t parent;
	struct dent *v;
	size_t n;
	size_t cap;
	uint32_t nsubdirs;
};

struct writer {
	ext2_filsys fs;
	int fd;				/* the image, for file data */
	int64_t epoch;
	blk64_t cursor;			/* data blocks are taken at or after this */
	ext2_ino_t next_ino;
	bool create_lpf;
	ext2_ino_t lpf_ino;
	struct run *runs;
	size_t nruns;
	size_t runs_cap;
	struct wdir *dirs;		/* by depth, IB_LAYERFS_DEPTH_MAX + 1 */
	ext2_ino_t *link_ino;		/* by link_id */
	uint32_t *link_count;
	size_t link_cap;
	char *buf;			/* COPY_BUF_SIZE */
	bool no_copy_range;
};

/* What the sizing walk finds. */
struct estimate {
	uint64_t inodes;
	uint64_t blocks;
	bool has_lpf;					/* the tree has /lost+found */
	uint64_t dir_bytes[IB_LAYERFS_DEPTH_MAX + 1];	/* by depth: records so far */
};

static pthread_once_t error_table_once = PTHREAD_ONCE_INIT;

static void error_table_init(void)
{
	initialize_ext2_error_table();
}

void ib_ext2fs_init(void)
{
	pthread_once(&error_table_once, error_table_init);
}

int ib_ext2fs_error(errcode_t code, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	ib_error_set("%s: %s", msg, error_message(code));
	return IB_ERROR;
}

static const char *shown(const char *path)
{
	return *path ? path : "/";
}

static int64_t clamp_time(int64_t t, int64_t epoch)
{
	if (t > epoch)
		t = epoch;
	return t < 0 ? 0 : t;
}

static unsigned file_type(mode_t mode)
{
	switch (mode & S_IFMT) {
	case S_IFREG:
		return EXT2_FT_REG_FILE;
	case S_IFDIR:
		return EXT2_FT_DIR;
	case S_IFCHR:
		return EXT2_FT_CHRDEV;
	case S_IFBLK:
		return EXT2_FT_BLKDEV;
	case S_IFIFO:
		return EXT2_FT_FIFO;
	case S_IFSOCK:
		return EXT2_FT_SOCK;
	case S_IFLNK:
		return EXT2_FT_SYMLINK;
	default:
		return EXT2_FT_UNKNOWN;
	}
}

static uint64_t div_up(uint64_t a, uint64_t b)
{
	return (a + b - 1) / b;
}

/* ---- sizing ---------------------------------------------------------- */

static uint64_t xattr_bytes(const ib_layerfs_entry *e)
{
	uint64_t total = 0;

	/* Entry header, name (prefix included: an overestimate), value. */
	for (size_t i = 0; i < e->nxattrs; i++)
		total += 16 + div_up(strlen(e->xattrs[i].name), 4) * 4 +
			 div_up(e->xattrs[i].size, 4) * 4;
	return total;
}

static uint64_t file_data_blocks(const struct stat *st)
{
	uint64_t n = div_up((uint64_t)st->st_size, BLOCK_SIZE);
	uint64_t allocated = div_up((uint64_t)st->st_blocks * 512, BLOCK_SIZE) + 1;

	return allocated < n ? allocated : n;
}

/* Extent tree blocks: none up to four extents, then one per 340 extents. */
static uint64_t extent_tree_blocks(uint64_t nblocks)
{
	uint64_t extents = div_up(nblocks, MAX_EXTENT_LEN) + 2;

	return extents <= INODE_EXTENTS ? 0 : div_up(extents, 340) + 1;
}

/* Blocks of a directory whose children's records add up to bytes. */
static uint64_t dir_blocks(uint64_t bytes)
{
	uint64_t room = BLOCK_SIZE - DIRENT_TAIL_SIZE, leaves;

	if (bytes + EXT2_DIR_REC_LEN(1) + EXT2_DIR_REC_LEN(2) <= room)
		return 1;
	/* A record that does not fit wastes at most a maximal record. */
	leaves = div_up(bytes, room - EXT2_DIR_REC_LEN(EXT2_NAME_LEN));
	return 1 + leaves + div_up(leaves, 500);
}

static int estimate_enter(void *ctx, ib_layerfs_entry *e)
{
	struct estimate *est = ctx;

	if (e->parent)
		est->dir_bytes[e->depth - 1] += EXT2_DIR_REC_LEN(strlen(e->name));
	/* The tree's own /lost+found, whatever it is, takes the name. */
	if (e->depth == 1 && !strcmp(e->name, "lost+found"))
		est->has_lpf = true;
	if (e->link_first)
		return 0;
	est->inodes++;
	if (xattr_bytes(e) > IBODY_XATTR_ROOM)
		est->blocks++;
	if (S_ISDIR(e->st.st_mode)) {
		est->dir_bytes[e->depth] = 0;
	} else if (S_ISREG(e->st.st_mode)) {
		uint64_t n = file_data_blocks(&e->st);
		est->blocks += n + extent_tree_blocks(n);
	} else if (S_ISLNK(e->st.st_mode) && strlen(e->symlink) >= FAST_SYMLINK_MAX) {
		est->blocks++;
	}
	return 0;
}

static int estimate_leave(void *ctx, ib_layerfs_entry *e)
{
	struct estimate *est = ctx;

	est->blocks += dir_blocks(est->dir_bytes[e->depth]);
	return 0;
}

/* ---- file system set-up ---------------------------------------------- */

/*
 * Lay out a file system of blocks blocks and at least inodes inodes on the
 * image (nothing is written yet).  The I/O channel gets its own duplicate of
 * the image descriptor, closed with the file system.
 */
static int fs_layout(ext2_filsys *out, int fd, blk64_t blocks, uint64_t inodes)
{
	struct ext2_super_block param;
	ext2_filsys fs = NULL;
	char name[32];
	errcode_t code;
	int iofd;

	memset(&param, 0, sizeof(param));
	param.s_rev_level = EXT2_DYNAMIC_REV;
	param.s_log_block_size = BLOCK_LOG;
	param.s_inode_size = INODE_SIZE;
	param.s_inodes_count = inodes > UINT32_MAX ? UINT32_MAX : (uint32_t)inodes;
	param.s_log_groups_per_flex = FLEX_BG_LOG;
	param.s_default_mount_opts = EXT2_DEFM_XATTR_USER | EXT2_DEFM_ACL;
	ext2fs_blocks_count_set(&param, blocks);
	ext2fs_set_feature_journal(&param);
	ext2fs_set_feature_xattr(&param);
	ext2fs_set_feature_dir_index(&param);
	ext2fs_set_feature_filetype(&param);
	ext2fs_set_feature_extents(&param);
	ext2fs_set_feature_64bit(&param);
	ext2fs_set_feature_flex_bg(&param);
	ext2fs_set_feature_sparse_super(&param);
	ext2fs_set_feature_large_file(&param);
	ext2fs_set_feature_huge_file(&param);
	ext2fs_set_feature_dir_nlink(&param);
	ext2fs_set_feature_extra_isize(&param);
	ext2fs_set_feature_metadata_csum(&param);

	iofd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
	if (iofd < 0) {
		ib_error_set_errno(errno, "cannot duplicate the image descriptor");
		return IB_ERROR;
	}
	snprintf(name, sizeof(name), "%d", iofd);
	/* From here on the channel owns iofd, and closes it even on failure. */
	code = ext2fs_initialize(name, EXT2_FLAG_64BITS, &param, unixfd_io_manager, &fs);
	if (code || !fs)
		return ib_ext2fs_error(code, "cannot lay out an ext4 file system of %llu blocks",
				(unsigned long long)blocks);
	code = ext2fs_allocate_tables(fs);
	if (code) {
		ext2fs_free(fs);
		return ib_ext2fs_error(code, "cannot allocate the ext4 group tables");
	}
	*out = fs;
	return 0;
}

static blk64_t journal_blocks(ext2_filsys fs)
{
	struct ext2fs_journal_params jp;

	if (ext2fs_get_journal_params(&jp, fs))
		return 0;
	return (blk64_t)jp.num_journal_blocks + jp.num_fc_blocks;
}

/* Inodes for est: its entries and the reserved ones, plus headroom when asked. */
static uint64_t inodes_for(const struct estimate *est, bool headroom)
{
	uint64_t n = est->inodes + 1 + EXT2_GOOD_OLD_FIRST_INO;

	return headroom ? n + est->inodes * HEADROOM_PERCENT / 100 + INODE_HEADROOM : n;
}

/*
 * Grow the image until the laid-out file system has want free blocks for
 * the content (and inodes); *out is laid out, not written.
 */
static int fit_geometry(ext2_filsys *out, int fd, uint64_t want, uint64_t inodes)
{
	blk64_t blocks = div_up(want + want / 16, ROUND_BLOCKS) * ROUND_BLOCKS;
	ext2_filsys fs = NULL;
	int err;

	for (int round = 0; round < 16; round++) {
		blk64_t total, overhead, next;

		err = fs_layout(&fs, fd, blocks, inodes);
		if (err)
			return err;
		total = ext2fs_blocks_count(fs->super);
		overhead = total - ext2fs_free_blocks_count(fs->super) + journal_blocks(fs);
		if (total > overhead && total - overhead >= want) {
			*out = fs;
			return 0;
		}
		ext2fs_free(fs);
		fs = NULL;
		/* More blocks bring more groups, hence a little more overhead. */
		next = div_up(want + overhead + overhead / 16, ROUND_BLOCKS) * ROUND_BLOCKS;
		blocks = next > blocks ? next : blocks + ROUND_BLOCKS;
	}
	return ib_error_set("cannot find an ext4 geometry for %llu blocks and %llu inodes",
			    (unsigned long long)want, (unsigned long long)inodes);
}

/*
 * The file system of exactly size bytes for est, one inode per 16 KiB at
 * least: 1 and *out when the content fits, 0 when it does not.
 */
static int sized_layout(ext2_filsys *out, int fd, const struct estimate *est, uint64_t content, uint64_t size)
{
	uint64_t inodes = size / INODE_RATIO;
	ext2_filsys fs = NULL;
	blk64_t total, overhead;
	int err;

	if (inodes < inodes_for(est, false))
		inodes = inodes_for(est, false);
	if (inodes > UINT32_MAX)
		return 0;
	if ((err = fs_layout(&fs, fd, size / BLOCK_SIZE, inodes)) < 0)
		return err;
	total = ext2fs_blocks_count(fs->super);
	overhead = total - ext2fs_free_blocks_count(fs->super) + journal_blocks(fs);
	if (total > overhead && total - overhead >= content && inodes <= fs->super->s_inodes_count) {
		*out = fs;
		return 1;
	}
	ext2fs_free(fs);
	return 0;
}

/*
 * The file system for est: of size bytes, or, when size is 0, of the
 * content plus headroom.  Content that does not fit names the smallest
 * whole number of MiB that does.
 */
static int choose_geometry(ext2_filsys *out, int fd, const struct estimate *est, uint64_t size)
{
	uint64_t content = est->blocks + (est->has_lpf ? 0 : LPF_BLOCKS);
	uint64_t want = content + content * HEADROOM_PERCENT / 100 + HEADROOM_BLOCKS;
	uint64_t lo, hi;
	ext2_filsys fs = NULL;
	int rc;

	if (!size)
		return fit_geometry(out, fd, want, inodes_for(est, true));
	if ((rc = sized_layout(out, fd, est, content, size)) != 0)
		return rc < 0 ? rc : 0;

	/* lo MiB does not fit, hi MiB does: the room needed grows with the size, so halve. */
	lo = size >> 20;
	for (hi = lo < 1 ? 2 : 2 * lo;; hi *= 2) {
		if ((rc = sized_layout(&fs, fd, est, content, hi << 20)) < 0)
			return rc;
		if (rc) {
			ext2fs_free(fs);
			break;
		}
		if (hi > (UINT64_C(1) << 30))
			return ib_error_set("the content does not fit in any disk_size");
		lo = hi;
	}
	while (hi - lo > 1) {
		uint64_t mid = lo + (hi - lo) / 2;

		if ((rc = sized_layout(&fs, fd, est, content, mid << 20)) < 0)
			return rc;
		if (rc) {
			ext2fs_free(fs);
			hi = mid;
		} else {
			lo = mid;
		}
	}
	ib_error_set("the content does not fit: disk_size is %llu bytes (%llu MiB), the content is %llu MiB (%llu "
		     "inodes), and with the file system's own metadata the smallest disk_size that fits is %llu MiB",
		     (unsigned long long)size, (unsigned long long)(size >> 20),
		     (unsigned long long)div_up(content * BLOCK_SIZE, 1 << 20), (unsigned long long)inodes_for(est, false),
		     (unsigned long long)hi);
	return IB_EINVALID;
}

static void set_identity(ext2_filsys fs, const ib_export_opts *opts)
{
	unsigned char id[32];

	for (size_t i = 0; i < sizeof(id); i++) {
		unsigned hi, lo;
		char c = opts->image_id[2 * i], d = opts->image_id[2 * i + 1];

		hi = c <= '9' ? (unsigned)(c - '0') : (unsigned)(c - 'a' + 10);
		lo = d <= '9' ? (unsigned)(d - '0') : (unsigned)(d - 'a' + 10);
		id[i] = (unsigned char)(hi << 4 | lo);
	}
	/* UUID: the first half, marked as a random (version 4) UUID. */
	memcpy(fs->super->s_uuid, id, 16);
	fs->super->s_uuid[6] = (fs->super->s_uuid[6] & 0x0f) | 0x40;
	fs->super->s_uuid[8] = (fs->super->s_uuid[8] & 0x3f) | 0x80;
	/* htree hash seed: the second half. */
	memcpy(fs->super->s_hash_seed, id + 16, 16);
	fs->super->s_def_hash_version = EXT2_HASH_HALF_MD4;
	/* Fixed, not the building machine's char signedness. */
	fs->super->s_flags &= ~(EXT2_FLAGS_UNSIGNED_HASH | EXT2_FLAGS_SIGNED_HASH);
	fs->super->s_flags |= EXT2_FLAGS_SIGNED_HASH;
	fs->super->s_checksum_type = EXT2_CRC32C_CHKSUM;
	ext2fs_init_csum_seed(fs);
}

static void set_clock(ext2_filsys fs, int64_t epoch)
{
	struct ext2_super_block *sb = fs->super;
	uint32_t lo = (uint32_t)epoch;
	uint8_t hi = (uint8_t)((uint64_t)epoch >> 32);

#ifdef EXT2_FLAG2_USE_FAKE_TIME
	fs->flags2 |= EXT2_FLAG2_USE_FAKE_TIME;
	fs->now = (time_t)epoch;
#else
	/*
	 * libext2fs 1.47.0 takes now == 0 for "unset" and truncates it to 32
	 * bits wherever it uses it: keep the low 32 bits, never 0.
	 */
	_Static_assert(sizeof(time_t) >= 8, "time_t must have 64 bits");
	fs->now = lo ? (time_t)lo : (time_t)1 << 32;
#endif
	sb->s_mkfs_time = sb->s_lastcheck = sb->s_mtime = sb->s_wtime = lo;
	sb->s_mkfs_time_hi = sb->s_lastcheck_hi = sb->s_mtime_hi = sb->s_wtime_hi = hi;
}

/* ---- inodes and blocks ------------------------------------------------ */

static int alloc_ino(struct writer *w, ext2_ino_t *out, bool is_dir)
{
	ext2_ino_t ino = w->next_ino;

	if (ino > w->fs->super->s_inodes_count)
		return ib_error_set("the ext4 image ran out of inodes (%u)",
				    w->fs->super->s_inodes_count);
	w->next_ino++;
	ext2fs_inode_alloc_stats2(w->fs, ino, +1, is_dir);
	*out = ino;
	return 0;
}

/* The first free run at or after the cursor, at most want blocks long. */
static int alloc_run(struct writer *w, blk64_t want, blk64_t *out_start, blk64_t *out_len)
{
	ext2_filsys fs = w->fs;
	blk64_t last = ext2fs_blocks_count(fs->super) - 1, start, used, end;

	if (w->cursor > last ||
	    ext2fs_find_first_zero_block_bitmap2(fs->block_map, w->cursor, last, &start))
		return ib_error_set("the ext4 image ran out of blocks (%llu)",
				    (unsigned long long)ext2fs_blocks_count(fs->super));
	end = start + want - 1 > last ? last : start + want - 1;
	if (ext2fs_find_first_set_block_bitmap2(fs->block_map, start, end, &used) == 0)
		end = used - 1;
	ext2fs_block_alloc_stats_range(fs, start, (blk_t)(end - start + 1), +1);
	w->cursor = end + 1;
	*out_start = start;
	*out_len = end - start + 1;
	return 0;
}

static void push_run(struct writer *w, blk64_t lblk, blk64_t pblk, blk64_t len)
{
	while (len) {
		struct run *r = w->nruns ? &w->runs[w->nruns - 1] : NULL;
		blk64_t n;

		if (r && r->lblk + r->len == lblk && r->pblk + r->len == pblk && r->len < MAX_EXTENT_LEN) {
			n = MAX_EXTENT_LEN - r->len < len ? MAX_EXTENT_LEN - r->len : len;
			r->len += n;
		} else {
			if (w->nruns == w->runs_cap) {
				w->runs_cap = w->runs_cap ? w->runs_cap * 2 : 16;
				w->runs = ib_xrealloc(w->runs, w->runs_cap * sizeof(*w->runs));
			}
			n = len < MAX_EXTENT_LEN ? len : MAX_EXTENT_LEN;
			w->runs[w->nruns++] = (struct run){ lblk, pblk, n };
		}
		lblk += n;
		pblk += n;
		len -= n;
	}
}

static blk64_t run_blocks(const struct writer *w)
{
	blk64_t n = 0;

	for (size_t i = 0; i < w->nruns; i++)
		n += w->runs[i].len;
	return n;
}

static void init_inode(union inode_buf *ib, mode_t mode, uid_t uid, gid_t gid, int64_t t)
{
	struct ext2_inode_large *in = &ib->in;
	uint32_t lo = (uint32_t)t;
	/* ext4 keeps seconds as signed 32 bits plus two epoch bits in _extra. */
	uint32_t extra = (uint32_t)((t - (int64_t)(int32_t)lo) >> 32) & EXT4_EPOCH_MASK;

	memset(ib, 0, sizeof(*ib));
	in->i_mode = (__u16)mode;
	in->i_uid = (__u16)uid;
	ext2fs_set_i_uid_high(*in, uid >> 16);
	in->i_gid = (__u16)gid;
	ext2fs_set_i_gid_high(*in, gid >> 16);
	in->i_links_count = 1;
	in->i_atime = in->i_ctime = in->i_mtime = in->i_crtime = lo;
	in->i_atime_extra = in->i_ctime_extra = in->i_mtime_extra = in->i_crtime_extra = extra;
	in->i_extra_isize = sizeof(struct ext2_inode_large) - EXT2_GOOD_OLD_INODE_SIZE;
}

static int write_inode(struct writer *w, ext2_ino_t ino, union inode_buf *ib, const char *path)
{
	errcode_t code = ext2fs_write_inode_full(w->fs, ino, (struct ext2_inode *)ib, INODE_SIZE);

	if (code)
		return ib_ext2fs_error(code, "cannot write the inode of '%s'", shown(path));
	return 0;
}

/*
 * Point the inode at w->runs: in i_block when they fit, else through the
 * library's extent tree code (which allocates index blocks and counts them
 * in i_blocks).  Sets EXT4_EXTENTS_FL; no runs gives an empty tree.
 */
static int set_extents(struct writer *w, ext2_ino_t ino, union inode_buf *ib, const char *path)
{
	struct ext3_extent_header *eh = (struct ext3_extent_header *)ib->in.i_block;
	struct ext3_extent *ex = (struct ext3_extent *)(eh + 1);
	ext2_extent_handle_t h = NULL;
	errcode_t code = 0;

	ib->in.i_flags |= EXT4_EXTENTS_FL;
	memset(ib->in.i_block, 0, sizeof(ib->in.i_block));
	eh->eh_magic = ext2fs_cpu_to_le16(EXT3_EXT_MAGIC);
	eh->eh_max = ext2fs_cpu_to_le16(INODE_EXTENTS);
	if (w->nruns <= INODE_EXTENTS) {
		eh->eh_entries = ext2fs_cpu_to_le16((__u16)w->nruns);
		for (size_t i = 0; i < w->nruns; i++) {
			ex[i].ee_block = ext2fs_cpu_to_le32((__u32)w->runs[i].lblk);
			ex[i].ee_len = ext2fs_cpu_to_le16((__u16)w->runs[i].len);
			ex[i].ee_start = ext2fs_cpu_to_le32((__u32)w->runs[i].pblk);
			ex[i].ee_start_hi = ext2fs_cpu_to_le16((__u16)(w->runs[i].pblk >> 32));
		}
		return 0;
	}
	code = ext2fs_extent_open2(w->fs, ino, (struct ext2_inode *)&ib->in, &h);
	for (size_t i = 0; !code && i < w->nruns; i++) {
		struct ext2fs_extent e = { .e_pblk = w->runs[i].pblk, .e_lblk = w->runs[i].lblk,
					   .e_len = (__u32)w->runs[i].len, .e_flags = 0 };
		struct ext2fs_extent cur;

		/* As ext2fs_fallocate() does: find the neighbour, insert by it. */
		ext2fs_extent_goto(h, e.e_lblk);
		code = ext2fs_extent_get(h, EXT2_EXTENT_CURRENT, &cur);
		if (code == EXT2_ET_NO_CURRENT_NODE) {
			cur.e_lblk = 0;
			code = 0;
		}
		if (!code)
			code = ext2fs_extent_insert(h, cur.e_lblk > e.e_lblk ? 0 : EXT2_EXTENT_INSERT_AFTER, &e);
		if (!code)
			code = ext2fs_extent_fix_parents(h);
	}
	if (h)
		ext2fs_extent_free(h);
	if (code)
		return ib_ext2fs_error(code, "cannot build the extent tree of '%s'", shown(path));
	return 0;
}

static int pwrite_all(int fd, const char *p, size_t len, off_t off)
{
	while (len) {
		ssize_t n = pwrite(fd, p, len, off);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -1;
		p += n;
		off += n;
		len -= (size_t)n;
	}
	return 0;
}

/* len bytes of e from src_off to the image at dst_off. */
static int copy_data(struct writer *w, const ib_layerfs_entry *e, off_t src_off, off_t dst_off,
		     size_t len)
{
	while (len) {
		ssize_t n;

		if (!w->no_copy_range) {
			loff_t so = src_off, doff = dst_off;

			n = copy_file_range(e->fd, &so, w->fd, &doff, len, 0);
			if (n < 0 && (errno == EXDEV || errno == EINVAL || errno == ENOSYS ||
				      errno == EOPNOTSUPP)) {
				w->no_copy_range = true;
				continue;
			}
		} else {
			n = pread(e->fd, w->buf, len < COPY_BUF_SIZE ? len : COPY_BUF_SIZE, src_off);
			if (n > 0 && pwrite_all(w->fd, w->buf, (size_t)n, dst_off) < 0)
				return ib_error_set_errno(errno, "cannot write the ext4 image");
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return ib_error_set_errno(errno, "cannot copy '%s' from layer %zu", e->path, e->layer);
		if (n == 0)
			return ib_error_set("'%s' in layer %zu shrank while being copied", e->path, e->layer);
		src_off += n;
		dst_off += n;
		len -= (size_t)n;
	}
	return 0;
}

/* Allocate and fill the blocks covering bytes [start, end) of e. */
static int add_data(struct writer *w, const ib_layerfs_entry *e, off_t start, off_t end)
{
	blk64_t lb = (blk64_t)start / BLOCK_SIZE, le = div_up((uint64_t)end, BLOCK_SIZE);
	uint64_t size = (uint64_t)e->st.st_size;

	if (w->nruns) {
		const struct run *r = &w->runs[w->nruns - 1];
		if (lb < r->lblk + r->len)
			lb = r->lblk + r->len;
	}
	while (lb < le) {
		blk64_t pblk, n;
		uint64_t off = lb * BLOCK_SIZE, len;
		int err = alloc_run(w, le - lb, &pblk, &n);

		if (err)
			return err;
		push_run(w, lb, pblk, n);
		len = n * BLOCK_SIZE;
		if (off + len > size)
			len = size - off;
		err = copy_data(w, e, (off_t)off, (off_t)(pblk * BLOCK_SIZE), len);
		if (err)
			return err;
		lb += n;
	}
	return 0;
}

struct add_ctx {
	struct writer *w;
	const ib_layerfs_entry *e;
};

static int add_segment(void *arg, off_t start, off_t end)
{
	struct add_ctx *ac = arg;

	return add_data(ac->w, ac->e, start, end);
}

static int write_regular(struct writer *w, const ib_layerfs_entry *e, ext2_ino_t ino,
			 union inode_buf *ib)
{
	off_t size = e->st.st_size;
	errcode_t code;
	int err = 0;

	struct add_ctx ac = { w, e };

	w->nruns = 0;
	err = ib_layerfs_data_segments(e, add_segment, &ac, NULL);
	if (err)
		return err;
	code = ext2fs_inode_size_set(w->fs, (struct ext2_inode *)&ib->in, (ext2_off64_t)size);
	if (!code)
		code = ext2fs_iblk_set(w->fs, (struct ext2_inode *)&ib->in, run_blocks(w));
	if (code)
		return ib_ext2fs_error(code, "cannot set the size of '%s'", e->path);
	err = set_extents(w, ino, ib, e->path);
	if (err)
		return err;
	return write_inode(w, ino, ib, e->path);
}

static int write_symlink(struct writer *w, const ib_layerfs_entry *e, ext2_ino_t ino,
			 union inode_buf *ib)
{
	size_t len = strlen(e->symlink);
	blk64_t pblk, n;
	int err;

	ib->in.i_size = (__u32)len;
	if (len < FAST_SYMLINK_MAX) {
		/* A fast symlink: the target lives in i_block. */
		memcpy(ib->in.i_block, e->symlink, len);
		return write_inode(w, ino, ib, e->path);
	}
	if (len >= BLOCK_SIZE)
		return ib_error_set("symlink '%s' has a target longer than %d bytes", e->path,
				    BLOCK_SIZE - 1);
	err = alloc_run(w, 1, &pblk, &n);
	if (err)
		return err;
	w->nruns = 0;
	push_run(w, 0, pblk, 1);
	memset(w->buf, 0, BLOCK_SIZE);
	memcpy(w->buf, e->symlink, len);
	if (pwrite_all(w->fd, w->buf, BLOCK_SIZE, (off_t)(pblk * BLOCK_SIZE)) < 0)
		return ib_error_set_errno(errno, "cannot write the ext4 image");
	if (ext2fs_iblk_set(w->fs, (struct ext2_inode *)&ib->in, 1))
		return ib_error_set("cannot count the block of symlink '%s'", e->path);
	err = set_extents(w, ino, ib, e->path);
	if (err)
		return err;
	return write_inode(w, ino, ib, e->path);
}

static int write_special(struct writer *w, const ib_layerfs_entry *e, ext2_ino_t ino,
			 union inode_buf *ib)
{
	if (S_ISCHR(e->st.st_mode) || S_ISBLK(e->st.st_mode)) {
		unsigned ma = major(e->st.st_rdev), mi = minor(e->st.st_rdev);

		/* The kernel's old and new device encodings. */
		if (ma < 256 && mi < 256) {
			ib->in.i_block[0] = ma * 256 + mi;
		} else {
			ib->in.i_block[1] = (mi & 0xff) | (ma << 8) | ((mi & ~0xffu) << 12);
		}
	}
	return write_inode(w, ino, ib, e->path);
}

static int write_xattrs(struct writer *w, ext2_ino_t ino, const ib_layerfs_entry *e)
{
	struct ext2_xattr_handle *h = NULL;
	errcode_t code;

	if (!e->nxattrs)
		return 0;
	code = ext2fs_xattrs_open(w->fs, ino, &h);
	for (size_t i = 0; !code && i < e->nxattrs; i++)
		code = ext2fs_xattr_set(h, e->xattrs[i].name, e->xattrs[i].value, e->xattrs[i].size);
	if (h)
		ext2fs_xattrs_close(&h);
	if (code)
		return ib_ext2fs_error(code, "cannot store the xattrs of '%s'", shown(e->path));
	return 0;
}

/* ---- directories ------------------------------------------------------ */

static void dir_add(struct wdir *d, const char *name, ext2_ino_t ino, unsigned type)
{
	if (d->n == d->cap) {
		d->cap = d->cap ? d->cap * 2 : 16;
		d->v = ib_xrealloc(d->v, d->cap * sizeof(*d->v));
	}
	d->v[d->n++] = (struct dent){ name, ino, 0, 0, (uint8_t)strlen(name), (uint8_t)type };
}

/* Start the directory at e->depth: ino, whose parent is parent. */
static struct wdir *wdir_open(struct writer *w, const ib_layerfs_entry *e, ext2_ino_t ino,
			      ext2_ino_t parent)
{
	struct wdir *d = &w->dirs[e->depth];

	d->ino = ino;
	d->parent = parent;
	d->n = 0;
	d->nsubdirs = 0;
	return d;
}

/* Append a record at *off of blk; returns the record. */
static struct ext2_dir_entry *put_dirent(ext2_filsys fs, char *blk, unsigned *off, ext2_ino_t ino,
					 const char *name, unsigned len, unsigned type)
{
	struct ext2_dir_entry *de = (struct ext2_dir_entry *)(blk + *off);
	unsigned rec = EXT2_DIR_REC_LEN(len);

	de->inode = ino;
	ext2fs_dirent_set_name_len(de, (int)len);
	ext2fs_dirent_set_file_type(de, (int)type);
	ext2fs_set_rec_len(fs, rec, de);
	memcpy(de->name, name, len);
	*off += rec;
	return de;
}

/* Close a leaf block: the last record takes the rest, then the csum tail. */
static void end_leaf(ext2_filsys fs, char *blk, unsigned off, struct ext2_dir_entry *last)
{
	unsigned room = BLOCK_SIZE - DIRENT_TAIL_SIZE;

	if (!last) {
		last = (struct ext2_dir_entry *)blk;
		ext2fs_set_rec_len(fs, room, last);
	} else {
		ext2fs_set_rec_len(fs, room - off + EXT2_DIR_REC_LEN(ext2fs_dirent_name_len(last)), last);
	}
	ext2fs_initialize_dirent_tail(fs, EXT2_DIRENT_TAIL(blk, BLOCK_SIZE));
}

static int dent_hash_cmp(const void *a, const void *b)
{
	const struct dent *x = a, *y = b;

	if (x->hash != y->hash)
		return x->hash < y->hash ? -1 : 1;
	if (x->minor != y->minor)
		return x->minor < y->minor ? -1 : 1;
	return strcmp(x->name, y->name);
}

static void put_dx_entry(char *p, ext2_dirhash_t hash, blk64_t block)
{
	struct ext2_dx_entry *dx = (struct ext2_dx_entry *)p;

	dx->hash = ext2fs_cpu_to_le32(hash);
	dx->block = ext2fs_cpu_to_le32((__u32)block);
}

static void put_countlimit(char *p, unsigned limit, unsigned count)
{
	struct ext2_dx_countlimit *cl = (struct ext2_dx_countlimit *)p;

	cl->limit = ext2fs_cpu_to_le16((__u16)limit);
	cl->count = ext2fs_cpu_to_le16((__u16)count);
}

/*
 * Build the blocks of directory d into *out (*out_n blocks): one linear
 * block when everything fits, else an htree laid out as e2fsck -D does:
 * block 0 the root, then the leaves in hash order, then (past 507 leaves)
 * one level of index blocks.  min_blocks pads with empty blocks.
 */
static int build_dir(struct writer *w, struct wdir *d, const char *path, size_t min_blocks,
		     char **out, size_t *out_n, bool *out_indexed)
{
	ext2_filsys fs = w->fs;
	unsigned room = BLOCK_SIZE - DIRENT_TAIL_SIZE, off = 0;
	unsigned root_limit = (BLOCK_SIZE - 32 - DX_TAIL_SIZE) / sizeof(struct ext2_dx_entry);
	unsigned node_limit = (BLOCK_SIZE - 8 - DX_TAIL_SIZE) / sizeof(struct ext2_dx_entry);
	size_t bytes = EXT2_DIR_REC_LEN(1) + EXT2_DIR_REC_LEN(2), nblk, cap, nleaves, nnodes;
	ext2_dirhash_t *leaf_hash = NULL, prev;
	struct ext2_dir_entry *last = NULL;
	char *buf, *blk;

	for (size_t i = 0; i < d->n; i++)
		bytes += EXT2_DIR_REC_LEN(d->v[i].len);

	if (bytes <= room) {
		nblk = min_blocks > 1 ? min_blocks : 1;
		buf = ib_xcalloc(nblk, BLOCK_SIZE);
		put_dirent(fs, buf, &off, d->ino, ".", 1, EXT2_FT_DIR);
		last = put_dirent(fs, buf, &off, d->parent, "..", 2, EXT2_FT_DIR);
		for (size_t i = 0; i < d->n; i++)
			last = put_dirent(fs, buf, &off, d->v[i].ino, d->v[i].name, d->v[i].len,
					  d->v[i].type);
		end_leaf(fs, buf, off, last);
		for (size_t b = 1; b < nblk; b++)
			end_leaf(fs, buf + b * BLOCK_SIZE, 0, NULL);
		*out = buf;
		*out_n = nblk;
		*out_indexed = false;
		return 0;
	}

	for (size_t i = 0; i < d->n; i++) {
		errcode_t code = ext2fs_dirhash2(fs->super->s_def_hash_version, d->v[i].name,
						 d->v[i].len, NULL, 0, fs->super->s_hash_seed,
						 &d->v[i].hash, &d->v[i].minor);
		if (code)
			return ib_ext2fs_error(code, "cannot hash a name in '%s'", shown(path));
	}
	qsort(d->v, d->n, sizeof(*d->v), dent_hash_cmp);

	/* Leaves, from block 1 on. */
	cap = 8;
	buf = ib_xcalloc(cap, BLOCK_SIZE);
	leaf_hash = ib_xmalloc(cap * sizeof(*leaf_hash));
	nleaves = 0;
	blk = NULL;
	prev = 1;	/* hashes are even: matches nothing */
	for (size_t i = 0; i < d->n; i++) {
		const struct dent *de = &d->v[i];

		if (!blk || off + EXT2_DIR_REC_LEN(de->len) > room) {
			if (blk)
				end_leaf(fs, blk, off, last);
			if (nleaves + 2 > cap) {
				buf = ib_xrealloc(buf, cap * 2 * BLOCK_SIZE);
				memset(buf + cap * BLOCK_SIZE, 0, cap * BLOCK_SIZE);
				leaf_hash = ib_xrealloc(leaf_hash, cap * 2 * sizeof(*leaf_hash));
				cap *= 2;
			}
			blk = buf + (1 + nleaves) * BLOCK_SIZE;
			/* A hash continued from the previous leaf is marked by bit 0. */
			leaf_hash[nleaves++] = de->hash == prev ? de->hash | 1 : de->hash;
			off = 0;
			last = NULL;
		}
		last = put_dirent(fs, blk, &off, de->ino, de->name, de->len, de->type);
		prev = de->hash;
	}
	end_leaf(fs, blk, off, last);

	nnodes = nleaves <= root_limit ? 0 : div_up(nleaves, node_limit);
	if (nnodes > root_limit) {
		free(buf);
		free(leaf_hash);
		return ib_error_set("directory '%s' has too many entries for ext4 (%zu)", shown(path), d->n);
	}
	nblk = 1 + nleaves + nnodes;
	if (nblk > cap) {
		buf = ib_xrealloc(buf, nblk * BLOCK_SIZE);
		memset(buf + cap * BLOCK_SIZE, 0, (nblk - cap) * BLOCK_SIZE);
	}

	/* The root: "." and "..", whose record covers the index. */
	{
		struct ext2_dx_root_info *info;
		char *root = buf;
		unsigned ro = 0;

		put_dirent(fs, root, &ro, d->ino, ".", 1, EXT2_FT_DIR);
		last = put_dirent(fs, root, &ro, d->parent, "..", 2, EXT2_FT_DIR);
		ext2fs_set_rec_len(fs, BLOCK_SIZE - EXT2_DIR_REC_LEN(1), last);
		info = (struct ext2_dx_root_info *)(root + 24);
		info->hash_version = fs->super->s_def_hash_version;
		info->info_length = sizeof(*info);
		info->indirect_levels = nnodes ? 1 : 0;
		if (!nnodes) {
			put_countlimit(root + 32, root_limit, (unsigned)nleaves);
			for (size_t i = 0; i < nleaves; i++)
				put_dx_entry(root + 32 + 8 * i, i ? leaf_hash[i] : 0, 1 + i);
			put_countlimit(root + 32, root_limit, (unsigned)nleaves);
		} else {
			for (size_t j = 0; j < nnodes; j++) {
				size_t first = j * node_limit;
				size_t count = nleaves - first < node_limit ? nleaves - first : node_limit;
				char *node = buf + (1 + nleaves + j) * BLOCK_SIZE;
				struct ext2_dir_entry *fake = (struct ext2_dir_entry *)node;

				put_dx_entry(root + 32 + 8 * j, j ? leaf_hash[first] : 0, 1 + nleaves + j);
				fake->inode = 0;
				ext2fs_set_rec_len(fs, BLOCK_SIZE, fake);
				for (size_t i = 0; i < count; i++)
					put_dx_entry(node + 8 + 8 * i, i ? leaf_hash[first + i] : 0,
						     1 + first + i);
				put_countlimit(node + 8, node_limit, (unsigned)count);
			}
			put_countlimit(root + 32, root_limit, (unsigned)nnodes);
		}
	}
	free(leaf_hash);
	*out = buf;
	*out_n = nblk;
	*out_indexed = true;
	return 0;
}

/* Write directory d: its blocks, then its inode (metadata from st). */
static int write_dir(struct writer *w, struct wdir *d, const char *path, const struct stat *st,
		     int64_t t, size_t min_blocks)
{
	ext2_filsys fs = w->fs;
	union inode_buf ib;
	char *blocks = NULL;
	size_t nblk = 0, b = 0;
	bool indexed;
	errcode_t code;
	int err;

	err = build_dir(w, d, path, min_blocks, &blocks, &nblk, &indexed);
	if (err)
		return err;
	w->nruns = 0;
	for (blk64_t lb = 0; lb < nblk; ) {
		blk64_t pblk, n;

		err = alloc_run(w, nblk - lb, &pblk, &n);
		if (err)
			goto out;
		push_run(w, lb, pblk, n);
		lb += n;
	}
	init_inode(&ib, st->st_mode, st->st_uid, st->st_gid, t);
	ib.in.i_links_count = d->nsubdirs + 2 > EXT2_LINK_MAX ? 1 : (__u16)(d->nsubdirs + 2);
	if (indexed)
		ib.in.i_flags |= EXT2_INDEX_FL;
	code = ext2fs_inode_size_set(fs, (struct ext2_inode *)&ib.in, (ext2_off64_t)nblk * BLOCK_SIZE);
	if (!code)
		code = ext2fs_iblk_set(fs, (struct ext2_inode *)&ib.in, nblk);
	if (code) {
		err = ib_ext2fs_error(code, "cannot size directory '%s'", shown(path));
		goto out;
	}
	err = set_extents(w, d->ino, &ib, path);
	if (!err)
		err = write_inode(w, d->ino, &ib, path);
	/* After the inode: the block checksums read its generation. */
	for (size_t r = 0; !err && r < w->nruns; r++) {
		for (blk64_t i = 0; i < w->runs[r].len; i++, b++) {
			code = ext2fs_write_dir_block4(fs, w->runs[r].pblk + i, blocks + b * BLOCK_SIZE,
						       0, d->ino);
			if (code) {
				err = ib_ext2fs_error(code, "cannot write directory '%s'", shown(path));
				break;
			}
		}
	}
out:
	free(blocks);
	return err;
}

static int create_lost_found(struct writer *w)
{
	struct wdir d = { .parent = EXT2_ROOT_INO };
	struct stat st;
	int err;

	err = alloc_ino(w, &d.ino, true);
	if (err)
		return err;
	memset(&st, 0, sizeof(st));
	st.st_mode = S_IFDIR | 0700;
	w->lpf_ino = d.ino;
	return write_dir(w, &d, "lost+found", &st, w->epoch, LPF_BLOCKS);
}

/* ---- the walk --------------------------------------------------------- */

static int writer_enter(void *ctx, ib_layerfs_entry *e)
{
	struct writer *w = ctx;
	struct wdir *parent = e->parent ? e->parent->data : NULL;
	union inode_buf ib;
	ext2_ino_t ino = 0;
	int err;

	if (!parent) {
		struct wdir *root = wdir_open(w, e, EXT2_ROOT_INO, EXT2_ROOT_INO);

		ext2fs_inode_alloc_stats2(w->fs, EXT2_ROOT_INO, +1, 1);
		if (w->lpf_ino) {
			dir_add(root, "lost+found", w->lpf_ino, EXT2_FT_DIR);
			root->nsubdirs++;
		}
		e->data = root;
		return 0;
	}
	if (strlen(e->name) > EXT2_NAME_LEN)
		return ib_error_set("'%s' has a name longer than %d bytes", e->path, EXT2_NAME_LEN);
	if (e->link_first && e->link_id < w->link_cap && w->link_ino[e->link_id]) {
		/* Another name of a file written already. */
		dir_add(parent, e->name, w->link_ino[e->link_id], file_type(e->st.st_mode));
		w->link_count[e->link_id]++;
		return 0;
	}
	err = alloc_ino(w, &ino, S_ISDIR(e->st.st_mode));
	if (err)
		return err;
	dir_add(parent, e->name, ino, file_type(e->st.st_mode));
	if (S_ISDIR(e->st.st_mode)) {
		parent->nsubdirs++;
		e->data = wdir_open(w, e, ino, parent->ino);
		return 0;
	}
	init_inode(&ib, e->st.st_mode, e->st.st_uid, e->st.st_gid,
		   clamp_time(e->st.st_mtime, w->epoch));
	switch (e->st.st_mode & S_IFMT) {
	case S_IFREG:
		err = write_regular(w, e, ino, &ib);
		break;
	case S_IFLNK:
		err = write_symlink(w, e, ino, &ib);
		break;
	case S_IFCHR:
	case S_IFBLK:
	case S_IFIFO:
	case S_IFSOCK:
		err = write_special(w, e, ino, &ib);
		break;
	default:
		err = ib_error_set("'%s' in layer %zu has an unknown file type", e->path, e->layer);
	}
	if (!err)
		err = write_xattrs(w, ino, e);
	if (!err && e->link_id) {
		if (e->link_id >= w->link_cap) {
			size_t cap = w->link_cap ? w->link_cap : 64;

			while (cap <= e->link_id)
				cap *= 2;
			w->link_ino = ib_xrealloc(w->link_ino, cap * sizeof(*w->link_ino));
			w->link_count = ib_xrealloc(w->link_count, cap * sizeof(*w->link_count));
			memset(w->link_ino + w->link_cap, 0, (cap - w->link_cap) * sizeof(*w->link_ino));
			memset(w->link_count + w->link_cap, 0, (cap - w->link_cap) * sizeof(*w->link_count));
			w->link_cap = cap;
		}
		w->link_ino[e->link_id] = ino;
		w->link_count[e->link_id] = 1;
	}
	return err;
}

static int writer_leave(void *ctx, ib_layerfs_entry *e)
{
	struct writer *w = ctx;
	struct wdir *d = e->data;
	int err;

	err = write_dir(w, d, e->path, &e->st, clamp_time(e->st.st_mtime, w->epoch), 1);
	if (!err)
		err = write_xattrs(w, d->ino, e);
	return err;
}

/* Hard links: each inode was written with one link; set the real count. */
static int fix_link_counts(struct writer *w)
{
	for (size_t id = 1; id < w->link_cap; id++) {
		union inode_buf ib;
		errcode_t code;

		if (w->link_count[id] < 2)
			continue;
		if (w->link_count[id] > EXT2_LINK_MAX)
			return ib_error_set("an inode has %u hard links, more than ext4's %d",
					    w->link_count[id], EXT2_LINK_MAX);
		code = ext2fs_read_inode_full(w->fs, w->link_ino[id], (struct ext2_inode *)&ib,
					      INODE_SIZE);
		if (!code) {
			ib.in.i_links_count = (__u16)w->link_count[id];
			code = ext2fs_write_inode_full(w->fs, w->link_ino[id], (struct ext2_inode *)&ib,
						       INODE_SIZE);
		}
		if (code)
			return ib_ext2fs_error(code, "cannot update the link count of inode %u", w->link_ino[id]);
	}
	return 0;
}

/* What mke2fs does before any file goes in: reserved inodes, journal. */
static int prepare_fs(struct writer *w, const ib_export_opts *opts)
{
	ext2_filsys fs = w->fs;
	struct ext2fs_journal_params jp;
	union inode_buf zero;
	blk64_t overhead = 0;
	errcode_t code;

	set_identity(fs, opts);
	set_clock(fs, w->epoch);
	fs->super->s_max_mnt_count = (__s16)-1;
	/* Zero keeps libext2fs from adding its own count of bytes written. */
	fs->super->s_kbytes_written = 0;
	/* The file is fresh: its inode tables read as zeros already. */
	for (dgrp_t g = 0; g < fs->group_desc_count; g++)
		ext2fs_bg_flags_set(fs, g, EXT2_BG_INODE_ZEROED);

	code = ext2fs_count_used_clusters(fs, fs->super->s_first_data_block,
					  ext2fs_blocks_count(fs->super) - 1, &overhead);
	if (code)
		return ib_ext2fs_error(code, "cannot count the ext4 metadata blocks");

	/* Reserved inodes carry valid checksums, as mke2fs writes them. */
	memset(&zero, 0, sizeof(zero));
	for (ext2_ino_t ino = 1; ino < EXT2_FIRST_INO(fs->super); ino++) {
		code = ext2fs_write_inode_full(fs, ino, (struct ext2_inode *)&zero, INODE_SIZE);
		if (code)
			return ib_ext2fs_error(code, "cannot write reserved inode %u", ino);
	}
	for (ext2_ino_t ino = EXT2_ROOT_INO + 1; ino < EXT2_FIRST_INO(fs->super); ino++)
		ext2fs_inode_alloc_stats2(fs, ino, +1, 0);
	ext2fs_inode_alloc_stats2(fs, EXT2_BAD_INO, +1, 0);
	code = ext2fs_update_bb_inode(fs, NULL);
	if (code)
		return ib_ext2fs_error(code, "cannot write the bad blocks inode");

	code = ext2fs_get_journal_params(&jp, fs);
	if (!code)
		code = ext2fs_add_journal_inode3(fs, &jp, ~0ULL,
						 EXT2_MKJOURNAL_LAZYINIT | EXT2_MKJOURNAL_NO_MNT_CHECK);
	if (code)
		return ib_ext2fs_error(code, "cannot create the ext4 journal");
	overhead += (blk64_t)jp.num_journal_blocks + jp.num_fc_blocks;
	fs->super->s_overhead_clusters = (__u32)overhead;

	w->next_ino = EXT2_FIRST_INO(fs->super);
	w->cursor = fs->super->s_first_data_block;
	if (w->create_lpf)
		return create_lost_found(w);
	return 0;
}

static int check_opts(const ib_export_opts *opts)
{
	if (!opts || !opts->image_id || !ib_is_hex64(opts->image_id))
		return ib_error_set("an export needs an image id of 64 hex digits");
	if (opts->epoch < 0)
		return ib_error_set("the export epoch %lld is before 1970", (long long)opts->epoch);
	if (opts->size % BLOCK_SIZE)
		return ib_error_set("an ext4 image size must be a multiple of %d bytes", BLOCK_SIZE);
	return 0;
}

/*
 * Write the image into fd (empty), named what in messages; out_path, when
 * given, is where the finished file is renamed (fd is then tmp's).
 */
static int write_image(int fd, const char *what, const char *const *layers, size_t nlayers,
		       const ib_export_opts *opts, uint64_t *out_bytes, struct estimate *est)
{
	static const ib_layerfs_ops writer_ops = { writer_enter, writer_leave };
	struct writer w;
	uint64_t bytes = 0;
	errcode_t code;
	int err;

	memset(&w, 0, sizeof(w));
	err = choose_geometry(&w.fs, fd, est, opts->size);
	if (err)
		goto out;
	bytes = ext2fs_blocks_count(w.fs->super) * BLOCK_SIZE;
	if (ftruncate(fd, (off_t)bytes) < 0) {
		err = ib_error_set_errno(errno, "cannot size '%s'", what);
		goto out;
	}

	w.fd = fd;
	w.epoch = opts->epoch;
	w.create_lpf = !est->has_lpf && !opts->no_lost_found;
	w.buf = ib_xmalloc(COPY_BUF_SIZE);
	w.dirs = ib_xcalloc(IB_LAYERFS_DEPTH_MAX + 1, sizeof(*w.dirs));
	err = prepare_fs(&w, opts);
	if (!err)
		err = ib_layerfs_walk(layers, nlayers, &writer_ops, &w);
	if (!err)
		err = fix_link_counts(&w);
	if (err)
		goto out;
	/* Descriptors changed after the seed was set: checksum them all again. */
	for (dgrp_t g = 0; g < w.fs->group_desc_count; g++)
		ext2fs_group_desc_csum_set(w.fs, g);
	/* With a sync: a write error in libext2fs' cache shows up here, not lost at free. */
	code = ext2fs_close2(w.fs, 0);
	if (code) {
		err = ib_ext2fs_error(code, "cannot write the ext4 metadata of '%s'", what);
		goto out;
	}
	w.fs = NULL;
	if (out_bytes)
		*out_bytes = bytes;
out:
	if (w.fs)
		ext2fs_free(w.fs);
	if (w.dirs)
		for (size_t i = 0; i <= IB_LAYERFS_DEPTH_MAX; i++)
			free(w.dirs[i].v);
	free(w.dirs);
	free(w.runs);
	free(w.link_ino);
	free(w.link_count);
	free(w.buf);
	return err;
}

int ib_ext4_write_fd(int fd, const char *what, const char *const *layers, size_t nlayers,
		     const ib_export_opts *opts, uint64_t *out_bytes)
{
	static const ib_layerfs_ops estimate_ops = { estimate_enter, estimate_leave };
	struct estimate *est;
	int err;

	if (check_opts(opts))
		return IB_EINVALID;
	ib_ext2fs_init();
	if (ftruncate(fd, 0) < 0)
		return ib_error_set_errno(errno, "cannot empty '%s'", what);
	est = ib_xcalloc(1, sizeof(*est));
	err = ib_layerfs_walk(layers, nlayers, &estimate_ops, est);
	if (!err)
		err = write_image(fd, what, layers, nlayers, opts, out_bytes, est);
	free(est);
	return err;
}

int ib_ext4_write(const char *out_path, const char *const *layers, size_t nlayers,
		  const ib_export_opts *opts, uint64_t *out_bytes)
{
	static const ib_layerfs_ops estimate_ops = { estimate_enter, estimate_leave };
	struct estimate *est = NULL;
	char *tmp = NULL;
	uint64_t bytes = 0;
	int fd = -1, err;

	if (check_opts(opts))
		return IB_EINVALID;
	ib_ext2fs_init();
	est = ib_xcalloc(1, sizeof(*est));

	err = ib_layerfs_walk(layers, nlayers, &estimate_ops, est);
	if (err)
		goto out;
	err = ib_output_open(out_path, &tmp, &fd);
	if (err)
		goto out;
	err = write_image(fd, tmp, layers, nlayers, opts, &bytes, est);
	if (err)
		goto out;
	err = ib_output_commit(tmp, fd, out_path, 0644);
	if (err)
		goto out;
	free(tmp);
	tmp = NULL;
	if (out_bytes)
		*out_bytes = bytes;
out:
	if (fd >= 0)
		close(fd);
	if (tmp) {
		unlink(tmp);
		free(tmp);
	}
	free(est);
	return err;
}

#include "layer/compact.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zstd.h>

#include "lib/hash.h"
#include "lib/util.h"

#define ZSTD_LEVEL	3
#define READ_CHUNK	(4u << 20)
#define BMAP_BLOCK	4096

/* The data segments of fd (a file of size bytes): [start, end) pairs, holes left out. */
typedef int (*segment_cb)(void *arg, off_t start, off_t end);

static int for_each_data(int fd, off_t size, const char *path, segment_cb fn, void *arg)
{
	off_t pos = 0;
	int err = 0;

	while (!err && pos < size) {
		off_t data = lseek(fd, pos, SEEK_DATA), hole;

		if (data < 0 && errno == ENXIO)
			break;
		if (data < 0 && errno == EINVAL)
			return fn(arg, pos, size); /* no hole support: all data */
		if (data < 0 || (hole = lseek(fd, data, SEEK_HOLE)) < 0)
			return ib_error_set_errno(errno, "cannot find the data of '%s'", path);
		if (hole > size)
			hole = size;
		err = fn(arg, data, hole);
		pos = hole;
	}
	return err;
}

/* ---- zstd ---- */

struct zctx {
	ZSTD_CCtx *cc;
	int in, out;
	const char *in_path, *out_path;
	off_t pos;          /* bytes of the input fed so far */
	char *ibuf, *obuf;
	size_t obuf_size;
	uint64_t written;
};

static int zwrite(struct zctx *z, const void *data, size_t len)
{
	if (ib_write_all(z->out, data, len) < 0)
		return ib_error_set_errno(errno, "cannot write '%s'", z->out_path);
	z->written += len;
	return 0;
}

/* Feed len bytes (NULL: zeros) and write what comes out; end finishes the frame. */
static int zfeed(struct zctx *z, const char *data, size_t len, int end)
{
	static const char zeros[1 << 16];

	do {
		size_t chunk = len;
		const char *src = data;
		ZSTD_inBuffer in;
		size_t left;

		if (!data && chunk > sizeof(zeros))
			chunk = sizeof(zeros);
		if (!data)
			src = zeros;
		in = (ZSTD_inBuffer){ src, chunk, 0 };
		do {
			ZSTD_outBuffer out = { z->obuf, z->obuf_size, 0 };
			int last = end && chunk == len;

			left = ZSTD_compressStream2(z->cc, &out, &in, last ? ZSTD_e_end : ZSTD_e_continue);
			if (ZSTD_isError(left))
				return ib_error_set("cannot compress '%s': %s", z->in_path, ZSTD_getErrorName(left));
			if (out.pos && zwrite(z, z->obuf, out.pos) < 0)
				return IB_ERROR;
			if (!last && in.pos == in.size)
				break;
		} while (left || in.pos < in.size);
		len -= chunk;
		if (data)
			data += chunk;
	} while (len);
	return 0;
}

static int zsegment(void *arg, off_t start, off_t end)
{
	struct zctx *z = arg;
	int err;

	/* the hole before it: zeros, never read */
	if (start > z->pos && (err = zfeed(z, NULL, (size_t)(start - z->pos), 0)) < 0)
		return err;
	for (off_t off = start; off < end;) {
		size_t want = end - off < READ_CHUNK ? (size_t)(end - off) : READ_CHUNK;
		ssize_t n = pread(z->in, z->ibuf, want, off);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return ib_error_set_errno(n < 0 ? errno : EIO, "cannot read '%s'", z->in_path);
		if ((err = zfeed(z, z->ibuf, (size_t)n, 0)) < 0)
			return err;
		off += n;
	}
	z->pos = end;
	return 0;
}

int ib_zstd_write(const char *in_path, const char *out_path, unsigned threads, uint64_t *out_bytes)
{
	struct zctx z = { .in = -1, .out = -1, .in_path = in_path, .out_path = out_path };
	char *tmp = NULL;
	struct stat st;
	long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
	int err = 0;

	if (!threads)
		threads = ncpu > 0 ? (unsigned)ncpu : 1;
	z.in = open(in_path, O_RDONLY | O_CLOEXEC);
	if (z.in < 0 || fstat(z.in, &st) < 0) {
		err = ib_error_set_errno(errno, "cannot open '%s'", in_path);
		goto out;
	}
	if ((err = ib_output_open(out_path, &tmp, &z.out)) < 0)
		goto out;
	z.cc = ZSTD_createCCtx();
	z.obuf_size = ZSTD_CStreamOutSize();
	z.obuf = ib_xmalloc(z.obuf_size);
	z.ibuf = ib_xmalloc(READ_CHUNK);
	if (!z.cc || ZSTD_isError(ZSTD_CCtx_setParameter(z.cc, ZSTD_c_compressionLevel, ZSTD_LEVEL)) ||
	    ZSTD_isError(ZSTD_CCtx_setParameter(z.cc, ZSTD_c_checksumFlag, 1)) ||
	    ZSTD_isError(ZSTD_CCtx_setPledgedSrcSize(z.cc, (unsigned long long)st.st_size))) {
		err = ib_error_set("cannot set up zstd for '%s'", in_path);
		goto out;
	}
	/* libzstd built without threads says so here: one thread then, the same bytes */
	ZSTD_CCtx_setParameter(z.cc, ZSTD_c_nbWorkers, (int)threads);
	if ((err = for_each_data(z.in, st.st_size, in_path, zsegment, &z)) < 0)
		goto out;
	if ((err = zfeed(&z, NULL, (size_t)(st.st_size - z.pos), 1)) < 0)
		goto out;
	if ((err = ib_output_commit(tmp, z.out, out_path, 0644)) < 0)
		goto out;
	free(tmp);
	tmp = NULL;
	if (out_bytes)
		*out_bytes = z.written;
out:
	ZSTD_freeCCtx(z.cc);
	if (z.in >= 0)
		close(z.in);
	if (z.out >= 0)
		close(z.out);
	if (tmp) {
		unlink(tmp);
		free(tmp);
	}
	free(z.ibuf);
	free(z.obuf);
	return err;
}

/* ---- bmap ---- */

struct bctx {
	int in;
	const char *in_path;
	ib_buf ranges;
	uint64_t mapped;
	char *buf;
	long long last_end; /* the block after the last range written, -1: none yet */
	long long run_first, run_last; /* the range being gathered, -1: none */
	ib_sha256 *h;
};

static void flush_range(struct bctx *b)
{
	char hex[IB_SHA256_HEX];

	if (b->run_first < 0)
		return;
	ib_sha256_final_hex(b->h, hex);
	b->h = NULL;
	if (b->run_first == b->run_last)
		ib_buf_printf(&b->ranges, "        <Range chksum=\"%s\"> %lld </Range>\n", hex, b->run_first);
	else
		ib_buf_printf(&b->ranges, "        <Range chksum=\"%s\"> %lld-%lld </Range>\n", hex, b->run_first,
			      b->run_last);
	b->mapped += (uint64_t)(b->run_last - b->run_first + 1);
	b->run_first = b->run_last = -1;
}

static int bsegment(void *arg, off_t start, off_t end)
{
	struct bctx *b = arg;
	long long first = start / BMAP_BLOCK, last = (end + BMAP_BLOCK - 1) / BMAP_BLOCK - 1;
	off_t from = (off_t)first * BMAP_BLOCK, to = end;

	/* a segment that begins in the block the last one ended in continues that range */
	if (b->run_first >= 0 && first <= b->run_last + 1) {
		if (first <= b->run_last)
			from = (off_t)(b->run_last + 1) * BMAP_BLOCK;
	} else {
		flush_range(b);
		b->run_first = first;
		b->h = ib_sha256_new();
	}
	/* whole blocks: the tail of the last block up to the next boundary, as it reads (zeros) */
	to = (off_t)(last + 1) * BMAP_BLOCK;
	for (off_t off = from; off < to;) {
		size_t want = to - off < READ_CHUNK ? (size_t)(to - off) : READ_CHUNK;
		ssize_t n = pread(b->in, b->buf, want, off);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return ib_error_set_errno(errno, "cannot read '%s'", b->in_path);
		if ((size_t)n < want)
			memset(b->buf + n, 0, want - (size_t)n); /* past the end of the file */
		ib_sha256_update(b->h, b->buf, want);
		off += (off_t)want;
	}
	if (last > b->run_last)
		b->run_last = last;
	return 0;
}

int ib_bmap_write(const char *in_path, const char *out_path, uint64_t *out_bytes)
{
	static const char zeros64[] = "0000000000000000000000000000000000000000000000000000000000000000";
	struct bctx b = { .in = -1, .in_path = in_path, .ranges = IB_BUF_INIT, .run_first = -1, .run_last = -1 };
	ib_buf doc = IB_BUF_INIT;
	char *tmp = NULL, hex[IB_SHA256_HEX], *sum;
	unsigned long long blocks;
	struct stat st;
	int err = 0, out = -1;

	b.in = open(in_path, O_RDONLY | O_CLOEXEC);
	if (b.in < 0 || fstat(b.in, &st) < 0) {
		err = ib_error_set_errno(errno, "cannot open '%s'", in_path);
		goto done;
	}
	b.buf = ib_xmalloc(READ_CHUNK);
	if ((err = for_each_data(b.in, st.st_size, in_path, bsegment, &b)) < 0)
		goto done;
	flush_range(&b);
	blocks = ((unsigned long long)st.st_size + BMAP_BLOCK - 1) / BMAP_BLOCK;
	ib_buf_printf(&doc,
		      "<?xml version=\"1.0\" ?>\n"
		      "<!-- The block map of an image file: the blocks that hold data, which are\n"
		      "     all that has to be written to a device or file to copy the image\n"
		      "     (bmaptool copy, given this file as the bmap).  Made by imagebuilder. -->\n"
		      "<bmap version=\"2.0\">\n"
		      "    <!-- Image size in bytes: %.1f MiB -->\n"
		      "    <ImageSize> %llu </ImageSize>\n"
		      "    <!-- Size of a block in bytes -->\n"
		      "    <BlockSize> %d </BlockSize>\n"
		      "    <!-- Count of blocks in the image file -->\n"
		      "    <BlocksCount> %llu </BlocksCount>\n"
		      "    <!-- Count of mapped blocks: %.1f MiB or %.1f%% -->\n"
		      "    <MappedBlocksCount> %llu </MappedBlocksCount>\n"
		      "    <!-- Type of checksum used in this file -->\n"
		      "    <ChecksumType> sha256 </ChecksumType>\n"
		      "    <!-- The checksum of this file, taken with this value all zeros -->\n"
		      "    <BmapFileChecksum> %s </BmapFileChecksum>\n"
		      "    <!-- The mapped blocks: ranges, each with the checksum of its bytes -->\n"
		      "    <BlockMap>\n%s    </BlockMap>\n"
		      "</bmap>\n",
		      (double)st.st_size / (1 << 20), (unsigned long long)st.st_size, BMAP_BLOCK, blocks,
		      (double)b.mapped * BMAP_BLOCK / (1 << 20), blocks ? 100.0 * (double)b.mapped / (double)blocks : 0.0,
		      (unsigned long long)b.mapped, zeros64, b.ranges.ptr ? b.ranges.ptr : "");
	/* the file's checksum, over the file with the checksum's place all zeros */
	ib_sha256_hex(hex, doc.ptr, doc.len);
	sum = strstr(doc.ptr, zeros64);
	memcpy(sum, hex, 64);
	if ((err = ib_output_open(out_path, &tmp, &out)) < 0)
		goto done;
	if (ib_write_all(out, doc.ptr, doc.len) < 0) {
		err = ib_error_set_errno(errno, "cannot write '%s'", tmp);
		goto done;
	}
	if ((err = ib_output_commit(tmp, out, out_path, 0644)) < 0)
		goto done;
	free(tmp);
	tmp = NULL;
	if (out_bytes)
		*out_bytes = doc.len;
done:
	ib_sha256_free(b.h);
	if (b.in >= 0)
		close(b.in);
	if (out >= 0)
		close(out);
	if (tmp) {
		unlink(tmp);
		free(tmp);
	}
	free(b.buf);
	ib_buf_free(&b.ranges);
	ib_buf_free(&doc);
	return err;
}

/* Write len bytes at *pos of fd, holes for whole zero blocks. */
static int write_sparse(int fd, const char *path, const char *data, size_t len, off_t *pos)
{
	static const char zeros[IB_DATA_BLOCK];

	while (len) {
		size_t n = len < IB_DATA_BLOCK ? len : IB_DATA_BLOCK;

		if (n == IB_DATA_BLOCK && !memcmp(data, zeros, n)) {
			/* a hole: nothing written */
		} else if (pwrite(fd, data, n, *pos) != (ssize_t)n) {
			return ib_error_set_errno(errno, "cannot write '%s'", path);
		}
		*pos += (off_t)n;
		data += n;
		len -= n;
	}
	return 0;
}

struct ib_unzstd {
	ZSTD_DCtx *dc;
	char *path, *obuf;
	size_t osize, fill, r; /* r: what the frame still wants (0: it ended) */
	int fd;
	off_t pos;
	uint64_t max;
};

int ib_unzstd_open(ib_unzstd **out, const char *out_path, uint64_t max)
{
	ib_unzstd *u;
	int fd = open(out_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);

	*out = NULL;
	if (fd < 0)
		return ib_error_set_errno(errno, "cannot create '%s'", out_path);
	u = ib_xcalloc(1, sizeof(*u));
	u->dc = ZSTD_createDCtx();
	u->path = ib_xstrdup(out_path);
	u->osize = 1 << 20;
	u->obuf = ib_xmalloc(u->osize);
	u->r = 1;
	u->fd = fd;
	u->max = max;
	if (!u->dc) {
		ib_unzstd_close(u, false);
		return ib_error_set("cannot make a zstd decoder");
	}
	*out = u;
	return 0;
}

int ib_unzstd_write(ib_unzstd *u, const void *data, size_t len)
{
	ZSTD_inBuffer ib = { data, len, 0 };
	int err;

	/* until the input is taken and the decoder holds nothing back (it filled the output: maybe more) */
	for (bool full = true; ib.pos < ib.size || full;) {
		ZSTD_outBuffer ob = { u->obuf + u->fill, u->osize - u->fill, 0 };
		size_t whole;

		u->r = ZSTD_decompressStream(u->dc, &ob, &ib);
		if (ZSTD_isError(u->r))
			return ib_error_set("'%s': corrupt zstd data: %s", u->path, ZSTD_getErrorName(u->r));
		full = ob.pos == ob.size;
		u->fill += ob.pos;
		if ((uint64_t)u->pos + u->fill > u->max)
			return ib_error_set("'%s' would hold more than %llu bytes", u->path, (unsigned long long)u->max);
		/* whole blocks out; a partial one waits for the rest */
		whole = u->fill / IB_DATA_BLOCK * IB_DATA_BLOCK;
		if (whole && (err = write_sparse(u->fd, u->path, u->obuf, whole, &u->pos)) < 0)
			return err;
		memmove(u->obuf, u->obuf + whole, u->fill - whole);
		u->fill -= whole;
	}
	return 0;
}

int ib_unzstd_close(ib_unzstd *u, bool finish)
{
	int err = 0;

	if (!u)
		return 0;
	if (finish) {
		if (u->r != 0)
			err = ib_error_set("'%s': the zstd stream ends inside a frame", u->path);
		else if (u->fill && (err = write_sparse(u->fd, u->path, u->obuf, u->fill, &u->pos)) < 0)
			;
		else if (ftruncate(u->fd, u->pos) < 0 || fsync(u->fd) < 0)
			err = ib_error_set_errno(errno, "cannot finish '%s'", u->path);
	}
	close(u->fd);
	ZSTD_freeDCtx(u->dc);
	free(u->obuf);
	free(u->path);
	free(u);
	return err;
}


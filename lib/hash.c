#include "lib/hash.h"

#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "lib/util.h"

struct ib_sha256 {
	EVP_MD_CTX *ctx;
};

ib_sha256 *ib_sha256_new(void)
{
	ib_sha256 *h = ib_xmalloc(sizeof(*h));

	h->ctx = EVP_MD_CTX_new();
	if (!h->ctx || EVP_DigestInit_ex(h->ctx, EVP_sha256(), NULL) != 1)
		abort();
	return h;
}

void ib_sha256_update(ib_sha256 *h, const void *data, size_t len)
{
	if (EVP_DigestUpdate(h->ctx, data, len) != 1)
		abort();
}

void ib_sha256_field(ib_sha256 *h, const char *s)
{
	ib_sha256_update(h, s, strlen(s) + 1);
}

void ib_sha256_final_hex(ib_sha256 *h, char *hex)
{
	unsigned char md[EVP_MAX_MD_SIZE];
	unsigned int len = 0;

	if (EVP_DigestFinal_ex(h->ctx, md, &len) != 1 || len != IB_SHA256_LEN)
		abort();
	ib_hex(hex, md, len);
	ib_sha256_free(h);
}

void ib_sha256_free(ib_sha256 *h)
{
	if (!h)
		return;
	EVP_MD_CTX_free(h->ctx);
	free(h);
}

void ib_sha256_hex(char *hex, const void *data, size_t len)
{
	ib_sha256 *h = ib_sha256_new();

	ib_sha256_update(h, data, len);
	ib_sha256_final_hex(h, hex);
}

/*
 * One pass over a file for both digests: holes are fed to the full digest
 * as zeros from memory, never read; the data digest takes only blocks that
 * are not all zeros, with their offsets.
 */
static const char zero_block[IB_DATA_BLOCK];

static int hash_range(int fd, const char *path, off_t start, off_t end, ib_sha256 *full, ib_sha256 *data, char *buf,
		      size_t bufsz)
{
	for (off_t off = start; off < end;) {
		size_t want = end - off < (off_t)bufsz ? (size_t)(end - off) : bufsz;
		ssize_t n = pread(fd, buf, want, off);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return ib_error_set_errno(n < 0 ? errno : EIO, "cannot read '%s'", path);
		if (full)
			ib_sha256_update(full, buf, (size_t)n);
		if (data) {
			for (ssize_t b = 0; b < n; b += IB_DATA_BLOCK) {
				size_t len = (size_t)(n - b) < IB_DATA_BLOCK ? (size_t)(n - b) : IB_DATA_BLOCK;
				uint64_t at = (uint64_t)(off + b);

				if (!memcmp(buf + b, zero_block, len))
					continue;
				ib_sha256_update(data, &at, sizeof(at));
				ib_sha256_update(data, buf + b, len);
			}
		}
		off += n;
	}
	return 0;
}

static void hash_zeros(ib_sha256 *full, uint64_t len)
{
	while (full && len) {
		size_t n = len < sizeof(zero_block) ? (size_t)len : sizeof(zero_block);
		ib_sha256_update(full, zero_block, n);
		len -= n;
	}
}

int ib_sha256_file_data(char *hex, char *data_hex, const char *path)
{
	static const size_t bufsz = 1 << 20;
	ib_sha256 *full = NULL, *data = NULL;
	struct stat st;
	char *buf = NULL;
	off_t pos = 0;
	int fd, err = 0;

	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0 || fstat(fd, &st) < 0) {
		err = ib_error_set_errno(errno, "cannot open '%s'", path);
		goto out;
	}
	buf = ib_xmalloc(bufsz);
	if (hex)
		full = ib_sha256_new();
	if (data_hex) {
		uint64_t size = (uint64_t)st.st_size;
		data = ib_sha256_new();
		ib_sha256_field(data, "imagebuilder/data/v1");
		ib_sha256_update(data, &size, sizeof(size));
	}
	while (!err && pos < st.st_size) {
		off_t dstart = lseek(fd, pos, SEEK_DATA), hole;

		if (dstart < 0 && errno == ENXIO)
			break;
		if (dstart < 0 && errno == EINVAL) {
			err = hash_range(fd, path, pos, st.st_size, full, data, buf, bufsz);
			pos = st.st_size;
			break;
		}
		if (dstart < 0 || (hole = lseek(fd, dstart, SEEK_HOLE)) < 0) {
			err = ib_error_set_errno(errno, "cannot find the data of '%s'", path);
			break;
		}
		if (hole > st.st_size)
			hole = st.st_size;
		hash_zeros(full, (uint64_t)(dstart - pos));
		err = hash_range(fd, path, dstart, hole, full, data, buf, bufsz);
		pos = hole;
	}
	if (!err) {
		hash_zeros(full, (uint64_t)(st.st_size - pos));
		if (full)
			ib_sha256_final_hex(full, hex);
		full = NULL;
		if (data) {
			ib_sha256_final_hex(data, data_hex);
			data = NULL;
		}
	}
out:
	ib_sha256_free(full);
	ib_sha256_free(data);
	free(buf);
	if (fd >= 0)
		close(fd);
	return err;
}

int ib_sha256_file(char *hex, const char *path)
{
	return ib_sha256_file_data(hex, NULL, path);
}

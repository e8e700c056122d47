#include "lib/hash.h"

#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <stdlib.h>
#include <string.h>
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

int ib_sha256_file(char *hex, const char *path)
{
	static const size_t bufsz = 1 << 20;
	ib_sha256 *h;
	char *buf;
	ssize_t n;
	int fd;

	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return ib_error_set_errno(errno, "cannot open '%s'", path);
	buf = ib_xmalloc(bufsz);
	h = ib_sha256_new();
	while ((n = read(fd, buf, bufsz)) != 0) {
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			int e = errno;
			ib_sha256_free(h);
			free(buf);
			close(fd);
			return ib_error_set_errno(e, "cannot read '%s'", path);
		}
		ib_sha256_update(h, buf, (size_t)n);
	}
	ib_sha256_final_hex(h, hex);
	free(buf);
	close(fd);
	return 0;
}

#ifndef IB_HASH_H
#define IB_HASH_H

#include <stddef.h>

/* SHA-256 through OpenSSL's EVP interface. */

#define IB_SHA256_LEN 32
#define IB_SHA256_HEX 65 /* 64 hex digits and NUL */

typedef struct ib_sha256 ib_sha256;

ib_sha256 *ib_sha256_new(void);
void ib_sha256_update(ib_sha256 *h, const void *data, size_t len);
/* Feed a string together with its terminating NUL, so fields cannot run together. */
void ib_sha256_field(ib_sha256 *h, const char *s);
/* Finish into hex (65 bytes) and free the context. */
void ib_sha256_final_hex(ib_sha256 *h, char *hex);
void ib_sha256_free(ib_sha256 *h);

/* One-shot. */
void ib_sha256_hex(char *hex, const void *data, size_t len);

/* Hash a whole file by path (holes are not read: they hash as zeros). */
int ib_sha256_file(char *hex, const char *path);

/*
 * The file's SHA-256 (hex, may be NULL) and, in the same pass, its data
 * digest (data_hex, may be NULL): SHA-256 over "imagebuilder/data/v1", the size,
 * and each 4 KiB block that is not all zeros with its offset.  The data
 * digest reads only the file's data, so it checks a 4 GiB sparse image in
 * the time its content takes; it does not depend on which zeros are holes.
 */
#define IB_DATA_BLOCK 4096
int ib_sha256_file_data(char *hex, char *data_hex, const char *path);

#endif

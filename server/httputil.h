#ifndef IB_SERVER_HTTP_H
#define IB_SERVER_HTTP_H

/*
 * The protocol pieces of the BuildImage service that do not need a socket:
 * Connect error codes, byte ranges, entity tags, bearer tokens, listen
 * addresses, timestamps.  Kept apart from server.c so the unit tests can
 * reach them.
 */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "lib/hash.h"

/* Connect error codes (https://connectrpc.com/docs/protocol#error-codes). */
typedef enum ib_connect_code {
	IB_CONNECT_CANCELED,
	IB_CONNECT_UNKNOWN,
	IB_CONNECT_INVALID_ARGUMENT,
	IB_CONNECT_DEADLINE_EXCEEDED,
	IB_CONNECT_NOT_FOUND,
	IB_CONNECT_ALREADY_EXISTS,
	IB_CONNECT_PERMISSION_DENIED,
	IB_CONNECT_RESOURCE_EXHAUSTED,
	IB_CONNECT_FAILED_PRECONDITION,
	IB_CONNECT_ABORTED,
	IB_CONNECT_OUT_OF_RANGE,
	IB_CONNECT_UNIMPLEMENTED,
	IB_CONNECT_INTERNAL,
	IB_CONNECT_UNAVAILABLE,
	IB_CONNECT_DATA_LOSS,
	IB_CONNECT_UNAUTHENTICATED,
} ib_connect_code;

/* "invalid_argument", ... */
const char *ib_connect_code_name(ib_connect_code code);

/* The HTTP status Connect maps a code to: invalid_argument 400, ... */
unsigned ib_connect_http_status(ib_connect_code code);

/*
 * The error body {"code": "...", "message": "..."}; the string is the
 * caller's to free().
 */
char *ib_connect_error_body(ib_connect_code code, const char *message);

/*
 * A Range header against a representation of size bytes (RFC 9110,
 * section 14).  Only a single range is served; anything else is answered
 * with the whole representation, as the RFC allows.
 */
typedef enum ib_range_result {
	IB_RANGE_NONE,          /* absent, malformed or several ranges: send it all */
	IB_RANGE_OK,            /* send [*out_start, *out_start + *out_len) with 206 */
	IB_RANGE_UNSATISFIABLE, /* 416 with Content-Range: bytes * / size */
} ib_range_result;

ib_range_result ib_http_parse_range(const char *header, uint64_t size, uint64_t *out_start, uint64_t *out_len);

/*
 * Does an If-None-Match or If-Range style list of entity tags match etag
 * (given with its quotes)?  "*" matches everything; weak tags W/"x" match
 * by their opaque part (weak comparison, what If-None-Match uses).
 */
bool ib_http_etag_match(const char *header, const char *etag);

/* SHA-256 of len bytes (the digest, not hex). */
void ib_http_sha256(unsigned char out[IB_SHA256_LEN], const void *data, size_t len);

/*
 * Bearer tokens.  The expected token is kept only as its SHA-256 digest;
 * the offered one is hashed and the digests compared in constant time, so
 * neither the content nor the length of the token leaks through timing.
 */
typedef struct ib_http_token {
	unsigned char digest[IB_SHA256_LEN];
} ib_http_token;

void ib_http_token_init(ib_http_token *t, const char *token, size_t len);

/* Does an Authorization header value carry "Bearer <token>"? */
bool ib_http_bearer_ok(const ib_http_token *t, const char *authorization);

/*
 * Parse "HOST:PORT", "[V6]:PORT" or ":PORT" (loopback) into a socket
 * address; HOST must be a numeric address or "localhost".  Port 0 asks the
 * kernel for a free one.
 */
int ib_http_parse_listen(struct sockaddr_storage *out, socklen_t *out_len, const char *spec);

/* Is s[0..n) valid UTF-8 (no overlong forms, no surrogates)? */
bool ib_http_utf8_valid(const char *s, size_t n);

/*
 * The first max bytes of s (NULL: "") as valid UTF-8, for JSON strings:
 * each byte that starts no valid sequence becomes U+FFFD.  Step output is
 * arbitrary bytes, and a log tail may cut a character in two.  The caller
 * frees the result.
 */
char *ib_http_utf8_clean(const char *s, size_t max);

/* "2024-05-01T12:00:00.123Z" for a CLOCK_REALTIME value; buf of 32 bytes. */
void ib_http_time(char buf[32], double unix_seconds);

/* Wall clock in seconds. */
double ib_http_wallclock(void);

/*
 * gzip (RFC 1952) of len bytes of data, for a Content-Encoding: gzip
 * answer: *out (allocated), *out_len; <0 when zlib fails.
 */
int ib_http_gzip(const void *data, size_t len, char **out, size_t *out_len);

/*
 * The content of a gzip body, at most max bytes of it: 0 and *out
 * (allocated); 1 when it is larger than max (a bomb stops there);
 * IB_EINVALID (error set) when it is not gzip.
 */
int ib_http_gunzip(const void *data, size_t len, size_t max, char **out, size_t *out_len);

/* Does an Accept-Encoding header value accept gzip (q > 0)? */
bool ib_http_accepts_gzip(const char *accept_encoding);

#endif

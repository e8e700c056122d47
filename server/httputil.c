#include "server/httputil.h"

#include <arpa/inet.h>
#include <ctype.h>
#include <jansson.h>
#include <netinet/in.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <zlib.h>
#include <time.h>

#include "lib/util.h"

static const struct {
	const char *name;
	unsigned status;
} connect_codes[] = {
	[IB_CONNECT_CANCELED] = { "canceled", 499 },
	[IB_CONNECT_UNKNOWN] = { "unknown", 500 },
	[IB_CONNECT_INVALID_ARGUMENT] = { "invalid_argument", 400 },
	[IB_CONNECT_DEADLINE_EXCEEDED] = { "deadline_exceeded", 504 },
	[IB_CONNECT_NOT_FOUND] = { "not_found", 404 },
	[IB_CONNECT_ALREADY_EXISTS] = { "already_exists", 409 },
	[IB_CONNECT_PERMISSION_DENIED] = { "permission_denied", 403 },
	[IB_CONNECT_RESOURCE_EXHAUSTED] = { "resource_exhausted", 429 },
	[IB_CONNECT_FAILED_PRECONDITION] = { "failed_precondition", 400 },
	[IB_CONNECT_ABORTED] = { "aborted", 409 },
	[IB_CONNECT_OUT_OF_RANGE] = { "out_of_range", 400 },
	[IB_CONNECT_UNIMPLEMENTED] = { "unimplemented", 501 },
	[IB_CONNECT_INTERNAL] = { "internal", 500 },
	[IB_CONNECT_UNAVAILABLE] = { "unavailable", 503 },
	[IB_CONNECT_DATA_LOSS] = { "data_loss", 500 },
	[IB_CONNECT_UNAUTHENTICATED] = { "unauthenticated", 401 },
};

#define NCODES (sizeof(connect_codes) / sizeof(connect_codes[0]))

const char *ib_connect_code_name(ib_connect_code code)
{
	return (size_t)code < NCODES ? connect_codes[code].name : "unknown";
}

unsigned ib_connect_http_status(ib_connect_code code)
{
	return (size_t)code < NCODES ? connect_codes[code].status : 500;
}

char *ib_connect_error_body(ib_connect_code code, const char *message)
{
	char *clean = ib_http_utf8_clean(message, SIZE_MAX), *s;
	json_t *doc = json_pack("{s:s, s:s}", "code", ib_connect_code_name(code), "message", clean);

	s = doc ? json_dumps(doc, JSON_COMPACT) : NULL;
	json_decref(doc);
	free(clean);
	if (!s)
		abort();
	return s;
}

/* Length of the valid UTF-8 sequence at s[0..n) (no overlongs, no surrogates), 0 if none. */
static size_t utf8_seq(const unsigned char *s, size_t n)
{
	unsigned c = s[0], need, min, cp;

	if (c < 0x80)
		return 1;
	if ((c & 0xe0) == 0xc0)
		need = 1, min = 0x80, cp = c & 0x1f;
	else if ((c & 0xf0) == 0xe0)
		need = 2, min = 0x800, cp = c & 0x0f;
	else if ((c & 0xf8) == 0xf0)
		need = 3, min = 0x10000, cp = c & 0x07;
	else
		return 0;
	for (unsigned k = 1; k <= need; k++) {
		if (k >= n || (s[k] & 0xc0) != 0x80)
			return 0;
		cp = cp << 6 | (s[k] & 0x3f);
	}
	if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
		return 0;
	return need + 1;
}

bool ib_http_utf8_valid(const char *s, size_t n)
{
	for (size_t i = 0, k; i < n; i += k)
		if (!(k = utf8_seq((const unsigned char *)s + i, n - i)))
			return false;
	return true;
}

char *ib_http_utf8_clean(const char *s, size_t max)
{
	size_t n = s ? strnlen(s, max) : 0;
	ib_buf b = IB_BUF_INIT;

	ib_buf_grow(&b, n);
	for (size_t i = 0, k; i < n; i += k) {
		if ((k = utf8_seq((const unsigned char *)s + i, n - i))) {
			ib_buf_add(&b, s + i, k);
		} else {
			ib_buf_add(&b, "\xef\xbf\xbd", 3);
			k = 1;
		}
	}
	ib_buf_add(&b, "", 0); /* terminated even when empty */
	return ib_buf_detach(&b);
}

static const char *skip_ows(const char *p)
{
	while (*p == ' ' || *p == '\t')
		p++;
	return p;
}

/* Digits into *out; NULL on overflow or when there are none. */
static const char *parse_digits(const char *p, uint64_t *out)
{
	uint64_t v = 0;
	const char *start = p;

	while (*p >= '0' && *p <= '9') {
		unsigned d = (unsigned)(*p - '0');
		if (v > (UINT64_MAX - d) / 10)
			return NULL;
		v = v * 10 + d;
		p++;
	}
	if (p == start)
		return NULL;
	*out = v;
	return p;
}

ib_range_result ib_http_parse_range(const char *header, uint64_t size, uint64_t *out_start, uint64_t *out_len)
{
	uint64_t first = 0, last = 0, suffix = 0;
	const char *p;

	if (!header)
		return IB_RANGE_NONE;
	p = skip_ows(header);
	if (strncasecmp(p, "bytes", 5))
		return IB_RANGE_NONE;
	p = skip_ows(p + 5);
	if (*p++ != '=')
		return IB_RANGE_NONE;
	p = skip_ows(p);
	if (strchr(p, ','))
		return IB_RANGE_NONE;
	if (*p == '-') {
		/* suffix-range: the last N bytes */
		if (!(p = parse_digits(p + 1, &suffix)) || *skip_ows(p))
			return IB_RANGE_NONE;
		if (suffix == 0 || size == 0)
			return IB_RANGE_UNSATISFIABLE;
		if (suffix > size)
			suffix = size;
		*out_start = size - suffix;
		*out_len = suffix;
		return IB_RANGE_OK;
	}
	if (!(p = parse_digits(p, &first)) || *p++ != '-')
		return IB_RANGE_NONE;
	if (*skip_ows(p)) {
		if (!(p = parse_digits(p, &last)) || *skip_ows(p) || last < first)
			return IB_RANGE_NONE;
	} else {
		last = UINT64_MAX;
	}
	if (first >= size)
		return IB_RANGE_UNSATISFIABLE;
	if (last >= size)
		last = size - 1;
	*out_start = first;
	*out_len = last - first + 1;
	return IB_RANGE_OK;
}

bool ib_http_etag_match(const char *header, const char *etag)
{
	size_t elen;
	const char *p;

	if (!header || !etag)
		return false;
	if (!strncmp(etag, "W/", 2))
		etag += 2;
	elen = strlen(etag);
	for (p = header; *p;) {
		const char *tag, *end;

		p = skip_ows(p);
		if (*p == '*')
			return true;
		if (!strncmp(p, "W/", 2))
			p += 2;
		tag = p;
		if (*p != '"')
			return false;
		end = strchr(p + 1, '"');
		if (!end)
			return false;
		if ((size_t)(end + 1 - tag) == elen && !memcmp(tag, etag, elen))
			return true;
		p = skip_ows(end + 1);
		if (*p == ',')
			p++;
		else if (*p)
			return false;
	}
	return false;
}

/* Fetched once: EVP_sha256() looks the algorithm up again on every use. */
static EVP_MD *sha256_md;
static pthread_once_t sha256_once = PTHREAD_ONCE_INIT;

static void fetch_sha256(void)
{
	sha256_md = EVP_MD_fetch(NULL, "SHA256", NULL);
}

void ib_http_sha256(unsigned char out[IB_SHA256_LEN], const void *data, size_t len)
{
	pthread_once(&sha256_once, fetch_sha256);
	if (!sha256_md || !EVP_Digest(data, len, out, NULL, sha256_md, NULL))
		abort(); /* only on allocation failure, as everywhere else */
}

void ib_http_token_init(ib_http_token *t, const char *token, size_t len)
{
	ib_http_sha256(t->digest, token, len);
}

bool ib_http_bearer_ok(const ib_http_token *t, const char *authorization)
{
	ib_http_token offered;
	const char *p;

	if (!authorization)
		return false;
	p = skip_ows(authorization);
	if (strncasecmp(p, "Bearer", 6) || (p[6] != ' ' && p[6] != '\t'))
		return false;
	p = skip_ows(p + 6);
	ib_http_token_init(&offered, p, strlen(p));
	return CRYPTO_memcmp(offered.digest, t->digest, sizeof(t->digest)) == 0;
}

int ib_http_parse_listen(struct sockaddr_storage *out, socklen_t *out_len, const char *spec)
{
	char host[128];
	const char *colon, *port_s;
	uint64_t port;
	size_t hlen;

	memset(out, 0, sizeof(*out));
	if (spec[0] == '[') {
		const char *close = strchr(spec, ']');
		if (!close || close[1] != ':')
			goto bad;
		hlen = (size_t)(close - spec - 1);
		if (hlen >= sizeof(host))
			goto bad;
		memcpy(host, spec + 1, hlen);
		host[hlen] = '\0';
		port_s = close + 2;
	} else if ((colon = strrchr(spec, ':'))) {
		hlen = (size_t)(colon - spec);
		if (hlen >= sizeof(host) || memchr(spec, ':', hlen))
			goto bad;
		memcpy(host, spec, hlen);
		host[hlen] = '\0';
		port_s = colon + 1;
	} else {
		host[0] = '\0';
		port_s = spec;
	}
	if (!*port_s || ib_parse_u64(&port, port_s, 65535) < 0)
		goto bad;
	if (!host[0] || !strcmp(host, "localhost")) {
		struct sockaddr_in *sin = (struct sockaddr_in *)out;
		sin->sin_family = AF_INET;
		sin->sin_port = htons((uint16_t)port);
		sin->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
		*out_len = sizeof(*sin);
		return 0;
	}
	{
		struct sockaddr_in *sin = (struct sockaddr_in *)out;
		if (inet_pton(AF_INET, host, &sin->sin_addr) == 1) {
			sin->sin_family = AF_INET;
			sin->sin_port = htons((uint16_t)port);
			*out_len = sizeof(*sin);
			return 0;
		}
	}
	{
		struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)out;
		if (inet_pton(AF_INET6, host, &sin6->sin6_addr) == 1) {
			sin6->sin6_family = AF_INET6;
			sin6->sin6_port = htons((uint16_t)port);
			*out_len = sizeof(*sin6);
			return 0;
		}
	}
bad:
	return ib_error_set("'%s' is not a listen address (HOST:PORT with a numeric HOST, [V6]:PORT or :PORT)",
			    spec), IB_EINVALID;
}

void ib_http_time(char buf[32], double t)
{
	/* The date part changes once a second: format it once a second per thread. */
	static _Thread_local time_t last = (time_t)-1;
	static _Thread_local char base[24];
	time_t secs = (time_t)t;
	int ms = (int)((t - (double)secs) * 1000.0);

	if (secs != last) {
		struct tm tm;
		gmtime_r(&secs, &tm);
		strftime(base, sizeof(base), "%Y-%m-%dT%H:%M:%S", &tm);
		last = secs;
	}
	if (ms < 0)
		ms = 0;
	if (ms > 999)
		ms = 999;
	snprintf(buf, 32, "%s.%03dZ", base, ms);
}

double ib_http_wallclock(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_REALTIME, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int ib_http_gzip(const void *data, size_t len, char **out, size_t *out_len)
{
	z_stream z = { 0 };
	uLong cap;
	char *buf;

	if (deflateInit2(&z, 6, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) != Z_OK)
		return ib_error_set("gzip: cannot start");
	cap = deflateBound(&z, (uLong)len) + 32;
	buf = ib_xmalloc(cap);
	z.next_in = (Bytef *)data;
	z.avail_in = (uInt)len;
	z.next_out = (Bytef *)buf;
	z.avail_out = (uInt)cap;
	if (deflate(&z, Z_FINISH) != Z_STREAM_END) {
		deflateEnd(&z);
		free(buf);
		return ib_error_set("gzip: cannot compress");
	}
	*out_len = z.total_out;
	*out = buf;
	deflateEnd(&z);
	return 0;
}

int ib_http_gunzip(const void *data, size_t len, size_t max, char **out, size_t *out_len)
{
	z_stream z = { 0 };
	char *buf = ib_xmalloc(max + 1);
	int rc;

	if (inflateInit2(&z, 15 + 16) != Z_OK) {
		free(buf);
		return ib_error_set("gzip: cannot start"), IB_EINVALID;
	}
	z.next_in = (Bytef *)data;
	z.avail_in = (uInt)len;
	z.next_out = (Bytef *)buf;
	z.avail_out = (uInt)(max + 1);
	rc = inflate(&z, Z_FINISH);
	if (rc == Z_STREAM_END && z.total_out <= max) {
		*out_len = z.total_out;
		*out = buf;
		inflateEnd(&z);
		return 0;
	}
	inflateEnd(&z);
	free(buf);
	if (z.total_out > max || rc == Z_BUF_ERROR)
		return 1;
	return ib_error_set("the body is not gzip (%s)", z.msg ? z.msg : "truncated"), IB_EINVALID;
}

bool ib_http_accepts_gzip(const char *v)
{
	while (v && *v) {
		size_t n, name;
		const char *q;

		v += strspn(v, " \t,");
		n = strcspn(v, ",");
		name = strcspn(v, " \t;,");
		if ((name == 4 && !strncasecmp(v, "gzip", 4)) || (name == 1 && *v == '*')) {
			/* "gzip;q=0" refuses it */
			q = memchr(v, ';', n);
			while (q && q < v + n && (*q == ';' || *q == ' ' || *q == '\t'))
				q++;
			return !(q && q < v + n && (q[0] == 'q' || q[0] == 'Q') && q[1] == '=' && strtod(q + 2, NULL) <= 0);
		}
		v += n;
	}
	return false;
}

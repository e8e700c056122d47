/*
 * The OCI distribution client of --remote (remote.h).
 */
#include "cache/remote.h"

#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "lib/error.h"
#include "lib/hash.h"
#include "lib/util.h"

#define CONNECT_TIMEOUT 10L  /* seconds */
#define LOW_SPEED 1024L      /* bytes/s under which, for LOW_SPEED_TIME, a transfer is dead */
#define LOW_SPEED_TIME 30L
#define MANIFEST_MAX (4 << 20)
#define TOKEN_MAX (64 << 10)

struct ib_remote {
	char *url;       /* as given */
	char *base;      /* scheme://host[:port] */
	char *host;      /* host[:port], the key of credentials */
	char *repo;
	char *basic;     /* "user:password", or NULL */
	uint64_t chunk;  /* blobs larger than this go up in chunks of it (0: in one piece) */
	double deadline; /* ib_now() after which transfers stop (0: none) */
	volatile int *cancel;
	pthread_mutex_t mu;
	char *bearer;    /* the last token the registry gave (under mu) */
};

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;

static void curl_init(void)
{
	curl_global_init(CURL_GLOBAL_DEFAULT);
}

/* ---- credentials ---- */

static char *auth_file(void)
{
	const char *e;

	if ((e = getenv("REGISTRY_AUTH_FILE")) && *e)
		return ib_xstrdup(e);
	if ((e = getenv("DOCKER_CONFIG")) && *e)
		return ib_xasprintf("%s/config.json", e);
	if ((e = getenv("HOME")) && *e) {
		char *p = ib_xasprintf("%s/.docker/config.json", e);
		if (access(p, R_OK) == 0)
			return p;
		free(p);
	}
	if ((e = getenv("XDG_RUNTIME_DIR")) && *e)
		return ib_xasprintf("%s/containers/auth.json", e);
	return NULL;
}

/* "user:password" for host from the credentials file, or NULL. */
static char *credentials(const char *host)
{
	char *path = auth_file(), *out = NULL;
	json_t *doc = path ? json_load_file(path, 0, NULL) : NULL, *a;
	const char *b64, *user, *pass;

	free(path);
	a = json_object_get(json_object_get(doc, "auths"), host);
	if ((b64 = json_string_value(json_object_get(a, "auth")))) {
		size_t n = strlen(b64);
		unsigned char *dec = ib_xmalloc(n / 4 * 3 + 4);
		int m = EVP_DecodeBlock(dec, (const unsigned char *)b64, (int)n);
		if (m > 0) {
			while (m > 0 && dec[m - 1] == '\0')
				m--; /* EVP_DecodeBlock counts the padding */
			out = ib_xstrndup((const char *)dec, (size_t)m);
		}
		free(dec);
	} else if ((user = json_string_value(json_object_get(a, "username"))) &&
		   (pass = json_string_value(json_object_get(a, "password")))) {
		out = ib_xasprintf("%s:%s", user, pass);
	}
	json_decref(doc);
	if (out && !strchr(out, ':')) {
		free(out);
		out = NULL;
	}
	return out;
}

int ib_remote_open(ib_remote **out, const char *url)
{
	const char *p = NULL, *slash;
	ib_remote *r;

	*out = NULL;
	if (!strncmp(url, "https://", 8))
		p = url + 8;
	else if (!strncmp(url, "http://", 7))
		p = url + 7;
	if (!p || !(slash = strchr(p, '/')) || slash == p || !slash[1])
		return ib_error_set("remote '%s': expected http(s)://HOST[:PORT]/REPOSITORY", url) < 0 ? IB_EINVALID : 0;
	for (const char *c = slash + 1; *c; c++)
		if (!((*c >= 'a' && *c <= 'z') || (*c >= '0' && *c <= '9') || strchr("._-/", *c)))
			return ib_error_set("remote '%s': a repository name is lowercase letters, digits and ._-/", url) < 0
				       ? IB_EINVALID : 0;
	pthread_once(&curl_once, curl_init);
	r = ib_xcalloc(1, sizeof(*r));
	r->url = ib_xstrdup(url);
	r->base = ib_xstrndup(url, (size_t)(slash - url));
	r->host = ib_xstrndup(p, (size_t)(slash - p));
	r->repo = ib_xstrdup(slash + 1);
	while (*r->repo && r->repo[strlen(r->repo) - 1] == '/')
		r->repo[strlen(r->repo) - 1] = '\0';
	r->basic = credentials(r->host);
	r->chunk = IB_REMOTE_CHUNK_DEFAULT;
	pthread_mutex_init(&r->mu, NULL);
	*out = r;
	return 0;
}

void ib_remote_close(ib_remote *r)
{
	if (!r)
		return;
	free(r->url);
	free(r->base);
	free(r->host);
	free(r->repo);
	free(r->basic);
	free(r->bearer);
	pthread_mutex_destroy(&r->mu);
	free(r);
}

const char *ib_remote_url(const ib_remote *r)
{
	return r->url;
}

void ib_remote_set_chunk(ib_remote *r, uint64_t bytes)
{
	r->chunk = bytes;
}

void ib_remote_set_abort(ib_remote *r, double deadline, volatile int *cancel)
{
	r->deadline = deadline;
	r->cancel = cancel;
}

/* scheme://host[:port] of url, or NULL */
static char *origin(const char *url)
{
	const char *p = strstr(url, "://");
	size_t n;

	if (!p)
		return NULL;
	p += 3;
	n = strcspn(p, "/?#");
	return ib_xstrndup(url, (size_t)(p - url) + n);
}

/* The host of url, without its port (an IPv6 literal keeps its brackets), or NULL. */
static char *host_of(const char *url)
{
	const char *p = strstr(url, "://");
	size_t n;

	if (!p)
		return NULL;
	p += 3;
	n = *p == '[' ? strcspn(p, "]") + 1 : strcspn(p, ":/?#");
	return ib_xstrndup(p, n);
}

/* Is url on the registry's own scheme, host and port? */
static bool same_origin(const ib_remote *r, const char *url)
{
	char *o = origin(url);
	bool same = o && !strcasecmp(o, r->base);

	free(o);
	return same;
}

/* ---- requests ---- */

typedef struct hreq {
	CURL *curl;
	const char *method;
	char *url;
	const char *ctype, *accept;
	const void *body;     /* what a PUT sends: from memory */
	size_t body_len;
	int body_fd;          /* or from a file (-1 none): body_size bytes at body_start */
	uint64_t body_start, body_size;
	uint64_t body_off;
	char *range;          /* Content-Range of a chunk, or NULL */
	ib_buf *out;          /* the answer's body, or */
	ib_remote_sink sink;  /* to this as it comes, hashed (NULL none) */
	void *sink_arg;
	ib_sha256 *hash;
	uint64_t max, got;
	bool too_large, sink_failed, aborted;
	bool follow;          /* follow redirects (blob downloads) */
	ib_remote *r;
	long status;
	char *location, *www_auth;
	char err[CURL_ERROR_SIZE];
} hreq;

static size_t on_header(char *buf, size_t size, size_t n, void *arg)
{
	hreq *h = arg;
	size_t len = size * n, k;
	char **slot = NULL;

	if (len > 9 && !strncasecmp(buf, "Location:", 9))
		slot = &h->location, k = 9;
	else if (len > 17 && !strncasecmp(buf, "WWW-Authenticate:", 17))
		slot = &h->www_auth, k = 17;
	if (slot) {
		while (k < len && (buf[k] == ' ' || buf[k] == '\t'))
			k++;
		while (len > k && (buf[len - 1] == '\r' || buf[len - 1] == '\n' || buf[len - 1] == ' '))
			len--;
		free(*slot);
		*slot = ib_xstrndup(buf + k, len - k);
	}
	return size * n;
}

static size_t on_body(char *buf, size_t size, size_t n, void *arg)
{
	hreq *h = arg;
	size_t len = size * n;

	curl_easy_getinfo(h->curl, CURLINFO_RESPONSE_CODE, &h->status);
	if (h->status >= 300 || h->status < 200) {
		/* an error's body: the start kept for the message, and no more than 64 KiB of it taken */
		if ((h->got += len) > (64 << 10))
			return 0;
		if (h->out && h->out->len < 4096)
			ib_buf_add(h->out, buf, len);
		return len;
	}
	if (h->got + len > h->max) {
		h->too_large = true;
		return 0;
	}
	h->got += len;
	if (h->sink) {
		ib_sha256_update(h->hash, buf, len);
		if (h->sink(h->sink_arg, buf, len) < 0) {
			h->sink_failed = true;
			return 0;
		}
	} else if (h->out) {
		ib_buf_add(h->out, buf, len);
	}
	return len;
}

static size_t on_read(char *buf, size_t size, size_t n, void *arg)
{
	hreq *h = arg;
	size_t len = size * n;
	ssize_t got;

	if (h->body_fd < 0) {
		size_t left = h->body_len - (size_t)h->body_off;
		if (len > left)
			len = left;
		if (len)
			memcpy(buf, (const char *)h->body + h->body_off, len);
		h->body_off += len;
		return len;
	}
	if (len > h->body_size - h->body_off)
		len = (size_t)(h->body_size - h->body_off);
	while ((got = pread(h->body_fd, buf, len, (off_t)(h->body_start + h->body_off))) < 0 && errno == EINTR)
		;
	if (got < 0 || (got == 0 && len > 0))
		return CURL_READFUNC_ABORT; /* the file shrank under us */
	h->body_off += (uint64_t)got;
	return (size_t)got;
}

/* Transfers stop at the build's deadline or cancel. */
static int on_progress(void *arg, curl_off_t dt, curl_off_t dn, curl_off_t ut, curl_off_t un)
{
	hreq *h = arg;

	(void)dt, (void)dn, (void)ut, (void)un;
	if ((h->r->cancel && *h->r->cancel) || (h->r->deadline > 0 && ib_now() >= h->r->deadline)) {
		h->aborted = true;
		return 1;
	}
	return 0;
}

/* The value of key="value" (or key=value) in a challenge; NULL when absent. */
static char *param(const char *challenge, const char *key)
{
	size_t n = strlen(key);

	for (const char *p = challenge; (p = strcasestr(p, key)); p += n) {
		const char *v;
		size_t len;

		if (p != challenge && p[-1] != ' ' && p[-1] != ',')
			continue;
		if (p[n] != '=')
			continue;
		v = p + n + 1;
		if (*v == '"') {
			v++;
			len = strcspn(v, "\"");
		} else {
			len = strcspn(v, ", ");
		}
		return ib_xstrndup(v, len);
	}
	return NULL;
}

static int perform(ib_remote *r, hreq *h, const char *authorization);

/* Answer a bearer challenge: a token from its realm (with our credentials, if any). */
static int fetch_token(ib_remote *r, const char *challenge)
{
	char *realm = param(challenge, "realm"), *service = param(challenge, "service");
	char *scope = param(challenge, "scope"), *basic = NULL, *url;
	CURL *c = curl_easy_init();
	ib_buf body = IB_BUF_INIT;
	hreq h = { .method = "GET", .body_fd = -1, .out = &body, .max = TOKEN_MAX };
	json_t *doc = NULL;
	const char *tok;
	int err = 0;

	if (!realm || !c) {
		err = ib_error_set("%s: a bearer challenge without a realm", r->url);
		goto out;
	}
	/*
	 * The realm gets our credentials: over https, or, for a plain-http
	 * registry (loopback, a trusted network), on the registry's own host;
	 * nowhere else, and no redirects from it.
	 */
	if (strncasecmp(realm, "https://", 8)) {
		char *rh = host_of(realm), *bh = host_of(r->base);
		bool ok = !strncasecmp(realm, "http://", 7) && !strncasecmp(r->base, "http://", 7) && rh && bh &&
			  !strcasecmp(rh, bh);
		free(rh);
		free(bh);
		if (!ok) {
			err = ib_error_set("%s: the token realm '%.200s' is neither https nor on the registry's host: not "
					   "sending credentials there", r->url, realm);
			goto out;
		}
	}
	{
		char *es = service ? curl_easy_escape(c, service, 0) : NULL;
		char *sc = curl_easy_escape(c, scope ? scope : "", 0);
		char *fallback = ib_xasprintf("repository:%s:pull,push", r->repo);
		char *fs = curl_easy_escape(c, fallback, 0);
		url = ib_xasprintf("%s%sservice=%s&scope=%s", realm, strchr(realm, '?') ? "&" : "?", es ? es : "",
				   scope ? sc : fs);
		curl_free(es);
		curl_free(sc);
		curl_free(fs);
		free(fallback);
	}
	h.url = url;
	if (r->basic) {
		/* the realm takes our credentials as HTTP basic */
		size_t n = strlen(r->basic);
		char *b64 = ib_xmalloc(4 * ((n + 2) / 3) + 1);
		EVP_EncodeBlock((unsigned char *)b64, (const unsigned char *)r->basic, (int)n);
		basic = ib_xasprintf("Basic %s", b64);
		free(b64);
	}
	if ((err = perform(r, &h, basic)) < 0)
		goto out;
	if (h.status != 200) {
		err = ib_error_set("%s: the token service %s answered HTTP %ld", r->url, realm, h.status);
		goto out;
	}
	doc = json_loadb(body.ptr, body.len, 0, NULL);
	tok = json_string_value(json_object_get(doc, "token"));
	if (!tok)
		tok = json_string_value(json_object_get(doc, "access_token"));
	if (!tok || !*tok) {
		err = ib_error_set("%s: the token service gave no token", r->url);
		goto out;
	}
	for (const char *p = tok; *p; p++)
		if (*p <= ' ' || *p > '~') {
			err = ib_error_set("%s: the token service gave a token that is not printable ASCII", r->url);
			goto out;
		}
	pthread_mutex_lock(&r->mu);
	free(r->bearer);
	r->bearer = ib_xasprintf("Bearer %s", tok);
	pthread_mutex_unlock(&r->mu);
out:
	json_decref(doc);
	ib_buf_free(&body);
	free(h.url);
	free(h.location);
	free(h.www_auth);
	free(realm);
	free(service);
	free(scope);
	free(basic);
	if (c)
		curl_easy_cleanup(c);
	return err;
}

/* One HTTP exchange, with authorization as given (NULL: none). */
static int perform(ib_remote *r, hreq *h, const char *authorization)
{
	CURL *c = curl_easy_init();
	struct curl_slist *hdrs = NULL;
	char line[512];
	CURLcode rc;

	if (!c)
		return ib_error_set("curl_easy_init failed");
	h->curl = c;
	h->r = r;
	h->status = 0;
	h->got = 0;
	h->too_large = false;
	h->sink_failed = false;
	h->aborted = false;
	h->err[0] = '\0';
	free(h->location);
	free(h->www_auth);
	h->location = h->www_auth = NULL;
	if (authorization) {
		/* tokens run to kilobytes (a JWT with its certificate chain) */
		char *a = ib_xasprintf("Authorization: %s", authorization);
		hdrs = curl_slist_append(hdrs, a);
		free(a);
	}
	if (h->ctype) {
		snprintf(line, sizeof(line), "Content-Type: %s", h->ctype);
		hdrs = curl_slist_append(hdrs, line);
	}
	if (h->accept) {
		snprintf(line, sizeof(line), "Accept: %s", h->accept);
		hdrs = curl_slist_append(hdrs, line);
	}
	if (h->range) {
		snprintf(line, sizeof(line), "Content-Range: %s", h->range);
		hdrs = curl_slist_append(hdrs, line);
	}
	curl_easy_setopt(c, CURLOPT_URL, h->url);
	curl_easy_setopt(c, CURLOPT_HTTPHEADER, hdrs);
	curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, CONNECT_TIMEOUT);
	curl_easy_setopt(c, CURLOPT_LOW_SPEED_LIMIT, LOW_SPEED);
	curl_easy_setopt(c, CURLOPT_LOW_SPEED_TIME, LOW_SPEED_TIME);
	curl_easy_setopt(c, CURLOPT_USERAGENT, "imagebuilder");
	curl_easy_setopt(c, CURLOPT_ERRORBUFFER, h->err);
	curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(c, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, on_header);
	curl_easy_setopt(c, CURLOPT_HEADERDATA, h);
	curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
	curl_easy_setopt(c, CURLOPT_WRITEDATA, h);
	curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, on_progress);
	curl_easy_setopt(c, CURLOPT_XFERINFODATA, h);
	curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
	if (h->follow) {
		/* blobs may live behind a redirect (a storage service): credentials do not follow, https stays https */
		curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 1L);
		curl_easy_setopt(c, CURLOPT_MAXREDIRS, 5L);
		if (!strncasecmp(r->base, "https://", 8))
			curl_easy_setopt(c, CURLOPT_REDIR_PROTOCOLS_STR, "https");
	}
	if (!strcmp(h->method, "HEAD")) {
		curl_easy_setopt(c, CURLOPT_NOBODY, 1L);
	} else if (!strcmp(h->method, "PUT") || !strcmp(h->method, "PATCH")) {
		curl_easy_setopt(c, CURLOPT_UPLOAD, 1L);
		if (strcmp(h->method, "PUT"))
			curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, h->method);
		curl_easy_setopt(c, CURLOPT_READFUNCTION, on_read);
		curl_easy_setopt(c, CURLOPT_READDATA, h);
		curl_easy_setopt(c, CURLOPT_INFILESIZE_LARGE,
				 (curl_off_t)(h->body_fd >= 0 ? h->body_size : h->body_len));
		h->body_off = 0;
	} else if (strcmp(h->method, "GET")) {
		curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, h->method);
		curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE, 0L);
		curl_easy_setopt(c, CURLOPT_POSTFIELDS, "");
	}
	rc = curl_easy_perform(c);
	curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &h->status);
	curl_easy_cleanup(c);
	curl_slist_free_all(hdrs);
	if (h->too_large)
		return ib_error_set("%s: the answer to %s is larger than %llu bytes", r->url, h->url,
				    (unsigned long long)h->max);
	if (h->sink_failed)
		return IB_ERROR; /* the sink said why */
	if (h->aborted)
		return r->cancel && *r->cancel ? ib_error_set("%s: cancelled", r->url) < 0 ? IB_ECANCELED : 0
					       : ib_error_set("%s: timed out", r->url) < 0 ? IB_ETIMEOUT : 0;
	if (rc != CURLE_OK)
		return ib_error_set("%s: %s", r->url, h->err[0] ? h->err : curl_easy_strerror(rc));
	return 0;
}

/* perform() with the registry's auth: the token or credentials it asks for, then once more. */
static int call(ib_remote *r, hreq *h)
{
	char *auth = NULL, *b64;
	int err;

	pthread_mutex_lock(&r->mu);
	auth = r->bearer ? ib_xstrdup(r->bearer) : NULL;
	pthread_mutex_unlock(&r->mu);
	err = perform(r, h, auth);
	if (!err && h->status == 401 && h->www_auth) {
		free(auth);
		auth = NULL;
		if (!strncasecmp(h->www_auth, "Bearer", 6)) {
			if ((err = fetch_token(r, h->www_auth)) < 0)
				return err;
			pthread_mutex_lock(&r->mu);
			auth = ib_xstrdup(r->bearer);
			pthread_mutex_unlock(&r->mu);
		} else if (!strncasecmp(h->www_auth, "Basic", 5) && r->basic) {
			size_t n = strlen(r->basic);
			b64 = ib_xmalloc(4 * ((n + 2) / 3) + 1);
			EVP_EncodeBlock((unsigned char *)b64, (const unsigned char *)r->basic, (int)n);
			auth = ib_xasprintf("Basic %s", b64);
			free(b64);
		} else {
			return ib_error_set("%s: the registry wants credentials and there are none for %s", r->url,
					    r->host);
		}
		/* a 401's body went nowhere but the message buffer */
		if (h->out)
			ib_buf_reset(h->out);
		err = perform(r, h, auth);
	}
	free(auth);
	if (!err && h->status == 401)
		err = ib_error_set("%s: authentication failed (HTTP 401)", r->url);
	else if (!err && h->status == 403)
		err = ib_error_set("%s: access denied (HTTP 403)", r->url);
	return err;
}

static void hreq_clear(hreq *h)
{
	free(h->url);
	free(h->range);
	free(h->location);
	free(h->www_auth);
}

#define MANIFEST_TYPE "application/vnd.oci.image.manifest.v1+json"

int ib_remote_manifest_get(ib_remote *r, const char *tag, json_t **out)
{
	ib_buf body = IB_BUF_INIT;
	hreq h = { .method = "GET", .accept = MANIFEST_TYPE, .body_fd = -1, .out = &body, .max = MANIFEST_MAX };
	json_error_t jerr;
	int err;

	*out = NULL;
	h.url = ib_xasprintf("%s/v2/%s/manifests/%s", r->base, r->repo, tag);
	err = call(r, &h);
	if (!err && h.status == 404)
		err = 0;
	else if (!err && h.status != 200)
		err = ib_error_set("%s: manifest %s: HTTP %ld", r->url, tag, h.status);
	else if (!err && !(*out = json_loadb(body.ptr, body.len, 0, &jerr)))
		err = ib_error_set("%s: manifest %s is not JSON: %s", r->url, tag, jerr.text);
	else if (!err)
		err = 1;
	hreq_clear(&h);
	ib_buf_free(&body);
	return err;
}

int ib_remote_manifest_put(ib_remote *r, const char *tag, const char *manifest)
{
	ib_buf body = IB_BUF_INIT;
	hreq h = { .method = "PUT", .ctype = MANIFEST_TYPE, .body = manifest, .body_len = strlen(manifest),
		   .body_fd = -1, .out = &body, .max = 1 << 20 };
	int err;

	h.url = ib_xasprintf("%s/v2/%s/manifests/%s", r->base, r->repo, tag);
	err = call(r, &h);
	if (!err && h.status != 201 && h.status != 200)
		err = ib_error_set("%s: putting manifest %s: HTTP %ld %.200s", r->url, tag, h.status,
				   body.ptr ? body.ptr : "");
	hreq_clear(&h);
	ib_buf_free(&body);
	return err;
}

static bool digest_ok(const char *digest)
{
	if (strncmp(digest, "sha256:", 7) || strlen(digest) != 7 + 64)
		return false;
	for (const char *p = digest + 7; *p; p++)
		if (!((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'f')))
			return false;
	return true;
}

int ib_remote_blob_stream(ib_remote *r, const char *digest, uint64_t max, ib_remote_sink sink, void *arg)
{
	hreq h = { .method = "GET", .body_fd = -1, .max = max, .sink = sink, .sink_arg = arg, .follow = true };
	char hex[IB_SHA256_HEX];
	int err;

	if (!digest_ok(digest))
		return ib_error_set("%s: '%.80s' is not a sha256 digest", r->url, digest) < 0 ? IB_EINVALID : 0;
	h.hash = ib_sha256_new();
	h.url = ib_xasprintf("%s/v2/%s/blobs/%s", r->base, r->repo, digest);
	err = call(r, &h);
	if (!err && h.status != 200)
		err = ib_error_set("%s: blob %.19s: HTTP %ld", r->url, digest, h.status);
	ib_sha256_final_hex(h.hash, hex);
	if (!err && strcmp(hex, digest + 7)) {
		ib_error_set("%s: blob %.19s arrived with digest sha256:%.12s: corrupt", r->url, digest, hex);
		err = IB_EINVALID;
	}
	hreq_clear(&h);
	return err;
}

int ib_remote_blob_exists(ib_remote *r, const char *digest)
{
	hreq h = { .method = "HEAD", .body_fd = -1 };
	int err;

	h.url = ib_xasprintf("%s/v2/%s/blobs/%s", r->base, r->repo, digest);
	err = call(r, &h);
	if (!err)
		err = h.status == 200 ? 1 : h.status == 404 ? 0
					   : ib_error_set("%s: blob %.19s: HTTP %ld", r->url, digest, h.status);
	hreq_clear(&h);
	return err;
}

/*
 * Where an upload goes next: its Location, made absolute; NULL (error set)
 * when it is on another origin (our credentials would go with it) or not
 * a URL.
 */
static char *upload_url(ib_remote *r, const char *location)
{
	if (location[0] == '/' && location[1] != '/')
		return ib_xasprintf("%s%s", r->base, location);
	if (same_origin(r, location))
		return ib_xstrdup(location);
	ib_error_set("%s: the registry sends the upload to '%.200s', not its own origin", r->url, location);
	return NULL;
}

/*
 * The chunked flow: PATCH each piece with its Content-Range to the
 * session's latest Location; *url becomes where the closing PUT goes.
 */
static int blob_chunks(ib_remote *r, const char *digest, int fd, uint64_t size, char **url)
{
	int err = 0;

	for (uint64_t at = 0; at < size && !err;) {
		uint64_t n = size - at < r->chunk ? size - at : r->chunk;
		hreq patch = { .method = "PATCH", .ctype = "application/octet-stream", .body_fd = fd,
			       .body_start = at, .body_size = n };

		patch.url = ib_xstrdup(*url);
		patch.range = ib_xasprintf("%llu-%llu", (unsigned long long)at, (unsigned long long)(at + n - 1));
		err = call(r, &patch);
		if (!err && (patch.status != 202 || !patch.location))
			err = ib_error_set("%s: uploading blob %.19s, bytes %s: HTTP %ld", r->url, digest, patch.range,
					   patch.status);
		if (!err) {
			free(*url);
			if (!(*url = upload_url(r, patch.location)))
				err = IB_ERROR;
			at += n;
		}
		hreq_clear(&patch);
	}
	return err;
}

/*
 * An upload: POST for a session, then the bytes, then PUT with the digest
 * to close it.  A blob up to the chunk size goes in that PUT (the
 * monolithic flow); a larger one from a file goes in PATCHed chunks first.
 */
static int blob_put(ib_remote *r, const char *digest, int fd, uint64_t size, const void *data, size_t len)
{
	hreq post = { .method = "POST", .body_fd = -1 };
	hreq put = { .method = "PUT", .ctype = "application/octet-stream", .body = data, .body_len = len,
		     .body_fd = fd, .body_size = size };
	char *url = NULL;
	int err, have;

	if (!digest_ok(digest))
		return ib_error_set("'%.80s' is not a sha256 digest", digest) < 0 ? IB_EINVALID : 0;
	if ((have = ib_remote_blob_exists(r, digest)) != 0)
		return have < 0 ? have : 0; /* content-addressed: there already */
	post.url = ib_xasprintf("%s/v2/%s/blobs/uploads/", r->base, r->repo);
	err = call(r, &post);
	if (!err && (post.status != 202 || !post.location))
		err = ib_error_set("%s: starting an upload: HTTP %ld", r->url, post.status);
	if (!err && !(url = upload_url(r, post.location)))
		err = IB_ERROR;
	if (!err) {
		if (fd >= 0 && r->chunk && size > r->chunk) {
			err = blob_chunks(r, digest, fd, size, &url);
			put.body_fd = -1; /* the close carries no bytes */
			put.body_len = 0;
		}
	}
	if (!err) {
		put.url = ib_xasprintf("%s%sdigest=%s", url, strchr(url, '?') ? "&" : "?", digest);
		err = call(r, &put);
		if (!err && put.status != 201)
			err = ib_error_set("%s: uploading blob %.19s: HTTP %ld", r->url, digest, put.status);
	}
	free(url);
	hreq_clear(&post);
	hreq_clear(&put);
	return err;
}

int ib_remote_blob_put(ib_remote *r, const char *digest, const char *path)
{
	struct stat st;
	int fd = open(path, O_RDONLY | O_CLOEXEC), err;

	if (fd < 0 || fstat(fd, &st) < 0) {
		err = ib_error_set_errno(errno, "cannot read '%s'", path);
		if (fd >= 0)
			close(fd);
		return err;
	}
	err = blob_put(r, digest, fd, (uint64_t)st.st_size, NULL, 0);
	close(fd);
	return err;
}

int ib_remote_blob_put_mem(ib_remote *r, const char *digest, const void *data, size_t len)
{
	return blob_put(r, digest, -1, 0, data, len);
}

#include "builder/fetch.h"

#include <curl/curl.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "lib/util.h"

#define FETCH_ATTEMPTS 4
#define FETCH_CONNECT_TIMEOUT 30L
/* Give up on a transfer slower than this many bytes/s for that many seconds. */
#define FETCH_LOW_SPEED 1024L
#define FETCH_LOW_SPEED_TIME 60L

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;

static void curl_init(void)
{
	curl_global_init(CURL_GLOBAL_DEFAULT);
}

struct sink {
	int fd;
	ib_sha256 *h;
	int write_errno;
	const ib_fetch_opts *opts;
};

static size_t on_data(char *ptr, size_t size, size_t n, void *arg)
{
	struct sink *s = arg;
	size_t len = size * n;

	if (ib_write_all(s->fd, ptr, len) < 0) {
		s->write_errno = errno;
		return 0;
	}
	ib_sha256_update(s->h, ptr, len);
	return len;
}

static int on_progress(void *arg, curl_off_t dt, curl_off_t dn, curl_off_t ut, curl_off_t un)
{
	const struct sink *s = arg;

	(void)dt, (void)dn, (void)ut, (void)un;
	if (s->opts->cancel && *s->opts->cancel)
		return 1;
	if (s->opts->deadline > 0 && ib_now() >= s->opts->deadline)
		return 1;
	return 0;
}

static bool transient(CURLcode rc, long status)
{
	switch (rc) {
	case CURLE_COULDNT_CONNECT:
	case CURLE_COULDNT_RESOLVE_HOST:
	case CURLE_OPERATION_TIMEDOUT:
	case CURLE_RECV_ERROR:
	case CURLE_SEND_ERROR:
	case CURLE_PARTIAL_FILE:
	case CURLE_GOT_NOTHING:
	case CURLE_HTTP2:
	case CURLE_HTTP2_STREAM:
		return true;
	case CURLE_HTTP_RETURNED_ERROR:
		return status >= 500 || status == 429 || status == 408;
	default:
		return false;
	}
}

/* One attempt; 1 means "try again", 0 done, <0 failed for good. */
static int attempt(const char *url, const char *tmp, char *hex, const ib_fetch_opts *opts)
{
	struct sink s = { .fd = -1, .opts = opts };
	char errbuf[CURL_ERROR_SIZE] = "";
	CURL *c = NULL;
	CURLcode rc;
	long status = 0;
	int ret = 0;

	s.fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (s.fd < 0)
		return ib_error_set_errno(errno, "cannot create '%s'", tmp);
	s.h = ib_sha256_new();
	c = curl_easy_init();
	if (!c) {
		ret = ib_error_set("cannot download '%s': curl_easy_init failed", url);
		goto out;
	}
	curl_easy_setopt(c, CURLOPT_URL, url);
	curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 1L);
	curl_easy_setopt(c, CURLOPT_MAXREDIRS, 10L);
	curl_easy_setopt(c, CURLOPT_FAILONERROR, 1L);
	curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, FETCH_CONNECT_TIMEOUT);
	curl_easy_setopt(c, CURLOPT_LOW_SPEED_LIMIT, FETCH_LOW_SPEED);
	curl_easy_setopt(c, CURLOPT_LOW_SPEED_TIME, FETCH_LOW_SPEED_TIME);
	curl_easy_setopt(c, CURLOPT_USERAGENT, "imagebuilder");
	curl_easy_setopt(c, CURLOPT_ERRORBUFFER, errbuf);
	curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_data);
	curl_easy_setopt(c, CURLOPT_WRITEDATA, &s);
	curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, on_progress);
	curl_easy_setopt(c, CURLOPT_XFERINFODATA, &s);
	curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
	rc = curl_easy_perform(c);
	curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
	if (rc == CURLE_ABORTED_BY_CALLBACK) {
		if (opts->cancel && *opts->cancel) {
			ib_error_set("download of '%s' cancelled", url);
			ret = IB_ECANCELED;
		} else {
			ib_error_set("download of '%s' timed out", url);
			ret = IB_ETIMEOUT;
		}
		goto out;
	}
	if (rc == CURLE_WRITE_ERROR && s.write_errno) {
		ret = ib_error_set_errno(s.write_errno, "cannot write '%s'", tmp);
		goto out;
	}
	if (rc != CURLE_OK) {
		if (rc == CURLE_HTTP_RETURNED_ERROR)
			ib_error_set("cannot download '%s': HTTP %ld", url, status);
		else
			ib_error_set("cannot download '%s': %s", url, *errbuf ? errbuf : curl_easy_strerror(rc));
		ret = transient(rc, status) ? 1 : IB_ERROR;
		goto out;
	}
	if (fsync(s.fd) < 0) {
		ret = ib_error_set_errno(errno, "cannot write '%s'", tmp);
		goto out;
	}
	ib_sha256_final_hex(s.h, hex);
	s.h = NULL;
out:
	ib_sha256_free(s.h);
	if (c)
		curl_easy_cleanup(c);
	if (close(s.fd) < 0 && !ret)
		ret = ib_error_set_errno(errno, "cannot write '%s'", tmp);
	return ret;
}

int ib_fetch(const char *url, const char *path, const char *expected, char *got, const ib_fetch_opts *opts)
{
	static const ib_fetch_opts defaults = { 0 };
	char *tmp = ib_xasprintf("%s.part.%ld", path, (long)getpid());
	char hex[IB_SHA256_HEX] = "";
	unsigned attempts;
	int ret = IB_ERROR;

	if (!opts)
		opts = &defaults;
	attempts = opts->attempts ? opts->attempts : FETCH_ATTEMPTS;
	pthread_once(&curl_once, curl_init);
	for (unsigned i = 0; i < attempts; i++) {
		if (i) {
			/* 1 s, 2 s, 4 s ... but never past the deadline */
			double wait = (double)(1u << (i - 1));
			if (opts->deadline > 0 && ib_now() + wait >= opts->deadline)
				break;
			struct timespec ts = { (time_t)wait, 0 };
			while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
				;
		}
		ret = attempt(url, tmp, hex, opts);
		if (ret <= 0)
			break;
	}
	if (ret > 0) {
		ib_error_prefix("after %u attempts", attempts);
		ret = IB_ERROR;
	}
	if (!ret && expected && strcmp(hex, expected)) {
		ret = ib_error_set("'%s' has SHA-256 %s, expected %s: refusing it", url, hex, expected);
	}
	if (!ret && rename(tmp, path) < 0)
		ret = ib_error_set_errno(errno, "cannot rename '%s'", tmp);
	if (ret)
		unlink(tmp);
	else if (got)
		memcpy(got, hex, IB_SHA256_HEX);
	free(tmp);
	return ret;
}

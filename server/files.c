/*
 * Files the service writes and serves: build logs (CACHE/logs/<id>.log,
 * append-only) and the cached images (sendfile through libmicrohttpd,
 * with ranges and entity tags).
 */
#include "server/server-internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

char *srv_log_path(const ib_server *srv, const char *build_id)
{
	return ib_xasprintf("%s/logs/%s.log", ib_cache_dir(srv->cache), build_id);
}

uint64_t srv_log_size(const ib_server *srv, const char *build_id)
{
	char *path = srv_log_path(srv, build_id);
	struct stat st;
	uint64_t n = stat(path, &st) == 0 ? (uint64_t)st.st_size : 0;

	free(path);
	return n;
}

void srv_build_log(const ib_server *srv, const char *build_id, int fd, const char *fmt, ...)
{
	char ts[32], line[1024];
	int own = -1, n;
	va_list ap;

	if (fd < 0) {
		char *path = srv_log_path(srv, build_id);
		fd = own = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
		free(path);
		if (fd < 0)
			return;
	}
	ib_http_time(ts, ib_http_wallclock());
	n = snprintf(line, sizeof(line), "[%s] imagebuilder: ", ts);
	va_start(ap, fmt);
	n += vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
	va_end(ap);
	if ((size_t)n > sizeof(line) - 2)
		n = sizeof(line) - 2;
	line[n++] = '\n';
	ib_write_all(fd, line, (size_t)n);
	if (own >= 0)
		close(own);
}

/* Mark an image used, at most once a minute each (every write is an fsync). */
void srv_touch_image(ib_server *srv, const char *image_id)
{
	unsigned h = 2166136261u;
	double now = ib_now();
	bool due;

	for (const char *p = image_id; *p; p++)
		h = (h ^ (unsigned char)*p) * 16777619u;
	h %= TOUCH_SLOTS;
	pthread_mutex_lock(&srv->touch_mu);
	due = strcmp(srv->touched[h].id, image_id) || now - srv->touched[h].at >= TOUCH_EVERY;
	if (due) {
		snprintf(srv->touched[h].id, sizeof(srv->touched[h].id), "%s", image_id);
		srv->touched[h].at = now;
	}
	pthread_mutex_unlock(&srv->touch_mu);
	if (due)
		ib_cache_touch_image(srv->cache, image_id);
}

/* An fd response for [off, off + len) of fd (taken over). */
static struct MHD_Response *fd_response(int fd, uint64_t off, uint64_t len)
{
	struct MHD_Response *resp;

	if (len == 0) {
		close(fd);
		return MHD_create_response_from_buffer(0, NULL, MHD_RESPMEM_PERSISTENT);
	}
	resp = MHD_create_response_from_fd_at_offset64(len, fd, off);
	if (!resp)
		close(fd);
	return resp;
}

enum MHD_Result srv_serve_logs(req *r, struct MHD_Connection *c, const char *id)
{
	ib_server *srv = r->srv;
	const char *off_s = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "offset");
	struct MHD_Response *resp;
	const char *status = NULL;
	char *path, num[32];
	uint64_t off = 0, size = 0;
	struct stat st;
	job *j;
	int fd, rc;

	if (!srv_build_id_ok(id))
		return srv_respond_error(r, c, IB_CONNECT_NOT_FOUND, "no build with that id");
	snprintf(r->build_id, sizeof(r->build_id), "%s", id);
	pthread_mutex_lock(&srv->mu);
	if ((j = srv_find_job(srv, id)))
		status = srv_status_names[j->status];
	pthread_mutex_unlock(&srv->mu);
	if (!status) {
		ib_build_record rec;
		if ((rc = ib_builds_get(srv->builds, id, &rec)) < 0)
			return srv_respond_error(r, c, IB_CONNECT_INTERNAL, "%s", ib_error_last());
		if (rc == 0)
			return srv_respond_error(r, c, IB_CONNECT_NOT_FOUND, "no build '%s'", id);
		for (size_t i = 0; i <= ST_TIMEOUT; i++)
			if (!strcmp(rec.status, srv_status_names[i]))
				status = srv_status_names[i];
		ib_build_record_clear(&rec);
		if (!status)
			status = "FAILED";
	}
	if (off_s && ib_parse_u64(&off, off_s, INT64_MAX) < 0)
		return srv_respond_error(r, c, IB_CONNECT_INVALID_ARGUMENT, "offset: must be a byte offset (0 or more)");
	path = srv_log_path(srv, id);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	free(path);
	if (fd < 0 && errno != ENOENT)
		return srv_respond_error(r, c, IB_CONNECT_INTERNAL, "cannot open the log of '%s': %s", id, strerror(errno));
	if (fd >= 0) {
		if (fstat(fd, &st) < 0) {
			close(fd);
			return srv_respond_error(r, c, IB_CONNECT_INTERNAL, "cannot read the log of '%s'", id);
		}
		size = (uint64_t)st.st_size;
	}
	snprintf(num, sizeof(num), "bytes */%llu", (unsigned long long)size);
	if (off > size) {
		char msg[96];
		if (fd >= 0)
			close(fd);
		snprintf(msg, sizeof(msg), "offset %llu is past the end of the log (%llu bytes)",
			 (unsigned long long)off, (unsigned long long)size);
		return srv_respond_http(r, c, MHD_HTTP_RANGE_NOT_SATISFIABLE, IB_CONNECT_OUT_OF_RANGE,
				    MHD_HTTP_HEADER_CONTENT_RANGE, num, msg);
	}
	if (fd < 0)
		resp = MHD_create_response_from_buffer(0, NULL, MHD_RESPMEM_PERSISTENT);
	else
		resp = fd_response(fd, off, size - off);
	if (!resp)
		return MHD_NO;
	MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/plain; charset=utf-8");
	MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
	snprintf(num, sizeof(num), "%llu", (unsigned long long)size);
	MHD_add_response_header(resp, "X-Log-Size", num);
	MHD_add_response_header(resp, "X-Build-Status", status);
	r->length = size - off;
	return srv_send(r, c, MHD_HTTP_OK, resp);
}

/*
 * The file to serve: the image itself (kind < 0) or one of its compact
 * forms (made on first use), opened, with its entity tag and size.  The fd
 * keeps what it opened: a concurrent gc or forced rebuild cannot change
 * what it reads.  0, or a response already queued in *ret.
 */
static int open_image_file(req *r, struct MHD_Connection *c, const char *id, int kind, int *out_fd,
			   char etag[IB_SHA256_HEX + 16], uint64_t *out_size, enum MHD_Result *ret)
{
	ib_server *srv = r->srv;
	ib_image_info info = { 0 };
	ib_artifact_info a = { 0 };
	struct stat st;
	int fd = -1, rc;

	for (int attempt = 0; attempt < 2; attempt++) {
		char *path;

		if (kind >= 0) {
			if ((rc = ib_cache_image_artifact(srv->cache, id, (ib_artifact)kind, &a)) < 0)
				goto fail;
			snprintf(etag, IB_SHA256_HEX + 16, "\"sha256:%s\"", a.sha256);
			*out_size = a.bytes;
			path = a.path;
			a.path = NULL;
		} else {
			if ((rc = ib_cache_image_get(srv->cache, id, &info)) <= 0)
				goto fail;
			if (!info.ext4_sha256[0] && (rc = ib_cache_image_digest(srv->cache, id, info.ext4_sha256)) < 0) {
				ib_image_info_clear(&info);
				goto fail;
			}
			snprintf(etag, IB_SHA256_HEX + 16, "\"sha256:%s\"", info.ext4_sha256);
			*out_size = info.ext4_bytes;
			ib_image_info_clear(&info);
			path = ib_cache_image_path(srv->cache, id);
		}
		ib_artifact_info_clear(&a);
		fd = open(path, O_RDONLY | O_CLOEXEC);
		free(path);
		if (fd >= 0 && fstat(fd, &st) == 0 && (uint64_t)st.st_size == *out_size) {
			*out_fd = fd;
			return 0;
		}
		/* re-exported between the two looks: look again */
		if (fd >= 0)
			close(fd);
	}
	*ret = srv_respond_error(r, c, IB_CONNECT_DATA_LOSS,
				 "image '%s' does not have the size the index records; run 'cache verify'", id);
	return -1;
fail:
	ib_artifact_info_clear(&a);
	*ret = rc == 0 || rc == IB_ENOTFOUND ? srv_respond_error(r, c, IB_CONNECT_NOT_FOUND, "no image '%s'", id)
					     : srv_respond_error(r, c, IB_CONNECT_INTERNAL, "%s", ib_error_last());
	return -1;
}

enum MHD_Result srv_serve_rootfs(req *r, struct MHD_Connection *c, const char *id, int kind, bool head)
{
	static const char *const types[] = { [IB_ARTIFACT_ZST] = "application/zstd",
					     [IB_ARTIFACT_BMAP] = "application/xml" };
	ib_server *srv = r->srv;
	struct MHD_Response *resp;
	char etag[IB_SHA256_HEX + 16], cr[96];
	const char *inm = srv_header_value(c, MHD_HTTP_HEADER_IF_NONE_MATCH);
	const char *if_range = srv_header_value(c, MHD_HTTP_HEADER_IF_RANGE);
	const char *range = srv_header_value(c, MHD_HTTP_HEADER_RANGE);
	uint64_t start = 0, len = 0, size = 0;
	ib_range_result rr = IB_RANGE_NONE;
	unsigned status = MHD_HTTP_OK;
	enum MHD_Result ret;
	int fd;

	if (!ib_is_hex64(id))
		return srv_respond_error(r, c, IB_CONNECT_NOT_FOUND, "no such image");
	snprintf(r->image_id, sizeof(r->image_id), "%s", id);
	if (open_image_file(r, c, id, kind, &fd, etag, &size, &ret) < 0)
		return ret;

	if (inm && ib_http_etag_match(inm, etag)) {
		close(fd);
		resp = MHD_create_response_from_buffer(0, NULL, MHD_RESPMEM_PERSISTENT);
		if (!resp)
			return MHD_NO;
		MHD_add_response_header(resp, MHD_HTTP_HEADER_ETAG, etag);
		return srv_send(r, c, MHD_HTTP_NOT_MODIFIED, resp);
	}
	/* If-Range with another tag (or a date: we keep no dates) means "send it all". */
	if (range && (!if_range || !strcmp(if_range, etag)))
		rr = ib_http_parse_range(range, size, &start, &len);
	if (rr == IB_RANGE_UNSATISFIABLE) {
		close(fd);
		snprintf(cr, sizeof(cr), "bytes */%llu", (unsigned long long)size);
		return srv_respond_http(r, c, MHD_HTTP_RANGE_NOT_SATISFIABLE, IB_CONNECT_OUT_OF_RANGE,
				    MHD_HTTP_HEADER_CONTENT_RANGE, cr, "the range is outside the image");
	}
	if (rr == IB_RANGE_OK) {
		status = MHD_HTTP_PARTIAL_CONTENT;
		snprintf(cr, sizeof(cr), "bytes %llu-%llu/%llu", (unsigned long long)start,
			 (unsigned long long)(start + len - 1), (unsigned long long)size);
	} else {
		start = 0;
		len = size;
	}
	resp = fd_response(fd, start, len);
	if (!resp)
		return MHD_NO;
	MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, kind >= 0 ? types[kind] : "application/octet-stream");
	MHD_add_response_header(resp, MHD_HTTP_HEADER_ETAG, etag);
	MHD_add_response_header(resp, MHD_HTTP_HEADER_ACCEPT_RANGES, "bytes");
	if (status == MHD_HTTP_PARTIAL_CONTENT)
		MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_RANGE, cr);
	r->length = head ? 0 : len;
	if (!head)
		srv_touch_image(srv, id);
	return srv_send(r, c, status, resp);
}

/* Read the last IB_LOG_TAIL_MAX bytes of a build's log. */
char *srv_log_tail_of(const ib_server *srv, const char *id)
{
	char *path = srv_log_path(srv, id), *buf = NULL;
	struct stat st;
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	ssize_t n;

	free(path);
	if (fd < 0)
		return NULL;
	if (fstat(fd, &st) == 0) {
		off_t off = st.st_size > IB_LOG_TAIL_MAX ? st.st_size - IB_LOG_TAIL_MAX : 0;
		buf = ib_xmalloc(IB_LOG_TAIL_MAX + 1);
		n = pread(fd, buf, IB_LOG_TAIL_MAX, off);
		buf[n > 0 ? n : 0] = '\0';
	}
	close(fd);
	return buf;
}

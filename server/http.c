/*
 * The HTTP side of the service: routing a request to its handler,
 * responses and errors (Connect's error body and HTTP mapping), the
 * structured log (one JSON object a line), and libmicrohttpd's callbacks.
 */
#include "server/server-internal.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>

char *srv_dump_json(const json_t *v, size_t flags)
{
	char *s = json_dumps(v, flags | JSON_COMPACT);

	if (!s)
		abort();
	return s;
}

/* Append s (at most max bytes) as a JSON string; bytes of invalid UTF-8 become \\u00XX. */
static void json_string_to(ib_buf *b, const char *s, size_t max)
{
	size_t n = strnlen(s, max), run = 0;
	bool raw_ok = ib_http_utf8_valid(s, n);

	ib_buf_add(b, "\"", 1);
	for (size_t i = 0; i < n; i++) {
		unsigned char ch = (unsigned char)s[i];
		char esc[8];

		if (ch != '"' && ch != '\\' && ch >= 0x20 && ch != 0x7f && (ch < 0x80 || raw_ok))
			continue;
		ib_buf_add(b, s + run, i - run);
		if (ch == '"' || ch == '\\')
			snprintf(esc, sizeof(esc), "\\%c", ch);
		else
			snprintf(esc, sizeof(esc), "\\u%04x", ch);
		ib_buf_puts(b, esc);
		run = i + 1;
	}
	ib_buf_add(b, s + run, n - run);
	ib_buf_add(b, "\"", 1);
}

/* One structured line on the server's log: {"ts": ..., "event": ..., ...}. */
void srv_event(const ib_server *srv, json_t *obj)
{
	char ts[32];
	ib_buf line = IB_BUF_INIT;
	char *s;

	if (srv->log_fd < 0) {
		json_decref(obj);
		return;
	}
	ib_http_time(ts, ib_http_wallclock());
	/* "ts" first, for people reading the raw lines */
	s = srv_dump_json(obj, JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(9));
	ib_buf_printf(&line, "{\"ts\":\"%s\",%s\n", ts, s + 1);
	ib_write_all(srv->log_fd, line.ptr, line.len);
	ib_buf_free(&line);
	free(s);
	json_decref(obj);
}

json_t *srv_time_or_null(double t)
{
	char buf[32];

	if (t <= 0)
		return json_null();
	ib_http_time(buf, t);
	return json_string(buf);
}

enum MHD_Result srv_send(req *r, struct MHD_Connection *c, unsigned status, struct MHD_Response *resp)
{
	enum MHD_Result ret;

	if (!resp)
		return MHD_NO;
	if (r->read_first && r->phase == PHASE_NEW) {
		/* answered from the headers: read (and drop) the body first, then send it */
		r->deferred = resp;
		r->deferred_status = status;
		r->phase = PHASE_BODY;
		return MHD_YES;
	}
	r->status = status;
	r->phase = PHASE_DONE;
	ret = MHD_queue_response(c, status, resp);
	MHD_destroy_response(resp);
	return ret;
}

/* Respond with body (owned, malloc'd), len bytes. */
enum MHD_Result srv_respond(req *r, struct MHD_Connection *c, unsigned status, const char *ctype, char *body,
			       size_t len)
{
	struct MHD_Response *resp = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);

	if (!resp) {
		free(body);
		return MHD_NO;
	}
	MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
	r->length = len;
	return srv_send(r, c, status, resp);
}

/* An RPC's answer: gzip when the client takes it and it is worth it. */
static enum MHD_Result respond_answer(req *r, struct MHD_Connection *c, const char *ctype, char *body, size_t len)
{
	struct MHD_Response *resp;
	char *z;
	size_t zlen;
	bool gz = r->gzip_out && len >= 512 && ib_http_gzip(body, len, &z, &zlen) == 0;

	if (gz) {
		free(body);
		body = z;
		len = zlen;
	}
	resp = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);
	if (!resp) {
		free(body);
		return MHD_NO;
	}
	MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
	MHD_add_response_header(resp, MHD_HTTP_HEADER_VARY, MHD_HTTP_HEADER_ACCEPT_ENCODING);
	if (gz)
		MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_ENCODING, "gzip");
	r->length = len;
	return srv_send(r, c, MHD_HTTP_OK, resp);
}

enum MHD_Result srv_respond_json(req *r, struct MHD_Connection *c, json_t *doc)
{
	srv_call call = { .srv = r->srv };
	enum MHD_Result ret;
	char *s;
	size_t len;

	/* binary Protobuf: the same answer as the method's output message */
	if (srv_call_encode(&call, srv_rpcs[r->rpc].out, r->proto, doc, &s, &len) < 0)
		ret = srv_respond_error(r, c, call.code, "%s", call.message);
	else
		ret = respond_answer(r, c, r->proto ? "application/proto" : "application/json", s, len);
	json_decref(doc);
	free(call.message);
	return ret;
}

enum MHD_Result srv_respond_error(req *r, struct MHD_Connection *c, ib_connect_code code, const char *fmt, ...)
{
	struct MHD_Response *resp;
	va_list ap;
	char *body;

	va_start(ap, fmt);
	free(r->message);
	if (vasprintf(&r->message, fmt, ap) < 0)
		abort();
	va_end(ap);
	r->code = ib_connect_code_name(code);
	body = ib_connect_error_body(code, r->message);
	r->length = strlen(body);
	resp = MHD_create_response_from_buffer(r->length, body, MHD_RESPMEM_MUST_FREE);
	if (!resp) {
		free(body);
		return MHD_NO;
	}
	MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
	if (code == IB_CONNECT_UNAUTHENTICATED)
		MHD_add_response_header(resp, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer realm=\"imagebuilder\"");
	return srv_send(r, c, ib_connect_http_status(code), resp);
}

/* A plain-HTTP status with a Connect-style body, for statuses Connect has no code for. */
enum MHD_Result srv_respond_http(req *r, struct MHD_Connection *c, unsigned status, ib_connect_code code,
				    const char *header, const char *value, const char *message)
{
	char *body = ib_connect_error_body(code, message);
	struct MHD_Response *resp;

	free(r->message);
	r->message = ib_xstrdup(message);
	r->code = ib_connect_code_name(code);
	r->length = strlen(body);
	resp = MHD_create_response_from_buffer(r->length, body, MHD_RESPMEM_MUST_FREE);
	if (!resp) {
		free(body);
		return MHD_NO;
	}
	MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
	if (header)
		MHD_add_response_header(resp, header, value);
	return srv_send(r, c, status, resp);
}

const char *srv_header_value(struct MHD_Connection *c, const char *name)
{
	return MHD_lookup_connection_value(c, MHD_HEADER_KIND, name);
}

/* Media type of a Content-Type value is type (parameters allowed)? */
static bool is_type(const char *ctype, const char *type)
{
	size_t n;

	if (!ctype)
		return false;
	while (*ctype == ' ' || *ctype == '\t')
		ctype++;
	n = strcspn(ctype, "; \t");
	return n == strlen(type) && !strncasecmp(ctype, type, n);
}

static enum MHD_Result serve_metrics(req *r, struct MHD_Connection *c)
{
	ib_server *srv = r->srv;
	ib_metrics_gauges g;
	ib_buf out = IB_BUF_INIT;
	size_t len;

	pthread_mutex_lock(&srv->mu);
	g.queued = srv->nqueued + srv->ninserting;
	g.building = srv->nbuilding;
	g.draining = srv->draining;
	pthread_mutex_unlock(&srv->mu);
	g.jobs = srv->jobs;
	g.uptime = ib_now() - srv->t_start;
	ib_metrics_render(srv->metrics, &g, &out);
	len = out.len;
	return srv_respond(r, c, MHD_HTTP_OK, "text/plain; version=0.0.4; charset=utf-8", ib_buf_detach(&out), len);
}

static bool authorized(ib_server *srv, struct MHD_Connection *c)
{
	return !srv->auth || ib_http_bearer_ok(&srv->token, srv_header_value(c, MHD_HTTP_HEADER_AUTHORIZATION));
}

/* ---- framed RPCs over HTTP/1.1: Connect streaming, gRPC-Web; health, reflection ---- */

static const char *mhd_header(void *ctx, const char *name)
{
	return MHD_lookup_connection_value(ctx, MHD_HEADER_KIND, name);
}

/* Is this request for the protocol-neutral exchange (wire.c) rather than Connect unary? */
static bool wants_exchange(struct MHD_Connection *c, const char *url)
{
	bool proto;
	srv_wire w = srv_wire_of(srv_header_value(c, MHD_HTTP_HEADER_CONTENT_TYPE), &proto);

	return (w != WIRE_NONE && w != WIRE_CONNECT) || !strncmp(url, "/grpc.", 6);
}

/* The body of a streaming answer; with nothing to send, the connection sleeps until the next tick. */
static ssize_t stream_reader(void *cls, uint64_t pos, char *buf, size_t max)
{
	req *r = cls;
	srv_exchange *x = r->x;
	ib_server *srv = r->srv;
	size_t n;

	(void)pos;
	if (!srv_exchange_pending(x) && !x->done)
		srv_exchange_poll(x);
	if (!srv_exchange_pending(x) && !x->done) {
		const union MHD_ConnectionInfo *ci = MHD_get_connection_info(r->conn, MHD_CONNECTION_INFO_CONNECTION_FD);
		char b;

		/* a client that has gone: the stream ends (nothing else would notice it while it sleeps) */
		if (ci && recv(ci->connect_fd, &b, 1, MSG_PEEK | MSG_DONTWAIT) == 0)
			return MHD_CONTENT_READER_END_WITH_ERROR;
		pthread_mutex_lock(&srv->mu);
		if (srv->stopping) {
			pthread_mutex_unlock(&srv->mu);
			srv_exchange_abort(x, SHUTDOWN_MESSAGE);
		} else {
			r->suspended = true;
			r->snext = srv->streams;
			srv->streams = r;
			MHD_suspend_connection(r->conn);
			pthread_cond_signal(&srv->timer_cv);
			pthread_mutex_unlock(&srv->mu);
			return 0;
		}
	}
	if (!srv_exchange_pending(x) && x->done)
		return MHD_CONTENT_READER_END_OF_STREAM;
	n = srv_exchange_take(x, buf, max);
	r->length += n;
	return (ssize_t)n;
}

void srv_stream_forget(ib_server *srv, req *r)
{
	pthread_mutex_lock(&srv->mu);
	for (req **pp = &srv->streams; *pp; pp = &(*pp)->snext)
		if (*pp == r) {
			*pp = r->snext;
			break;
		}
	r->suspended = false;
	pthread_mutex_unlock(&srv->mu);
}

/* Answer the exchange: all of it now, or a stream that goes on. */
static enum MHD_Result exchange_respond(req *r, struct MHD_Connection *c)
{
	srv_exchange *x = r->x;
	struct MHD_Response *resp;

	if (x->done) {
		resp = MHD_create_response_from_buffer(srv_exchange_pending(x), x->out.ptr + x->out_off,
						       MHD_RESPMEM_MUST_COPY);
		r->length = srv_exchange_pending(x);
	} else {
		resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16 * 1024, stream_reader, r, NULL);
	}
	if (!resp)
		return MHD_NO;
	MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, x->ctype[0] ? x->ctype : "application/json");
	if (x->content_encoding)
		MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_ENCODING, x->content_encoding);
	if (x->msg_encoding)
		MHD_add_response_header(resp, x->wire == WIRE_CONNECT_STREAM ? "Connect-Content-Encoding" : "Grpc-Encoding",
					x->msg_encoding);
	if (x->call.code == IB_CONNECT_UNAUTHENTICATED && x->call.message)
		MHD_add_response_header(resp, MHD_HTTP_HEADER_WWW_AUTHENTICATE, "Bearer realm=\"imagebuilder\"");
	if (x->call.message && !r->message) {
		r->message = ib_xstrdup(x->call.message);
		r->code = ib_connect_code_name(x->call.code);
	}
	return srv_send(r, c, x->status ? x->status : MHD_HTTP_OK, resp);
}

static enum MHD_Result start_exchange(req *r, struct MHD_Connection *c, const char *url, bool post)
{
	rpc_kind k = srv_rpc_of(url);

	r->ep = k != RPC_NONE ? srv_rpcs[k].ep : !strncmp(url, "/grpc.health.", 13) ? IB_EP_HEALTH
		: !strncmp(url, "/grpc.reflection.", 17) ? IB_EP_REFLECTION : IB_EP_OTHER;
	if (!post)
		return srv_respond_http(r, c, MHD_HTTP_METHOD_NOT_ALLOWED, IB_CONNECT_UNIMPLEMENTED, MHD_HTTP_HEADER_ALLOW,
					"POST", "RPCs are POST requests");
	r->x = ib_xcalloc(1, sizeof(*r->x));
	srv_exchange_begin(r->x, r->srv, url, mhd_header, c, false);
	if (r->x->done)
		return exchange_respond(r, c);
	r->phase = PHASE_BODY;
	return MHD_YES;
}

/* The first call for a request: headers are in, the body (if any) is not. */
static enum MHD_Result on_headers(req *r, struct MHD_Connection *c, const char *url, const char *method)
{
	ib_server *srv = r->srv;
	bool get = !strcmp(method, MHD_HTTP_METHOD_GET), head = !strcmp(method, MHD_HTTP_METHOD_HEAD);
	bool post = !strcmp(method, MHD_HTTP_METHOD_POST);
	const char *p, *len = srv_header_value(c, MHD_HTTP_HEADER_CONTENT_LENGTH);
	uint64_t body_len = 0;
	rpc_kind k;

	/*
	 * A client that sends a body reads the answer after it has sent it:
	 * an error found in the headers waits for the body (up to the size an
	 * RPC may have), so the client never sees its write fail (EPIPE).
	 */
	if (!get && !head) {
		if (len && ib_parse_u64(&body_len, len, UINT64_MAX) < 0) {
			ib_error_clear();
			body_len = UINT64_MAX;
		}
		r->read_first = body_len <= IB_SERVE_BODY_MAX;
	}

	if (!strcmp(url, "/healthz")) {
		bool draining;
		r->ep = IB_EP_HEALTHZ;
		if (!get && !head)
			return srv_respond_http(r, c, MHD_HTTP_METHOD_NOT_ALLOWED, IB_CONNECT_UNIMPLEMENTED,
					    MHD_HTTP_HEADER_ALLOW, "GET, HEAD", "use GET");
		pthread_mutex_lock(&srv->mu);
		draining = srv->draining;
		pthread_mutex_unlock(&srv->mu);
		return draining ? srv_respond(r, c, MHD_HTTP_SERVICE_UNAVAILABLE, "text/plain", ib_xstrdup("draining\n"), 9)
				: srv_respond(r, c, MHD_HTTP_OK, "text/plain", ib_xstrdup("ok\n"), 3);
	}
	if (wants_exchange(c, url))
		return start_exchange(r, c, url, post);
	k = srv_rpc_of(url);
	if (k != RPC_NONE)
		r->ep = srv_rpcs[k].ep;
	else if (!strcmp(url, "/metrics"))
		r->ep = IB_EP_METRICS;
	else if (!strncmp(url, "/v1/builds/", 11))
		r->ep = IB_EP_LOGS;
	else if (!strncmp(url, "/v1/images/", 11))
		r->ep = IB_EP_ROOTFS;

	if (!authorized(srv, c))
		return srv_respond_error(r, c, IB_CONNECT_UNAUTHENTICATED,
				     "missing or wrong bearer token (Authorization: Bearer <token>)");

	if (k != RPC_NONE) {
		const char *ctype = srv_header_value(c, MHD_HTTP_HEADER_CONTENT_TYPE);
		const char *version = srv_header_value(c, "Connect-Protocol-Version");
		const char *cenc = srv_header_value(c, MHD_HTTP_HEADER_CONTENT_ENCODING);
		const char *clen = srv_header_value(c, MHD_HTTP_HEADER_CONTENT_LENGTH);
		uint64_t n;

		if (version && strcmp(version, "1"))
			return srv_respond_error(r, c, IB_CONNECT_INVALID_ARGUMENT,
					     "connect-protocol-version: '%.16s' is not supported (1)", version);
		if (get && srv_rpcs[k].side_effect_free)
			return srv_connect_get(r, c, k);
		if (!post)
			return srv_respond_http(r, c, MHD_HTTP_METHOD_NOT_ALLOWED, IB_CONNECT_UNIMPLEMENTED,
					    MHD_HTTP_HEADER_ALLOW, srv_rpcs[k].side_effect_free ? "POST, GET" : "POST",
					    "Connect unary calls are POST requests");
		r->rpc = (int)k;
		r->proto = is_type(ctype, "application/proto");
		if (!r->proto && !is_type(ctype, "application/json"))
			return srv_respond_http(r, c, MHD_HTTP_UNSUPPORTED_MEDIA_TYPE, IB_CONNECT_INVALID_ARGUMENT,
					    "Accept-Post", "application/json, application/proto",
					    "content-type must be application/json or application/proto");
		r->gzip_in = cenc && !strcasecmp(cenc, "gzip");
		r->gzip_out = ib_http_accepts_gzip(srv_header_value(c, MHD_HTTP_HEADER_ACCEPT_ENCODING));
		if (cenc && strcmp(cenc, "identity") && !r->gzip_in)
			return srv_respond_error(r, c, IB_CONNECT_UNIMPLEMENTED,
					     "content-encoding '%.32s' is not supported (gzip or identity)", cenc);
		if (clen && ib_parse_u64(&n, clen, UINT64_MAX) == 0 && n > IB_SERVE_BODY_MAX)
			return srv_respond_error(r, c, IB_CONNECT_RESOURCE_EXHAUSTED,
					     "request: %llu bytes; at most %d are accepted", (unsigned long long)n,
					     IB_SERVE_BODY_MAX);
		r->phase = PHASE_BODY;
		return MHD_YES;
	}
	if (r->ep == IB_EP_METRICS) {
		if (!get)
			return srv_respond_http(r, c, MHD_HTTP_METHOD_NOT_ALLOWED, IB_CONNECT_UNIMPLEMENTED,
					    MHD_HTTP_HEADER_ALLOW, "GET", "use GET");
		return serve_metrics(r, c);
	}
	if (r->ep == IB_EP_LOGS && (p = strchr(url + 11, '/')) && !strcmp(p, "/logs")) {
		char id[IB_BUILD_ID_MAX];
		size_t n = (size_t)(p - (url + 11));
		if (!get && !head)
			return srv_respond_http(r, c, MHD_HTTP_METHOD_NOT_ALLOWED, IB_CONNECT_UNIMPLEMENTED,
					    MHD_HTTP_HEADER_ALLOW, "GET, HEAD", "use GET");
		if (n >= sizeof(id))
			return srv_respond_error(r, c, IB_CONNECT_NOT_FOUND, "no build with that id");
		memcpy(id, url + 11, n);
		id[n] = '\0';
		return srv_serve_logs(r, c, id);
	}
	if (r->ep == IB_EP_ROOTFS && (p = strchr(url + 11, '/')) &&
	    (!strcmp(p, "/rootfs.ext4") || !strcmp(p, "/rootfs.ext4.zst") || !strcmp(p, "/rootfs.ext4.bmap"))) {
		char id[IB_SHA256_HEX];
		size_t n = (size_t)(p - (url + 11));
		int kind = !strcmp(p, "/rootfs.ext4") ? -1 : !strcmp(p, "/rootfs.ext4.zst") ? IB_ARTIFACT_ZST
											 : IB_ARTIFACT_BMAP;
		if (!get && !head)
			return srv_respond_http(r, c, MHD_HTTP_METHOD_NOT_ALLOWED, IB_CONNECT_UNIMPLEMENTED,
					    MHD_HTTP_HEADER_ALLOW, "GET, HEAD", "use GET or HEAD");
		if (n >= sizeof(id))
			return srv_respond_error(r, c, IB_CONNECT_NOT_FOUND, "no such image");
		memcpy(id, url + 11, n);
		id[n] = '\0';
		return srv_serve_rootfs(r, c, id, kind, head);
	}
	r->ep = IB_EP_OTHER;
	if (!strncmp(url, RPC_PREFIX, sizeof(RPC_PREFIX) - 1))
		return srv_respond_error(r, c, IB_CONNECT_UNIMPLEMENTED, "imagebuilder.v1.ImageBuilder has no method '%.64s'",
				     url + sizeof(RPC_PREFIX) - 1);
	return srv_respond_error(r, c, IB_CONNECT_NOT_FOUND, "no such endpoint");
}

static enum MHD_Result on_request(void *cls, struct MHD_Connection *c, const char *url, const char *method,
				  const char *version, const char *upload_data, size_t *upload_data_size,
				  void **con_cls)
{
	req *r = *con_cls;
	enum MHD_Result ret;
	rpc_kind k;

	(void)cls;
	(void)version;
	if (!r)
		return MHD_NO;
	r->conn = c;
	switch (r->phase) {
	case PHASE_NEW:
		snprintf(r->method, sizeof(r->method), "%s", method);
		return on_headers(r, c, url, method);
	case PHASE_BODY:
		if (r->deferred) {
			struct MHD_Response *resp = r->deferred;
			if (*upload_data_size) {
				*upload_data_size = 0;
				return MHD_YES;
			}
			r->deferred = NULL;
			r->read_first = false;
			return srv_send(r, c, r->deferred_status, resp);
		}
		if (r->x) {
			if (*upload_data_size) {
				srv_exchange_data(r->x, upload_data, *upload_data_size);
				*upload_data_size = 0;
				return MHD_YES;
			}
			srv_exchange_end(r->x);
			return exchange_respond(r, c);
		}
		if (*upload_data_size) {
			if (r->body.len + *upload_data_size > IB_SERVE_BODY_MAX)
				r->too_large = true;
			else
				ib_buf_add(&r->body, upload_data, *upload_data_size);
			*upload_data_size = 0;
			return MHD_YES;
		}
		if (r->too_large)
			return srv_respond_error(r, c, IB_CONNECT_RESOURCE_EXHAUSTED, "request: at most %d bytes are accepted",
					     IB_SERVE_BODY_MAX);
		k = srv_rpc_of(url);
		if (r->gzip_in && r->body.len) {
			char *plain = NULL;
			size_t plain_len = 0;
			int z = ib_http_gunzip(r->body.ptr, r->body.len, IB_SERVE_BODY_MAX, &plain, &plain_len);
			ib_buf_free(&r->body);
			if (z == 1)
				return srv_respond_error(r, c, IB_CONNECT_RESOURCE_EXHAUSTED,
						     "request: more than %d bytes once decompressed", IB_SERVE_BODY_MAX);
			if (z < 0)
				return srv_respond_error(r, c, IB_CONNECT_INVALID_ARGUMENT, "request: %s", ib_error_last());
			ib_buf_add(&r->body, plain, plain_len);
			free(plain);
		}
		if (k == RPC_BUILD_IMAGE) {
			ib_http_sha256(r->digest, r->body.ptr ? r->body.ptr : "", r->body.len);
			r->have_digest = true;
			if (srv_answer_lookup(r->srv, r->digest, r->image_id, r->build_id)) {
				ib_buf_free(&r->body);
				return srv_respond_cached(r, c);
			}
		}
		ret = srv_dispatch_rpc(r, c, k, r->body.ptr, r->body.len);
		ib_buf_free(&r->body);
		return ret;
	case PHASE_RESUMED: {
		ib_server *srv = r->srv;
		const char *status;
		job *j = r->wait_job;

		srv_call call;

		pthread_mutex_lock(&srv->mu);
		status = srv_status_names[j->status];
		r->wait_job = NULL;
		srv_job_unref_locked(j);
		pthread_mutex_unlock(&srv->mu);
		srv_call_init(&call, srv, RPC_CANCEL_BUILD, NULL);
		memcpy(call.build_id, r->build_id, sizeof(call.build_id));
		srv_cancel_answer(&call, status);
		r->rpc = RPC_CANCEL_BUILD;
		ret = srv_respond_json(r, c, call.answer);
		call.answer = NULL;
		srv_call_clear(&call);
		return ret;
	}
	case PHASE_WAITING: /* not resumed yet: nothing to do */
		return MHD_YES;
	case PHASE_DONE:
		if (*upload_data_size) /* the rest of a body we already answered */
			*upload_data_size = 0;
		return MHD_YES;
	}
	return MHD_NO;
}

static void *on_uri(void *cls, const char *uri, struct MHD_Connection *c)
{
	req *r = ib_xcalloc(1, sizeof(*r));

	r->srv = cls;
	r->conn = c;
	r->t0 = ib_now();
	r->ep = IB_EP_OTHER;
	r->cached = -1;
	r->uri = ib_xstrndup(uri, strnlen(uri, 512));
	return r;
}

void srv_log_access(const ib_server *srv, const srv_access *a)
{
	char ts[32], part[512];
	ib_buf line = IB_BUF_INIT;
	int n;

	if (srv->log_fd < 0)
		return;
	/* By hand rather than through jansson: this runs once per request. */
	ib_http_time(ts, ib_http_wallclock());
	ib_buf_grow(&line, 512);
	n = snprintf(part, sizeof(part), "{\"ts\":\"%s\",\"event\":\"request\",\"method\":", ts);
	ib_buf_add(&line, part, (size_t)n);
	json_string_to(&line, a->method, 16);
	ib_buf_add(&line, ",\"path\":", 8);
	json_string_to(&line, a->path, 512);
	n = snprintf(part, sizeof(part),
		     ",\"endpoint\":\"%s\",\"status\":%u,\"ms\":%.3f,\"bytes\":%llu,\"remote\":\"%s\"%s%s%s%s%s%s%s%s%s%s",
		     ib_endpoint_name(a->ep), a->status, a->seconds * 1e3, (unsigned long long)a->bytes, a->remote,
		     a->code ? ",\"code\":\"" : "", a->code ? a->code : "", a->code ? "\"" : "",
		     a->build_id[0] ? ",\"build_id\":\"" : "", a->build_id, a->build_id[0] ? "\"" : "",
		     a->image_id[0] ? ",\"image_id\":\"" : "", a->image_id, a->image_id[0] ? "\"" : "",
		     a->cached < 0 ? "" : a->cached ? ",\"cached\":true" : ",\"cached\":false");
	ib_buf_add(&line, part, (size_t)n < sizeof(part) ? (size_t)n : sizeof(part) - 1);
	if (a->protocol) {
		n = snprintf(part, sizeof(part), ",\"protocol\":\"%s\",\"http\":\"%s\"", a->protocol, a->http);
		ib_buf_add(&line, part, (size_t)n);
	}
	if (a->message) {
		ib_buf_add(&line, ",\"message\":", 11);
		json_string_to(&line, a->message, 512);
	}
	if (a->aborted)
		ib_buf_puts(&line, ",\"aborted\":true");
	ib_buf_add(&line, "}\n", 2);
	ib_write_all(srv->log_fd, line.ptr, line.len);
	ib_buf_free(&line);
}

void srv_sockaddr_text(char out[INET6_ADDRSTRLEN], const struct sockaddr *sa)
{
	out[0] = '\0';
	if (sa && sa->sa_family == AF_INET)
		inet_ntop(AF_INET, &((const struct sockaddr_in *)sa)->sin_addr, out, INET6_ADDRSTRLEN);
	else if (sa && sa->sa_family == AF_INET6)
		inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)sa)->sin6_addr, out, INET6_ADDRSTRLEN);
}

static void on_completed(void *cls, struct MHD_Connection *c, void **con_cls, enum MHD_RequestTerminationCode toe)
{
	ib_server *srv = cls;
	req *r = *con_cls;
	const union MHD_ConnectionInfo *ci;
	char addr[INET6_ADDRSTRLEN] = "";
	double seconds;
	char *q;

	if (!r)
		return;
	*con_cls = NULL;
	seconds = ib_now() - r->t0;
	if (r->wait_job) /* completed while waiting (the daemon is stopping) */
		srv_job_unref(srv, r->wait_job);
	if (r->deferred)
		MHD_destroy_response(r->deferred);
	if (r->x) {
		srv_stream_forget(srv, r);
		memcpy(r->build_id, r->x->call.build_id, sizeof(r->build_id));
		memcpy(r->image_id, r->x->call.image_id, sizeof(r->image_id));
		r->cached = r->x->call.cached;
		if (r->x->call.message && !r->message) {
			r->message = ib_xstrdup(r->x->call.message);
			r->code = ib_connect_code_name(r->x->call.code);
		}
	}
	if (r->status) {
		ib_metrics_request(srv->metrics, r->ep, r->status, seconds);
		if (toe == MHD_REQUEST_TERMINATED_COMPLETED_OK && (r->ep == IB_EP_ROOTFS || r->ep == IB_EP_LOGS) &&
		    r->status < 300)
			ib_metrics_bytes(srv->metrics, r->ep, r->length);
	}
	if (srv->log_fd >= 0) {
		srv_access a = {
			.method = r->method, .path = r->uri, .ep = r->ep, .status = r->status, .seconds = seconds,
			.bytes = r->length, .remote = addr, .code = r->code, .message = r->message,
			.build_id = r->build_id, .image_id = r->image_id, .cached = r->cached,
			.aborted = toe != MHD_REQUEST_TERMINATED_COMPLETED_OK,
			.protocol = r->x ? srv_wire_name(r->x->wire) : NULL, .http = "1.1",
		};
		ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
		srv_sockaddr_text(addr, ci ? ci->client_addr : NULL);
		if ((q = strchr(r->uri, '?')))
			*q = '\0';
		srv_log_access(srv, &a);
	}
	if (r->x) {
		srv_exchange_free(r->x);
		free(r->x);
	}
	ib_buf_free(&r->body);
	free(r->uri);
	free(r->message);
	free(r);
}

static void on_mhd_log(void *cls, const char *fmt, va_list ap)
{
	ib_server *srv = cls;
	char msg[512];
	size_t n;

	vsnprintf(msg, sizeof(msg), fmt, ap);
	n = strlen(msg);
	while (n && (msg[n - 1] == '\n' || msg[n - 1] == '\r'))
		msg[--n] = '\0';
	srv_event(srv, json_pack("{s:s, s:s}", "event", "http_error", "message", msg));
}

int srv_http_start(ib_server *srv)
{
	unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG |
			 MHD_USE_NO_LISTEN_SOCKET | (srv->http_mode == IB_HTTP_POLL ? MHD_USE_POLL : MHD_USE_EPOLL);

	srv->mhd = MHD_start_daemon(flags, 0, NULL, NULL, on_request, srv,
				    MHD_OPTION_EXTERNAL_LOGGER, on_mhd_log, srv,
				    MHD_OPTION_THREAD_POOL_SIZE, srv->http_threads,
				    MHD_OPTION_CONNECTION_LIMIT, (unsigned)IB_SERVE_CONNECTIONS_MAX,
				    MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)IB_SERVE_CONN_MEMORY,
				    MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)IB_SERVE_IDLE_TIMEOUT,
				    MHD_OPTION_URI_LOG_CALLBACK, on_uri, srv,
				    MHD_OPTION_NOTIFY_COMPLETED, on_completed, srv,
				    MHD_OPTION_END);
	if (!srv->mhd)
		return ib_error_set("cannot start the HTTP server on '%s'", srv->listen);
	/* connections come from the acceptor, which keeps HTTP/2 for itself */
	return srv_accept_start(srv);
}

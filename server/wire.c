/*
 * The RPC protocols on the wire, apart from the transport that carries
 * them (libmicrohttpd for HTTP/1.1, nghttp2 for HTTP/2):
 *
 *   Connect unary      the message is the body; errors are HTTP statuses
 *                      with a JSON body {"code", "message"}
 *   Connect streaming  5-byte envelopes (flags, length); the stream ends
 *                      with an envelope of flag 0x02 holding {} or {"error"}
 *   gRPC               envelopes; status and message in HTTP/2 trailers
 *   gRPC-Web           envelopes; the trailers as a last envelope of flag
 *                      0x80; -text is the same in base64
 *
 * A message is compressed (gzip) when the client said it takes gzip and it
 * is worth it; compressed requests are read the way each protocol says.
 */
#include "server/server-internal.h"

#include <grpc/health/v1/health.pb-c.h>
#include <grpc/reflection/v1/reflection.pb-c.h>
#include <openssl/evp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define GZIP_MIN 512 /* answers shorter than this go uncompressed */
#define EXCHANGE_OUT_MAX (4 << 20) /* answer bytes held for a client that does not read */
#define FLAG_COMPRESSED 0x01
#define FLAG_END_STREAM 0x02 /* Connect */
#define FLAG_TRAILERS 0x80   /* gRPC-Web */

static const char *const wire_names[] = {
	[WIRE_CONNECT] = "connect",   [WIRE_CONNECT_STREAM] = "connect",      [WIRE_GRPC] = "grpc",
	[WIRE_GRPC_WEB] = "grpc-web", [WIRE_GRPC_WEB_TEXT] = "grpc-web-text",
};

const char *srv_wire_name(srv_wire w)
{
	return w >= WIRE_CONNECT && w <= WIRE_GRPC_WEB_TEXT ? wire_names[w] : "http";
}

/* The media type of a Content-Type value, without parameters, in out. */
static void media_type(char out[48], const char *ctype)
{
	size_t n;

	while (*ctype == ' ' || *ctype == '\t')
		ctype++;
	n = strcspn(ctype, "; \t");
	if (n >= 48)
		n = 0;
	memcpy(out, ctype, n);
	out[n] = '\0';
}

srv_wire srv_wire_of(const char *ctype, bool *proto)
{
	static const struct {
		const char *type;
		srv_wire wire;
		bool proto;
	} types[] = {
		{ "application/json", WIRE_CONNECT, false },
		{ "application/proto", WIRE_CONNECT, true },
		{ "application/connect+json", WIRE_CONNECT_STREAM, false },
		{ "application/connect+proto", WIRE_CONNECT_STREAM, true },
		{ "application/grpc", WIRE_GRPC, true },
		{ "application/grpc+proto", WIRE_GRPC, true },
		{ "application/grpc+json", WIRE_GRPC, false },
		{ "application/grpc-web", WIRE_GRPC_WEB, true },
		{ "application/grpc-web+proto", WIRE_GRPC_WEB, true },
		{ "application/grpc-web+json", WIRE_GRPC_WEB, false },
		{ "application/grpc-web-text", WIRE_GRPC_WEB_TEXT, true },
		{ "application/grpc-web-text+proto", WIRE_GRPC_WEB_TEXT, true },
	};
	char type[48];

	if (!ctype)
		return WIRE_NONE;
	media_type(type, ctype);
	for (size_t i = 0; i < sizeof(types) / sizeof(types[0]); i++)
		if (!strcasecmp(type, types[i].type)) {
			*proto = types[i].proto;
			return types[i].wire;
		}
	return WIRE_NONE;
}

static bool framed(const srv_exchange *x)
{
	return x->wire != WIRE_CONNECT;
}

static bool grpc_web(const srv_exchange *x)
{
	return x->wire == WIRE_GRPC_WEB || x->wire == WIRE_GRPC_WEB_TEXT;
}

static const ProtobufCMessageDescriptor *in_desc(const srv_exchange *x)
{
	switch (x->svc) {
	case SVC_HEALTH_CHECK:
	case SVC_HEALTH_WATCH: return &grpc__health__v1__health_check_request__descriptor;
	case SVC_REFLECTION: return &grpc__reflection__v1__server_reflection_request__descriptor;
	default: return srv_rpcs[x->call.k].in;
	}
}

static const ProtobufCMessageDescriptor *out_desc(const srv_exchange *x)
{
	switch (x->svc) {
	case SVC_HEALTH_CHECK:
	case SVC_HEALTH_WATCH: return &grpc__health__v1__health_check_response__descriptor;
	case SVC_REFLECTION: return &grpc__reflection__v1__server_reflection_response__descriptor;
	default: return srv_rpcs[x->call.k].out;
	}
}

/* The response's status line and content type, once. */
static void start_response(srv_exchange *x)
{
	const char *codec = x->proto ? "proto" : "json";

	if (x->status)
		return;
	x->status = 200;
	switch (x->wire) {
	case WIRE_CONNECT: snprintf(x->ctype, sizeof(x->ctype), "application/%s", codec); break;
	case WIRE_CONNECT_STREAM: snprintf(x->ctype, sizeof(x->ctype), "application/connect+%s", codec); break;
	case WIRE_GRPC: snprintf(x->ctype, sizeof(x->ctype), "application/grpc+%s", codec); break;
	case WIRE_GRPC_WEB: snprintf(x->ctype, sizeof(x->ctype), "application/grpc-web+%s", codec); break;
	case WIRE_GRPC_WEB_TEXT: snprintf(x->ctype, sizeof(x->ctype), "application/grpc-web-text+proto"); break;
	default: snprintf(x->ctype, sizeof(x->ctype), "application/json"); break;
	}
	if (framed(x) && x->gzip_out)
		x->msg_encoding = "gzip";
}

/* One envelope onto out (in base64 for -text: each envelope a padded piece). */
static void emit_frame(srv_exchange *x, unsigned char flags, const void *data, size_t len)
{
	unsigned char head[5] = { flags, (unsigned char)(len >> 24), (unsigned char)(len >> 16),
				  (unsigned char)(len >> 8), (unsigned char)len };

	start_response(x);
	if (x->wire == WIRE_GRPC_WEB_TEXT) {
		unsigned char *raw = ib_xmalloc(len + 5);
		char *text = ib_xmalloc(4 * ((len + 5 + 2) / 3) + 1);
		int n;

		memcpy(raw, head, 5);
		memcpy(raw + 5, data, len);
		n = EVP_EncodeBlock((unsigned char *)text, raw, (int)(len + 5));
		ib_buf_add(&x->out, text, (size_t)n);
		free(raw);
		free(text);
		return;
	}
	ib_buf_add(&x->out, head, 5);
	ib_buf_add(&x->out, data, len);
}

/* grpc-message: percent-encoded UTF-8 (the gRPC HTTP/2 protocol). */
static char *percent_encode(const char *message)
{
	char *clean = ib_http_utf8_clean(message, 1024);
	ib_buf b = IB_BUF_INIT;

	for (const unsigned char *p = (const unsigned char *)clean; *p; p++) {
		if (*p >= 0x20 && *p <= 0x7e && *p != '%')
			ib_buf_add(&b, p, 1);
		else
			ib_buf_printf(&b, "%%%02X", *p);
	}
	free(clean);
	ib_buf_add(&b, "", 1);
	return ib_buf_detach(&b);
}

/* The end of the answer: OK (code < 0), or an error with its code and message. */
static void finish(srv_exchange *x, int code, const char *message)
{
	if (x->done)
		return;
	x->running = false;
	if (code >= 0) {
		/* client bytes may be in it: valid UTF-8 from here on (JSON, trailers, the log) */
		char *clean = ib_http_utf8_clean(message, 2048);
		free(x->call.message);
		x->call.message = clean;
		x->call.code = (ib_connect_code)code;
		message = clean;
	}
	switch (x->wire) {
	case WIRE_NONE:
	case WIRE_CONNECT:
		if (code >= 0) {
			char *body = ib_connect_error_body((ib_connect_code)code, message);
			ib_buf_reset(&x->out);
			x->out_off = 0;
			ib_buf_puts(&x->out, body);
			free(body);
			x->status = ib_connect_http_status((ib_connect_code)code);
			snprintf(x->ctype, sizeof(x->ctype), "application/json");
			x->content_encoding = NULL;
		}
		break;
	case WIRE_CONNECT_STREAM: {
		json_t *end = code < 0 ? json_object()
				       : json_pack("{s:{s:s, s:s}}", "error", "code",
						   ib_connect_code_name((ib_connect_code)code), "message", message);
		char *s = end ? srv_dump_json(end, 0) : ib_xstrdup("{\"error\":{\"code\":\"internal\"}}");
		emit_frame(x, FLAG_END_STREAM, s, strlen(s));
		free(s);
		json_decref(end);
		break;
	}
	case WIRE_GRPC:
	case WIRE_GRPC_WEB:
	case WIRE_GRPC_WEB_TEXT:
		start_response(x);
		x->grpc_status = code < 0 ? 0 : code + 1; /* Connect's codes are gRPC's, less one */
		free(x->grpc_message);
		x->grpc_message = code < 0 ? NULL : percent_encode(message);
		if (grpc_web(x)) {
			char *t = x->grpc_message ? ib_xasprintf("grpc-status:%d\r\ngrpc-message:%s\r\n", x->grpc_status,
								 x->grpc_message)
						  : ib_xasprintf("grpc-status:0\r\n");
			emit_frame(x, FLAG_TRAILERS, t, strlen(t));
			free(t);
		}
		break;
	}
	x->done = true;
}

static void fail(srv_exchange *x, ib_connect_code code, const char *fmt, ...) IB_PRINTF(3, 4);
static void fail(srv_exchange *x, ib_connect_code code, const char *fmt, ...)
{
	va_list ap;
	char *m;

	va_start(ap, fmt);
	if (vasprintf(&m, fmt, ap) < 0)
		abort();
	va_end(ap);
	finish(x, (int)code, m);
	free(m);
}

/* One answer message, from its JSON document (taken). */
static void send_message(srv_exchange *x, json_t *doc)
{
	char *s, *z;
	size_t len, zlen;
	bool gz;

	if (srv_call_encode(&x->call, out_desc(x), x->proto, doc, &s, &len) < 0) {
		json_decref(doc);
		fail(x, IB_CONNECT_INTERNAL, "%s", x->call.message);
		return;
	}
	json_decref(doc);
	gz = x->gzip_out && len >= GZIP_MIN && ib_http_gzip(s, len, &z, &zlen) == 0;
	if (gz) {
		free(s);
		s = z;
		len = zlen;
	}
	x->messages++;
	if (framed(x)) {
		emit_frame(x, gz ? FLAG_COMPRESSED : 0, s, len);
	} else {
		start_response(x);
		x->content_encoding = gz ? "gzip" : NULL;
		ib_buf_reset(&x->out);
		x->out_off = 0;
		ib_buf_add(&x->out, s, len);
	}
	free(s);
}

/* The outcome of a call to the ImageBuilder service. */
static void call_outcome(srv_exchange *x, int rc)
{
	if (rc == SRV_CALL_ERROR) {
		finish(x, (int)x->call.code, x->call.message ? x->call.message : "error");
	} else if (rc == SRV_CALL_WAIT || x->call.watch) {
		x->running = true;
		srv_exchange_poll(x);
	} else {
		send_message(x, x->call.answer);
		x->call.answer = NULL;
		finish(x, -1, NULL);
	}
}

void srv_exchange_begin(srv_exchange *x, ib_server *srv, const char *path, srv_header_fn header, void *ctx, bool h2)
{
	const char *ctype = header(ctx, "content-type"), *enc, *accept, *name;
	rpc_kind k = srv_rpc_of(path);

	memset(x, 0, sizeof(*x));
	x->srv = srv;
	x->h2 = h2;
	srv_call_init(&x->call, srv, k == RPC_NONE ? RPC_GET_BUILD : k, h2 ? header(ctx, ":authority") : NULL);
	if (!x->call.host)
		x->call.host = header(ctx, "host") ? ib_xstrdup(header(ctx, "host")) : NULL;
	x->wire = srv_wire_of(ctype, &x->proto);
	if (x->wire == WIRE_NONE || (x->wire == WIRE_GRPC && !h2)) {
		bool grpc = x->wire == WIRE_GRPC;
		x->wire = WIRE_NONE;
		fail(x, IB_CONNECT_INVALID_ARGUMENT, "%s", grpc ? "gRPC needs HTTP/2 (h2c, prior knowledge)"
				: "content-type must be application/json or application/proto (Connect), "
				  "application/connect+json or +proto, application/grpc[+proto|+json] (HTTP/2), "
				  "or application/grpc-web[+proto|+json|-text]");
		x->status = 415;
		return;
	}

	if (!strcmp(path, "/grpc.health.v1.Health/Check"))
		x->svc = SVC_HEALTH_CHECK;
	else if (!strcmp(path, "/grpc.health.v1.Health/Watch"))
		x->svc = SVC_HEALTH_WATCH;
	else if (!strcmp(path, "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo") ||
		 !strcmp(path, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"))
		x->svc = SVC_REFLECTION;
	else
		x->svc = SVC_IMAGEBUILDER;
	/* the token first: every service but health */
	if (x->svc != SVC_HEALTH_CHECK && x->svc != SVC_HEALTH_WATCH && srv->auth &&
	    !ib_http_bearer_ok(&srv->token, header(ctx, "authorization")))
		return fail(x, IB_CONNECT_UNAUTHENTICATED, "missing or wrong bearer token (authorization: Bearer <token>)");
	if (x->svc == SVC_IMAGEBUILDER && k == RPC_NONE)
		return fail(x, IB_CONNECT_UNIMPLEMENTED, "no method '%.128s'", path);
	if (x->wire == WIRE_CONNECT && (x->svc == SVC_HEALTH_WATCH || (x->svc == SVC_IMAGEBUILDER && srv_rpcs[k].streaming))) {
		fail(x, IB_CONNECT_UNIMPLEMENTED,
		     "%s is server-streaming: application/connect+json or +proto (or gRPC, gRPC-Web)", path);
		x->status = 415;
		return;
	}

	/* compression, as each protocol names it */
	name = x->wire == WIRE_CONNECT ? "content-encoding"
	       : x->wire == WIRE_CONNECT_STREAM ? "connect-content-encoding" : "grpc-encoding";
	enc = header(ctx, name);
	accept = header(ctx, x->wire == WIRE_CONNECT ? "accept-encoding"
			     : x->wire == WIRE_CONNECT_STREAM ? "connect-accept-encoding" : "grpc-accept-encoding");
	if (enc && strcasecmp(enc, "identity") && strcasecmp(enc, "gzip"))
		return fail(x, IB_CONNECT_UNIMPLEMENTED, "%s '%.32s' is not supported (gzip or identity)", name, enc);
	if (x->wire == WIRE_CONNECT)
		x->gzip_body = enc && !strcasecmp(enc, "gzip");
	else
		x->gzip_msgs = enc && !strcasecmp(enc, "gzip");
	x->gzip_out = ib_http_accepts_gzip(accept);
	if (x->wire == WIRE_CONNECT && header(ctx, "connect-protocol-version") &&
	    strcmp(header(ctx, "connect-protocol-version"), "1"))
		return fail(x, IB_CONNECT_INVALID_ARGUMENT, "connect-protocol-version: '%.16s' is not supported (1)",
			    header(ctx, "connect-protocol-version"));
	/* a framed answer's headers are known now, whenever its first message comes */
	if (framed(x))
		start_response(x);
}

/* A whole message of the request, uncompressed: run it. */
static void on_message(srv_exchange *x, const char *data, size_t len)
{
	json_t *msg = NULL, *ans;

	switch (x->svc) {
	case SVC_IMAGEBUILDER: {
		unsigned char digest[IB_SHA256_LEN];

		if (x->call.k == RPC_BUILD_IMAGE) {
			ib_http_sha256(digest, data ? data : "", len);
			x->call.digest = digest;
			if (srv_answer_lookup(x->srv, digest, x->call.image_id, x->call.build_id)) {
				x->call.cached = 1;
				send_message(x, srv_cached_answer(x->srv, x->call.image_id, x->call.build_id));
				finish(x, -1, NULL);
				x->call.digest = NULL;
				return;
			}
		}
		call_outcome(x, srv_call_run(&x->call, x->proto, data, len));
		x->call.digest = NULL;
		return;
	}
	case SVC_HEALTH_CHECK:
	case SVC_HEALTH_WATCH:
	case SVC_REFLECTION:
		break;
	}
	if (srv_call_decode(&x->call, in_desc(x), x->proto, data, len, &msg) < 0)
		return finish(x, (int)x->call.code, x->call.message);
	if (x->svc == SVC_REFLECTION) {
		send_message(x, srv_reflect(msg));
		if (!framed(x))
			finish(x, -1, NULL); /* Connect unary: one request, one answer */
		else if (srv_exchange_pending(x) > EXCHANGE_OUT_MAX)
			fail(x, IB_CONNECT_RESOURCE_EXHAUSTED, "reflection: more answers than the client reads");
	} else {
		const char *service = json_string_value(json_object_get(msg, "service"));
		ans = srv_health_status(x->srv, service ? service : "");
		if (x->svc == SVC_HEALTH_CHECK) {
			if (ans) {
				send_message(x, ans);
				finish(x, -1, NULL);
			} else {
				fail(x, IB_CONNECT_NOT_FOUND, "unknown service '%.128s'", service);
			}
		} else {
			json_decref(ans);
			x->service = ib_xstrdup(service ? service : "");
			x->running = true;
			srv_exchange_poll(x);
		}
	}
	json_decref(msg);
}

/* One envelope off the front of in: 1 taken (its message run), 0 incomplete, -1 failed. */
static int take_frame(srv_exchange *x)
{
	const unsigned char *p = (const unsigned char *)x->in.ptr;
	uint32_t len;
	char *plain = NULL;
	size_t plain_len = 0;

	if (x->in.len < 5)
		return 0;
	len = (uint32_t)p[1] << 24 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 8 | p[4];
	if (len > IB_SERVE_BODY_MAX) {
		fail(x, IB_CONNECT_RESOURCE_EXHAUSTED, "request: a %u byte message; at most %d are accepted", len,
		     IB_SERVE_BODY_MAX);
		return -1;
	}
	if (x->in.len - 5 < len)
		return 0;
	if (p[0] & FLAG_COMPRESSED) {
		int z;
		if (!x->gzip_msgs) {
			fail(x, IB_CONNECT_INTERNAL, "request: a compressed message, but no message encoding was named");
			return -1;
		}
		z = ib_http_gunzip(p + 5, len, IB_SERVE_BODY_MAX, &plain, &plain_len);
		if (z != 0) {
			if (z == 1)
				fail(x, IB_CONNECT_RESOURCE_EXHAUSTED, "request: more than %d bytes once decompressed",
				     IB_SERVE_BODY_MAX);
			else
				fail(x, IB_CONNECT_INVALID_ARGUMENT, "request: %s", ib_error_last());
			return -1;
		}
	} else {
		plain = ib_xmalloc(len + 1);
		memcpy(plain, p + 5, len);
		plain_len = len;
	}
	memmove(x->in.ptr, x->in.ptr + 5 + len, x->in.len - 5 - len);
	x->in.len -= 5 + (size_t)len;
	on_message(x, plain, plain_len);
	free(plain);
	return 1;
}

void srv_exchange_data(srv_exchange *x, const void *data, size_t len)
{
	if (x->done || x->in_too_large)
		return;
	if (x->in.len + len > (size_t)IB_SERVE_BODY_MAX * 2) {
		x->in_too_large = true;
		ib_buf_free(&x->in);
		return;
	}
	ib_buf_add(&x->in, data, len);
	/* reflection is a bidirectional stream: each request is answered as it comes */
	if (x->svc == SVC_REFLECTION && framed(x) && x->wire != WIRE_GRPC_WEB_TEXT)
		while (!x->done && take_frame(x) > 0)
			;
}

/* base64 pieces, each padded (gRPC-Web text may send several). */
static bool unbase64(ib_buf *b)
{
	ib_buf out = IB_BUF_INIT;
	size_t i = 0;

	while (i < b->len) {
		size_t n = 0, pad = 0;
		unsigned char *dec;
		int m;

		while (i + n < b->len && b->ptr[i + n] != '=')
			n++;
		while (i + n < b->len && b->ptr[i + n] == '=' && pad < 2) {
			n++;
			pad++;
		}
		if (n % 4) {
			ib_buf_free(&out);
			return false;
		}
		dec = ib_xmalloc(n / 4 * 3 + 1);
		m = EVP_DecodeBlock(dec, (const unsigned char *)b->ptr + i, (int)n);
		if (m < 0) {
			free(dec);
			ib_buf_free(&out);
			return false;
		}
		ib_buf_add(&out, dec, (size_t)m - pad); /* EVP_DecodeBlock counts the padding's bytes */
		free(dec);
		i += n;
	}
	ib_buf_free(b);
	*b = out;
	return true;
}

void srv_exchange_end(srv_exchange *x)
{
	if (x->done || x->ended)
		return;
	x->ended = true;
	if (x->in_too_large)
		return fail(x, IB_CONNECT_RESOURCE_EXHAUSTED, "request: at most %d bytes are accepted", IB_SERVE_BODY_MAX);
	if (x->wire == WIRE_GRPC_WEB_TEXT && !unbase64(&x->in))
		return fail(x, IB_CONNECT_INVALID_ARGUMENT, "request: not base64 (application/grpc-web-text)");
	if (!framed(x)) {
		if (x->gzip_body && x->in.len) {
			char *plain = NULL;
			size_t plain_len = 0;
			int z = ib_http_gunzip(x->in.ptr, x->in.len, IB_SERVE_BODY_MAX, &plain, &plain_len);
			if (z == 1)
				return fail(x, IB_CONNECT_RESOURCE_EXHAUSTED, "request: more than %d bytes once decompressed",
					    IB_SERVE_BODY_MAX);
			if (z < 0)
				return fail(x, IB_CONNECT_INVALID_ARGUMENT, "request: %s", ib_error_last());
			ib_buf_free(&x->in);
			ib_buf_add(&x->in, plain, plain_len);
			free(plain);
		}
		if (x->in.len > IB_SERVE_BODY_MAX)
			return fail(x, IB_CONNECT_RESOURCE_EXHAUSTED, "request: at most %d bytes are accepted",
				    IB_SERVE_BODY_MAX);
		on_message(x, x->in.ptr, x->in.len);
		ib_buf_free(&x->in);
		return;
	}
	if (x->svc == SVC_REFLECTION) {
		while (!x->done && take_frame(x) > 0)
			;
		if (!x->done && x->in.len)
			return fail(x, IB_CONNECT_INVALID_ARGUMENT, "request: a message cut short");
		return finish(x, -1, NULL);
	}
	switch (take_frame(x)) {
	case 0:
		return fail(x, IB_CONNECT_INVALID_ARGUMENT, "request: %s",
			    x->in.len ? "a message cut short" : "no message (a unary or server-streaming call takes one)");
	case 1:
		if (x->in.len && !x->done)
			fail(x, IB_CONNECT_INVALID_ARGUMENT, "request: more than one message");
		break;
	default:
		break;
	}
}

void srv_exchange_poll(srv_exchange *x)
{
	if (!x->running || x->done)
		return;
	if (x->svc == SVC_HEALTH_WATCH) {
		json_t *ans = srv_health_status(x->srv, x->service);
		const char *st;

		if (!ans)
			ans = json_pack("{s:s}", "status", "SERVICE_UNKNOWN");
		st = json_string_value(json_object_get(ans, "status"));
		if (strcmp(st, x->health_sent)) {
			snprintf(x->health_sent, sizeof(x->health_sent), "%s", st);
			send_message(x, ans);
		} else {
			json_decref(ans);
		}
		return;
	}
	if (x->call.wait_job) {
		int rc = srv_cancel_poll(&x->call);
		if (rc != SRV_CALL_WAIT)
			call_outcome(x, rc);
		return;
	}
	if (x->call.watch) {
		json_t *events = json_array(), *ev;
		size_t i;
		int rc = srv_watch_next(&x->call, events);

		json_array_foreach(events, i, ev)
			send_message(x, json_incref(ev));
		json_decref(events);
		if (rc == SRV_CALL_OK)
			finish(x, -1, NULL);
		else if (rc == SRV_CALL_ERROR)
			finish(x, (int)x->call.code, x->call.message);
	}
}

size_t srv_exchange_pending(const srv_exchange *x)
{
	return x->out.len - x->out_off;
}

size_t srv_exchange_take(srv_exchange *x, void *buf, size_t max)
{
	size_t n = srv_exchange_pending(x) < max ? srv_exchange_pending(x) : max;

	memcpy(buf, x->out.ptr + x->out_off, n);
	x->out_off += n;
	if (x->out_off == x->out.len) {
		x->out.len = x->out_off = 0;
	} else if (x->out_off > 64 * 1024 && x->out_off > x->out.len / 2) {
		/* now and then, not every call: taking stays linear */
		memmove(x->out.ptr, x->out.ptr + x->out_off, x->out.len - x->out_off);
		x->out.len -= x->out_off;
		x->out_off = 0;
	}
	return n;
}

void srv_exchange_abort(srv_exchange *x, const char *why)
{
	if (!x->done)
		fail(x, IB_CONNECT_UNAVAILABLE, "%s", why);
}

void srv_exchange_free(srv_exchange *x)
{
	srv_call_clear(&x->call);
	ib_buf_free(&x->in);
	ib_buf_free(&x->out);
	free(x->grpc_message);
	free(x->service);
	memset(x, 0, sizeof(*x));
}

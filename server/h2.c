/*
 * One port, two HTTP versions.  The accept thread takes every connection
 * and peeks at its first bytes: the HTTP/2 client preface (h2c with prior
 * knowledge, what gRPC clients send) gets a thread of its own running an
 * nghttp2 server session; anything else is HTTP/1.1 and goes to
 * libmicrohttpd (MHD_add_connection).
 *
 * An HTTP/2 connection's thread reads frames, runs each stream's exchange
 * (wire.c) and writes its answer; while a stream runs (WatchBuild, a
 * CancelBuild wait, Health.Watch) the thread polls it every tick.  Over
 * HTTP/2 only RPCs and /healthz are served: logs and images are HTTP/1.1
 * downloads.
 */
#include "server/server-internal.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <nghttp2/nghttp2.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#define PREFACE "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#define PREFACE_LEN 24
#define SNIFF_TIMEOUT 10.0        /* seconds a new connection may stay silent */
#define H2_TICK_MS 100            /* a connection with running streams polls them this often */
#define H2_MAX_STREAMS 128        /* concurrent streams a client may open */
#define H2_HEADERS_MAX (64 * 1024) /* bytes of request headers per stream */
#define H2_SEND_TIMEOUT 30        /* seconds a client may leave our writes unread */
#define H2_REQUEST_TIMEOUT 60.0   /* seconds from a stream's HEADERS to the end of its request */
#define H2_OUT_HIGH (64 * 1024)   /* answer bytes a stream may have unsent before it is polled again */
#define H2_CONN_BODY_MAX (4 * (size_t)IB_SERVE_BODY_MAX) /* request bytes held at once per connection */
#define H2_CONNS_MAX 1024         /* HTTP/2 connections (threads) at once */
#define PENDING_MAX 1024          /* connections not yet sniffed */

typedef struct h2_header {
	char *name, *value;
} h2_header;

typedef struct h2_stream {
	int32_t id;
	struct h2_conn *conn;
	h2_header *headers;
	size_t nheaders, header_bytes;
	char method[16];
	char *path;
	srv_exchange x;
	bool begun;       /* the exchange has the headers */
	bool responded;   /* the response headers are submitted */
	bool deferred;    /* the data provider waits for output */
	bool plain;       /* not an RPC: a fixed answer in x.out */
	uint64_t bytes;
	double t0;
	struct h2_stream *next;
} h2_stream;

typedef struct h2_conn {
	ib_server *srv;
	int fd;
	nghttp2_session *s;
	h2_stream *streams;
	char remote[46];
	bool goaway;
	double idle_since;
} h2_conn;

/* ---- streams ---- */

static const char *stream_header(void *ctx, const char *name)
{
	h2_stream *st = ctx;

	for (size_t i = 0; i < st->nheaders; i++)
		if (!strcmp(st->headers[i].name, name))
			return st->headers[i].value;
	return NULL;
}

static void stream_free(h2_stream *st)
{
	for (size_t i = 0; i < st->nheaders; i++) {
		free(st->headers[i].name);
		free(st->headers[i].value);
	}
	free(st->headers);
	free(st->path);
	srv_exchange_free(&st->x);
	free(st);
}

static void stream_log(h2_conn *hc, h2_stream *st, uint32_t error_code)
{
	ib_server *srv = hc->srv;
	srv_exchange *x = &st->x;
	unsigned status = x->status ? x->status : 200;
	double seconds = ib_now() - st->t0;
	rpc_kind k = st->path ? srv_rpc_of(st->path) : RPC_NONE;
	ib_endpoint ep = st->plain ? IB_EP_HEALTHZ
			 : x->svc == SVC_HEALTH_CHECK || x->svc == SVC_HEALTH_WATCH ? IB_EP_HEALTH
			 : x->svc == SVC_REFLECTION ? IB_EP_REFLECTION
			 : k != RPC_NONE ? srv_rpcs[k].ep : IB_EP_OTHER;
	srv_access a = {
		.method = st->method, .path = st->path ? st->path : "", .remote = hc->remote,
		.protocol = st->plain ? NULL : srv_wire_name(x->wire), .http = "2", .ep = ep, .status = status,
		.seconds = seconds, .bytes = st->bytes, .code = x->call.message ? ib_connect_code_name(x->call.code) : NULL,
		.message = x->call.message, .build_id = x->call.build_id, .image_id = x->call.image_id,
		.cached = x->call.cached, .aborted = error_code != NGHTTP2_NO_ERROR || !x->done,
	};

	if (st->plain || x->wire != WIRE_NONE)
		ib_metrics_request(srv->metrics, ep, status, seconds);
	srv_log_access(srv, &a);
}

/* nghttp2's data source: what the exchange has; deferred until it has more. */
static ssize_t read_out(nghttp2_session *s, int32_t id, uint8_t *buf, size_t length, uint32_t *flags,
			nghttp2_data_source *source, void *user)
{
	h2_stream *st = source->ptr;
	srv_exchange *x = &st->x;
	size_t n = srv_exchange_take(x, buf, length);

	(void)user;
	st->bytes += n;
	if (!srv_exchange_pending(x) && x->done) {
		*flags |= NGHTTP2_DATA_FLAG_EOF;
		if (x->wire == WIRE_GRPC) {
			char code[12];
			nghttp2_nv tr[2] = {
				{ (uint8_t *)"grpc-status", (uint8_t *)code, 11, 0, NGHTTP2_NV_FLAG_NONE },
				{ (uint8_t *)"grpc-message", (uint8_t *)(x->grpc_message ? x->grpc_message : ""), 12,
				  x->grpc_message ? strlen(x->grpc_message) : 0, NGHTTP2_NV_FLAG_NONE },
			};
			tr[0].valuelen = (size_t)snprintf(code, sizeof(code), "%d", x->grpc_status);
			*flags |= NGHTTP2_DATA_FLAG_NO_END_STREAM;
			if (nghttp2_submit_trailer(s, id, tr, x->grpc_message ? 2 : 1) != 0)
				return NGHTTP2_ERR_CALLBACK_FAILURE;
		}
		return (ssize_t)n;
	}
	if (!n) {
		st->deferred = true;
		return NGHTTP2_ERR_DEFERRED;
	}
	return (ssize_t)n;
}

#define NV(n, v) { (uint8_t *)(n), (uint8_t *)(v), sizeof(n) - 1, strlen(v), NGHTTP2_NV_FLAG_NONE }

/* Submit what the stream has: its response headers once, then resume the data. */
static void stream_flush(h2_conn *hc, h2_stream *st)
{
	srv_exchange *x = &st->x;
	char status[12], code[12];
	nghttp2_nv nva[8];
	size_t n = 0;
	nghttp2_data_provider prd = { .source.ptr = st, .read_callback = read_out };

	if (st->responded) {
		if (st->deferred && (srv_exchange_pending(x) || x->done)) {
			st->deferred = false;
			nghttp2_session_resume_data(hc->s, st->id);
		}
		return;
	}
	if (!srv_exchange_pending(x) && !x->done && !(x->status && x->wire != WIRE_CONNECT))
		return; /* nothing yet: the headers go with the first message (or at once, when framed) */
	st->responded = true;
	snprintf(status, sizeof(status), "%u", x->status ? x->status : 200);
	nva[n++] = (nghttp2_nv)NV(":status", status);
	nva[n++] = (nghttp2_nv)NV("content-type", x->ctype[0] ? x->ctype : "application/json");
	if (x->content_encoding)
		nva[n++] = (nghttp2_nv)NV("content-encoding", x->content_encoding);
	if (x->msg_encoding)
		nva[n++] = x->wire == WIRE_CONNECT_STREAM ? (nghttp2_nv)NV("connect-content-encoding", x->msg_encoding)
							  : (nghttp2_nv)NV("grpc-encoding", x->msg_encoding);
	if (x->wire == WIRE_GRPC && x->done && !srv_exchange_pending(x)) {
		/* trailers-only: the status in the one HEADERS frame */
		snprintf(code, sizeof(code), "%d", x->grpc_status);
		nva[n++] = (nghttp2_nv)NV("grpc-status", code);
		if (x->grpc_message)
			nva[n++] = (nghttp2_nv)NV("grpc-message", x->grpc_message);
		if (nghttp2_submit_response(hc->s, st->id, nva, n, NULL) != 0)
			nghttp2_submit_rst_stream(hc->s, NGHTTP2_FLAG_NONE, st->id, NGHTTP2_INTERNAL_ERROR);
		return;
	}
	if (nghttp2_submit_response(hc->s, st->id, nva, n, &prd) != 0)
		nghttp2_submit_rst_stream(hc->s, NGHTTP2_FLAG_NONE, st->id, NGHTTP2_INTERNAL_ERROR);
}

/* A fixed answer that is not an RPC. */
static void plain_answer(h2_stream *st, unsigned status, const char *ctype, const char *body)
{
	st->plain = true;
	memset(&st->x, 0, sizeof(st->x));
	st->x.call.cached = -1;
	st->x.status = status;
	snprintf(st->x.ctype, sizeof(st->x.ctype), "%s", ctype);
	ib_buf_puts(&st->x.out, body);
	st->x.done = true;
	st->x.ended = true;
}

/* The request's headers are in. */
static void stream_begin(h2_conn *hc, h2_stream *st)
{
	const char *method = stream_header(st, ":method"), *path = stream_header(st, ":path");

	snprintf(st->method, sizeof(st->method), "%s", method ? method : "");
	st->path = ib_xstrdup(path ? path : "");
	st->begun = true;
	if (!strcmp(st->path, "/healthz")) {
		bool draining;
		pthread_mutex_lock(&hc->srv->mu);
		draining = hc->srv->draining;
		pthread_mutex_unlock(&hc->srv->mu);
		plain_answer(st, draining ? 503 : 200, "text/plain", draining ? "draining\n" : "ok\n");
		return;
	}
	if (strcmp(st->method, "POST")) {
		char *body = ib_connect_error_body(IB_CONNECT_UNIMPLEMENTED,
						   "over HTTP/2 only RPCs (POST) and /healthz are served; "
						   "logs and images are HTTP/1.1 downloads");
		plain_answer(st, 405, "application/json", body);
		free(body);
		return;
	}
	srv_exchange_begin(&st->x, hc->srv, st->path, stream_header, st, true);
}

/* ---- nghttp2 callbacks ---- */

static bool stopping(ib_server *srv)
{
	bool stop;

	pthread_mutex_lock(&srv->mu);
	stop = srv->h2_stop;
	pthread_mutex_unlock(&srv->mu);
	return stop;
}

/*
 * Everything nghttp2 has to send, in as few writes as it takes (small
 * writes would meet Nagle).  A client that leaves it unread for
 * H2_SEND_TIMEOUT in all, or while the server stops, loses the connection.
 */
static int conn_send(h2_conn *hc)
{
	double deadline = ib_now() + H2_SEND_TIMEOUT;

	for (;;) {
		const uint8_t *data;
		ssize_t n = nghttp2_session_mem_send(hc->s, &data), w;
		size_t off = 0;

		if (n < 0)
			return -1;
		if (n == 0)
			return 0;
		while (off < (size_t)n) {
			struct pollfd pfd = { .fd = hc->fd, .events = POLLOUT };

			w = send(hc->fd, data + off, (size_t)n - off, MSG_NOSIGNAL | MSG_DONTWAIT);
			if (w > 0) {
				off += (size_t)w;
				continue;
			}
			if (w < 0 && errno != EINTR && errno != EAGAIN)
				return -1;
			if (ib_now() > deadline || stopping(hc->srv))
				return -1;
			poll(&pfd, 1, H2_TICK_MS);
		}
	}
}

static int on_begin_headers(nghttp2_session *s, const nghttp2_frame *frame, void *user)
{
	h2_conn *hc = user;
	h2_stream *st;

	if (frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST)
		return 0;
	st = ib_xcalloc(1, sizeof(*st));
	st->id = frame->hd.stream_id;
	st->conn = hc;
	st->t0 = ib_now();
	st->next = hc->streams;
	hc->streams = st;
	nghttp2_session_set_stream_user_data(s, st->id, st);
	return 0;
}

static int on_header(nghttp2_session *s, const nghttp2_frame *frame, const uint8_t *name, size_t namelen,
		     const uint8_t *value, size_t valuelen, uint8_t flags, void *user)
{
	h2_stream *st = nghttp2_session_get_stream_user_data(s, frame->hd.stream_id);

	(void)flags;
	(void)user;
	if (!st || st->begun)
		return 0; /* trailers of a request: nothing we read */
	st->header_bytes += namelen + valuelen + 32;
	if (st->header_bytes > H2_HEADERS_MAX)
		return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE; /* resets the stream */
	st->headers = ib_xrealloc(st->headers, (st->nheaders + 1) * sizeof(*st->headers));
	st->headers[st->nheaders].name = ib_xstrndup((const char *)name, namelen);
	st->headers[st->nheaders].value = ib_xstrndup((const char *)value, valuelen);
	st->nheaders++;
	return 0;
}

static int on_frame_recv(nghttp2_session *s, const nghttp2_frame *frame, void *user)
{
	h2_conn *hc = user;
	h2_stream *st = nghttp2_session_get_stream_user_data(s, frame->hd.stream_id);

	if (!st || (frame->hd.type != NGHTTP2_HEADERS && frame->hd.type != NGHTTP2_DATA))
		return 0;
	if (!st->begun)
		stream_begin(hc, st);
	if (frame->hd.flags & NGHTTP2_FLAG_END_STREAM)
		srv_exchange_end(&st->x);
	stream_flush(hc, st);
	return 0;
}

static int on_data(nghttp2_session *s, uint8_t flags, int32_t id, const uint8_t *data, size_t len, void *user)
{
	h2_conn *hc = user;
	h2_stream *st = nghttp2_session_get_stream_user_data(s, id);

	(void)flags;
	if (!st)
		return 0;
	if (!st->begun)
		stream_begin(hc, st);
	if (!st->plain) {
		size_t held = 0;
		for (h2_stream *o = hc->streams; o; o = o->next)
			held += o->x.in.len;
		if (held + len > H2_CONN_BODY_MAX) {
			/* too much at once on this connection: this request fails (resource_exhausted) */
			st->x.in_too_large = true;
			ib_buf_free(&st->x.in);
		}
		srv_exchange_data(&st->x, data, len);
	}
	stream_flush(hc, st);
	return 0;
}

static int on_stream_close(nghttp2_session *s, int32_t id, uint32_t error_code, void *user)
{
	h2_conn *hc = user;
	h2_stream *st = nghttp2_session_get_stream_user_data(s, id);

	if (!st)
		return 0;
	for (h2_stream **pp = &hc->streams; *pp; pp = &(*pp)->next)
		if (*pp == st) {
			*pp = st->next;
			break;
		}
	if (st->begun)
		stream_log(hc, st, error_code);
	stream_free(st);
	hc->idle_since = ib_now();
	return 0;
}

/* ---- a connection ---- */

static void conn_run(h2_conn *hc)
{
	ib_server *srv = hc->srv;
	nghttp2_session_callbacks *cb;
	nghttp2_settings_entry iv[] = {
		{ NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, H2_MAX_STREAMS },
		{ NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, H2_HEADERS_MAX },
	};
	int one = 1;
	uint8_t buf[16 * 1024];

	setsockopt(hc->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	nghttp2_session_callbacks_new(&cb);
	nghttp2_session_callbacks_set_on_begin_headers_callback(cb, on_begin_headers);
	nghttp2_session_callbacks_set_on_header_callback(cb, on_header);
	nghttp2_session_callbacks_set_on_frame_recv_callback(cb, on_frame_recv);
	nghttp2_session_callbacks_set_on_data_chunk_recv_callback(cb, on_data);
	nghttp2_session_callbacks_set_on_stream_close_callback(cb, on_stream_close);
	if (nghttp2_session_server_new(&hc->s, cb, hc) != 0) {
		nghttp2_session_callbacks_del(cb);
		return;
	}
	nghttp2_session_callbacks_del(cb);
	nghttp2_submit_settings(hc->s, NGHTTP2_FLAG_NONE, iv, sizeof(iv) / sizeof(iv[0]));
	hc->idle_since = ib_now();

	for (double stop_at = 0, polled = 0;;) {
		struct pollfd pfd = { .fd = hc->fd, .events = POLLIN };
		bool running = false, stop, draining, tick;
		double now = ib_now();
		ssize_t n;

		pthread_mutex_lock(&srv->mu);
		stop = srv->h2_stop;
		draining = srv->draining;
		pthread_mutex_unlock(&srv->mu);
		/* running streams move on once a tick, however much the client sends */
		tick = now - polled >= H2_TICK_MS / 1e3;
		if (tick)
			polled = now;
		for (h2_stream *st = hc->streams; st; st = st->next) {
			if (!st->begun)
				continue;
			if (!st->x.ended && now - st->t0 > H2_REQUEST_TIMEOUT) {
				/* a request that never ends holds no thread */
				nghttp2_submit_rst_stream(hc->s, NGHTTP2_FLAG_NONE, st->id, NGHTTP2_CANCEL);
				continue;
			}
			if (stop)
				srv_exchange_abort(&st->x, SHUTDOWN_MESSAGE);
			/* backpressure: a client that does not read gets no more made for it */
			if (tick && srv_exchange_pending(&st->x) < H2_OUT_HIGH)
				srv_exchange_poll(&st->x);
			stream_flush(hc, st);
			running = running || !st->x.done;
		}
		if ((draining || stop) && !hc->goaway) {
			/* no new streams; those open go on (until the server stops) */
			nghttp2_submit_goaway(hc->s, NGHTTP2_FLAG_NONE, nghttp2_session_get_last_proc_stream_id(hc->s),
					      NGHTTP2_NO_ERROR, NULL, 0);
			hc->goaway = true;
		}
		if (conn_send(hc) < 0)
			break;
		if (!nghttp2_session_want_read(hc->s) && !nghttp2_session_want_write(hc->s))
			break;
		if (stop && !stop_at)
			stop_at = now + 2; /* time for the last answers to go out */
		if ((!hc->streams && stop) || (stop_at && now > stop_at) ||
		    (!hc->streams && now - hc->idle_since > IB_SERVE_IDLE_TIMEOUT))
			break;
		n = poll(&pfd, 1, running || stop || draining || hc->streams ? H2_TICK_MS : 1000);
		if (n < 0 && errno != EINTR)
			break;
		if (n <= 0)
			continue;
		n = recv(hc->fd, buf, sizeof(buf), MSG_DONTWAIT);
		if (n < 0 && (errno == EINTR || errno == EAGAIN))
			continue;
		if (n <= 0)
			break;
		if (nghttp2_session_mem_recv(hc->s, buf, (size_t)n) < 0) {
			conn_send(hc); /* the GOAWAY nghttp2 queued says why */
			break;
		}
	}
	nghttp2_session_del(hc->s);
	/* streams the connection ended with (nghttp2 calls no callback for them) */
	while (hc->streams) {
		h2_stream *st = hc->streams;
		hc->streams = st->next;
		if (st->begun)
			stream_log(hc, st, NGHTTP2_CANCEL);
		stream_free(st);
	}
}

static void *conn_main(void *arg)
{
	h2_conn *hc = arg;
	ib_server *srv = hc->srv;

	conn_run(hc);
	close(hc->fd);
	free(hc);
	pthread_mutex_lock(&srv->mu);
	srv->h2_conns--;
	pthread_cond_broadcast(&srv->done_cv);
	pthread_mutex_unlock(&srv->mu);
	return NULL;
}

static void start_h2(ib_server *srv, int fd, const struct sockaddr *sa)
{
	h2_conn *hc = ib_xcalloc(1, sizeof(*hc));
	pthread_attr_t attr;
	pthread_t t;

	hc->srv = srv;
	hc->fd = fd;
	srv_sockaddr_text(hc->remote, sa);
	pthread_mutex_lock(&srv->mu);
	if (srv->h2_conns >= H2_CONNS_MAX) {
		pthread_mutex_unlock(&srv->mu);
		close(fd);
		free(hc);
		return;
	}
	srv->h2_conns++;
	pthread_mutex_unlock(&srv->mu);
	pthread_attr_init(&attr);
	pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
	if (pthread_create(&t, &attr, conn_main, hc) != 0) {
		pthread_mutex_lock(&srv->mu);
		srv->h2_conns--;
		pthread_mutex_unlock(&srv->mu);
		close(fd);
		free(hc);
	}
	pthread_attr_destroy(&attr);
}

/* ---- accepting and sniffing ---- */

typedef struct pending {
	int fd;
	double since;
	struct sockaddr_storage addr;
	socklen_t addrlen;
	bool ready; /* it sent something since it was last looked at */
	bool hup;   /* and then hung up: what it sent is all there will be */
	struct pending *next;
} pending;

static void drop(pending **pp)
{
	pending *p = *pp;

	*pp = p->next;
	free(p);
}

/* What the first bytes say: 1 HTTP/2, 0 HTTP/1.x, -1 not yet known, -2 closed. */
static int sniff(int fd)
{
	char b[PREFACE_LEN];
	ssize_t n = recv(fd, b, sizeof(b), MSG_PEEK | MSG_DONTWAIT);

	if (n < 0)
		return errno == EAGAIN || errno == EINTR ? -1 : -2;
	if (n == 0)
		return -2;
	if (memcmp(b, PREFACE, (size_t)n))
		return 0;
	return n == PREFACE_LEN ? 1 : -1;
}

/* A pending connection is decided: HTTP/2, HTTP/1.1, or closed (silent too long, gone, stopping). */
static void decide(ib_server *srv, int ep, pending *p, int kind)
{
	epoll_ctl(ep, EPOLL_CTL_DEL, p->fd, NULL);
	if (kind == 1)
		start_h2(srv, p->fd, (struct sockaddr *)&p->addr);
	else if (kind == 0) /* on failure (over its connection limit) MHD closes it */
		MHD_add_connection(srv->mhd, p->fd, (struct sockaddr *)&p->addr, p->addrlen);
	else
		close(p->fd);
}

static void *accept_main(void *arg)
{
	static char listen_mark, wake_mark;
	ib_server *srv = arg;
	pending *list = NULL;
	size_t npending = 0;
	int ep = epoll_create1(EPOLL_CLOEXEC);
	struct epoll_event ev = { .events = EPOLLIN, .data.ptr = &listen_mark };

	if (ep < 0)
		abort(); /* no fd left at start: nothing to serve with */
	epoll_ctl(ep, EPOLL_CTL_ADD, srv->listen_fd, &ev);
	ev.data.ptr = &wake_mark;
	epoll_ctl(ep, EPOLL_CTL_ADD, srv->accept_wake, &ev);
	for (bool stop = false; !stop;) {
		struct epoll_event evs[64];
		int n = epoll_wait(ep, evs, 64, 1000);
		double now = ib_now();

		for (int i = 0; i < n; i++) {
			if (evs[i].data.ptr == &wake_mark) {
				stop = true;
			} else if (evs[i].data.ptr == &listen_mark) {
				for (;;) {
					pending *p = ib_xcalloc(1, sizeof(*p));
					p->addrlen = sizeof(p->addr);
					p->fd = accept4(srv->listen_fd, (struct sockaddr *)&p->addr, &p->addrlen,
							SOCK_CLOEXEC | SOCK_NONBLOCK);
					if (p->fd < 0) {
						free(p);
						if (errno == EMFILE || errno == ENFILE)
							usleep(100 * 1000); /* out of fds: the backlog waits */
						break;
					}
					if (npending >= PENDING_MAX) {
						/* a flood of silent connections: the oldest goes */
						pending **pp = &list;
						while ((*pp)->next)
							pp = &(*pp)->next;
						decide(srv, ep, *pp, -2);
						drop(pp);
						npending--;
					}
					npending++;
					p->since = now;
					p->next = list;
					list = p;
					/* edge-triggered: a partial preface held back does not spin */
					ev.events = EPOLLIN | EPOLLRDHUP | EPOLLET;
					ev.data.ptr = p;
					epoll_ctl(ep, EPOLL_CTL_ADD, p->fd, &ev);
					ev.events = EPOLLIN;
				}
			} else {
				pending *p = evs[i].data.ptr;
				p->ready = true;
				p->hup = p->hup || (evs[i].events & (EPOLLRDHUP | EPOLLHUP | EPOLLERR));
			}
		}
		/* the pending connections that sent something, timed out, or all when stopping */
		for (pending **pp = &list; *pp;) {
			pending *p = *pp;
			int kind = stop ? -2 : p->ready ? sniff(p->fd) : -1;

			p->ready = false;
			if (kind == -1 && now - p->since < SNIFF_TIMEOUT && !p->hup) {
				pp = &p->next;
				continue;
			}
			decide(srv, ep, p, kind == -1 ? -2 : kind);
			drop(pp);
			npending--;
		}
	}
	close(ep);
	return NULL;
}

int srv_accept_start(ib_server *srv)
{
	int err;

	srv->accept_wake = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	if (srv->accept_wake < 0)
		return ib_error_set_errno(errno, "eventfd");
	if ((err = pthread_create(&srv->acceptor, NULL, accept_main, srv)) != 0) {
		close(srv->accept_wake);
		srv->accept_wake = -1;
		return ib_error_set_errno(err, "cannot start the accept thread");
	}
	srv->accepting = true;
	return 0;
}

void srv_accept_stop(ib_server *srv)
{
	uint64_t one = 1;

	if (!srv->accepting)
		return;
	srv->accepting = false;
	if (write(srv->accept_wake, &one, sizeof(one)) < 0)
		abort();
	pthread_join(srv->acceptor, NULL);
	close(srv->accept_wake);
	srv->accept_wake = -1;
}

void srv_h2_stop(ib_server *srv)
{
	pthread_mutex_lock(&srv->mu);
	srv->h2_stop = true;
	while (srv->h2_conns)
		pthread_cond_wait(&srv->done_cv, &srv->mu);
	pthread_mutex_unlock(&srv->mu);
}

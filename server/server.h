#ifndef IB_SERVER_H
#define IB_SERVER_H

#include <stdbool.h>

#include "builder/config.h"
#include "cache/cache.h"

/*
 * The BuildImage service (CONTRACT.md section 5): Connect unary JSON RPCs
 * and a few plain HTTP endpoints over libmicrohttpd, a queue of builds run
 * by a fixed set of builder threads, build records in the cache index.
 *
 *   server.c   lifecycle: lock, recovery, listener, threads, shutdown
 *   http.c     routing, responses, the structured log, libmicrohttpd glue
 *   rpc.c      the ImageBuilder methods
 *   queue.c    jobs, the queue, the builder threads (submit, join, cancel)
 *   files.c    build logs and image files
 *   builds.c   build records;  metrics.c  Prometheus text;  httputil.c  pure HTTP helpers
 *
 * One daemon per cache dir (a lock file says so); CLI builds on the same
 * dir may run beside it, sharing layers through the per-layer locks.
 */
typedef struct ib_server ib_server;

/* How libmicrohttpd waits for sockets: both run a pool of http_threads. */
typedef enum ib_server_http_mode {
	IB_HTTP_EPOLL, /* each pool thread waits with its own epoll set */
	IB_HTTP_POLL,  /* each pool thread waits with poll(2) */
} ib_server_http_mode;

typedef struct ib_server_opts {
	const char *listen;        /* "HOST:PORT"; port 0 picks a free one */
	const char *token;         /* bearer token every request but /healthz needs; NULL: none */
	unsigned jobs;             /* builds that run at once (>= 1) */
	unsigned http_threads;     /* 0: one per CPU */
	ib_server_http_mode http_mode;
	bool cancel_on_shutdown;   /* shutdown cancels running builds instead of waiting */
	const char *public_url;    /* base of rootfs_url ("http://host:port"); NULL: the request's Host */
	int log_fd;                /* one JSON line per request and build event; -1: none */
	const ib_config *cfg;      /* the builds' configuration; must outlive the server */
} ib_server_opts;

/*
 * Take the cache dir's daemon lock, recover what a previous daemon left
 * (builds not finished become FAILED "interrupted", scratch dirs are
 * removed), start the builder threads and listen.  The cache must outlive
 * the server.  IB_EEXISTS when another daemon serves the same dir.
 */
int ib_server_start(ib_server **out, ib_cache *cache, const ib_server_opts *opts);

/* The port actually bound (useful with port 0). */
unsigned ib_server_port(const ib_server *srv);

/*
 * Shutting down, in steps so that a caller can react to signals meanwhile:
 *
 * ib_server_stop_accepting(): the listening socket is closed to new
 * connections, queued builds end CANCELLED (they never started), and new
 * builds are refused with unavailable; requests on open connections are
 * still answered.  With opts.cancel_on_shutdown it also cancels the
 * running builds.
 *
 * ib_server_cancel_running(): cancel every running build (CANCELLED, the
 * message saying the server shut down).
 *
 * ib_server_wait_idle(): wait up to timeout seconds for no build to be
 * running; true when none is.
 */
void ib_server_stop_accepting(ib_server *srv);
void ib_server_cancel_running(ib_server *srv);
bool ib_server_wait_idle(ib_server *srv, double timeout);

/* Stop (cancelling running builds if any are left), join every thread, free. */
void ib_server_free(ib_server *srv);

#endif

#ifndef IB_SERVER_H
#define IB_SERVER_H

#include <stdbool.h>

#include "cache/cache.h"

/*
 * The BuildImage service (CONTRACT.md section 5): Connect unary JSON RPCs
 * and a few plain HTTP endpoints over libmicrohttpd, a queue of builds run
 * by a fixed set of builder threads, build records in the cache index.
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
	const char *apt_mirror;    /* as in ib_build_opts */
	const char *pip_index_url;
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
 * Stop accepting connections, fail queued builds as cancelled, then wait
 * for running builds to finish, or cancel them when cancel_running (or
 * opts.cancel_on_shutdown) is set.  Requests on open connections are still
 * answered meanwhile (new builds are refused with unavailable).  May be
 * called again, e.g. with cancel_running on a second signal; safe to call
 * from another thread while a first call waits.
 */
void ib_server_shutdown(ib_server *srv, bool cancel_running);

/* Shut down (if not done) and free. */
void ib_server_free(ib_server *srv);

#endif

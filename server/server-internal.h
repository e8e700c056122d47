#ifndef IB_SERVER_INTERNAL_H
#define IB_SERVER_INTERNAL_H

/*
 * Shared by the files of server/ only.
 *
 * Threads:
 *
 *   libmicrohttpd's pool    parses requests and answers them (http.c, rpc.c,
 *                           files.c); never waits for a build (CancelBuild
 *                           suspends its connection instead, see the waiters)
 *   builders (--jobs N)     take queued builds and run ib_build_run() (queue.c)
 *   timer                   resumes CancelBuild connections whose wait ran out
 *
 * Builds in memory ("jobs") are on one list, newest last: every queued and
 * running build, and the last IB_SERVE_RECENT_MAX finished ones.  Older
 * builds are answered from their records in the cache index (builds.c).
 * Everything a job has that changes (status, the queue links, refs) is
 * guarded by srv->mu; the layer states inside job->b by the build itself.
 */
#include <imagebuilder/v1/imagebuilder.pb-c.h>
#include <jansson.h>
#include <microhttpd.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "builder/build.h"
#include "builder/config.h"
#include "cache/cache.h"
#include "lib/crash.h"
#include "lib/limits.h"
#include "lib/util.h"
#include "server/builds.h"
#include "server/httputil.h"
#include "server/metrics.h"
#include "server/pbjson.h"
#include "server/server.h"
#include "spec/spec.h"

#define RPC_PREFIX "/imagebuilder.v1.ImageBuilder/"
#define TOUCH_SLOTS 256
#define ANSWER_SLOTS 1024
#define ANSWER_TTL 1.0   /* seconds a remembered cached answer is trusted without the index */
#define TOUCH_EVERY 60.0 /* seconds between last_used updates of one image */
#define SHUTDOWN_MESSAGE "cancelled: the server shut down"
#define INTERRUPTED_MESSAGE "interrupted: the server stopped before the build finished"

typedef enum job_status {
	ST_QUEUED,
	ST_BUILDING,
	ST_READY,
	ST_FAILED,
	ST_CANCELLED,
	ST_TIMEOUT,
} job_status;

/* "QUEUED", ... indexed by job_status */
extern const char *const srv_status_names[];

#define IS_FINAL(s) ((s) >= ST_READY)

typedef struct job {
	struct job *prev, *next; /* srv->jobs */
	struct job *qnext;       /* srv->queue */
	unsigned refs;
	bool queued;             /* on srv->queue */
	bool inserting;          /* its record is being written; not runnable yet */
	char id[IB_BUILD_ID_MAX];
	char image_id[IB_SHA256_HEX];
	ib_spec *spec;
	ib_build *b;
	bool force;
	int64_t timeout_s;
	ib_limits limits;        /* the request's, within the server's */
	volatile int cancel;     /* the runner polls it */
	bool shutdown_cancel;    /* cancelled by the server, not a client */
	job_status status;
	double created, started, finished; /* wall clock */
	double run_t0;           /* ib_now() at start */
	/* outcome, set with the final status */
	bool cached;
	int error_step;
	char *error;
	char *log_tail;
} job;

typedef enum req_phase { PHASE_NEW, PHASE_BODY, PHASE_WAITING, PHASE_RESUMED, PHASE_DONE } req_phase;

/* One HTTP request: made by the URI log callback, freed when it completes. */
typedef struct req {
	ib_server *srv;
	struct MHD_Connection *conn;
	double t0;
	char method[16];
	char *uri;
	req_phase phase;
	ib_endpoint ep;
	ib_buf body;
	bool too_large;
	bool read_first;     /* an error answered before the body waits for it (no EPIPE for the client) */
	struct MHD_Response *deferred; /* that answer, sent when the body is in */
	unsigned deferred_status;
	bool proto;          /* the request came, and the answer goes, as binary Protobuf */
	bool gzip_in;        /* the body is gzip (Content-Encoding) */
	bool gzip_out;       /* the client takes a gzip answer (Accept-Encoding) */
	int rpc;             /* rpc_kind of an RPC request */
	bool have_digest;
	unsigned char digest[IB_SHA256_LEN]; /* of a BuildImage body */
	unsigned status;     /* HTTP status queued, 0 none */
	const char *code;    /* Connect code of an error response */
	char *message;       /* its message */
	uint64_t length;     /* response body bytes */
	char build_id[IB_BUILD_ID_MAX];
	char image_id[IB_SHA256_HEX];
	int cached;          /* -1 n/a */
	struct srv_exchange *x; /* a framed RPC (Connect streaming, gRPC-Web): the exchange */
	struct MHD_Response *stream_resp;
	bool suspended;      /* a stream with nothing to send: on srv->streams until the next tick */
	struct req *snext;
	/* CancelBuild waiting for its build to stop */
	job *wait_job;
	double wait_deadline;
	struct req *wnext;
} req;

struct ib_server {
	ib_cache *cache;
	ib_builds *builds;
	ib_metrics *metrics;
	char *listen;
	char *public_url;
	const ib_config *cfg;
	bool auth;
	ib_http_token token;
	unsigned jobs;
	unsigned http_threads;
	ib_server_http_mode http_mode;
	bool cancel_on_shutdown;
	int log_fd;
	int lock_fd;
	int listen_fd;
	unsigned port;
	struct MHD_Daemon *mhd;   /* HTTP/1.1: connections the acceptor hands it */
	pthread_t acceptor;       /* accepts, and sends each connection to HTTP/1.1 or HTTP/2 (h2.c) */
	bool accepting;
	int accept_wake;          /* eventfd: the acceptor stops */
	unsigned h2_conns;        /* HTTP/2 connection threads alive (under mu) */
	bool h2_stop;             /* they end their streams and close (under mu) */
	double t_start;

	pthread_mutex_t mu;
	pthread_cond_t work_cv;  /* the queue has work, or stopping */
	pthread_cond_t done_cv;  /* a build finished */
	pthread_cond_t timer_cv; /* a waiter was added, or stopping */
	job *jobs_head, *jobs_tail;
	unsigned nfinished;      /* finished jobs on the list */
	job *queue_head, *queue_tail;
	unsigned nqueued, nbuilding, ninserting;
	req *waiters;
	req *streams;            /* suspended streaming answers, resumed each tick */
	bool draining, stopping;
	pthread_t *workers;
	unsigned nworkers;
	pthread_t timer;
	bool timer_running;

	pthread_mutex_t adopt_mu; /* one record for a cached image nobody built here */
	pthread_mutex_t touch_mu;
	struct {
		char id[IB_SHA256_HEX];
		double at;
	} touched[TOUCH_SLOTS];

	/*
	 * Cached answers to BuildImage bodies seen lately, by the SHA-256 of
	 * the body: a client polling with the same request skips parsing,
	 * planning and the index for ANSWER_TTL seconds (the image file is
	 * still checked each time).
	 */
	pthread_mutex_t answer_mu;
	struct answer {
		unsigned char key[IB_SHA256_LEN];
		bool used;
		double checked;
		char image_id[IB_SHA256_HEX];
		char build_id[IB_BUILD_ID_MAX];
		char *file; /* the image's file then (owned) */
	} answers[ANSWER_SLOTS];
};

/* ---- small helpers ---- */

typedef enum rpc_kind {
	RPC_NONE = -1,
	RPC_BUILD_IMAGE,
	RPC_GET_BUILD,
	RPC_CANCEL_BUILD,
	RPC_GET_IMAGE,
	RPC_WATCH_BUILD,
	RPC_COUNT,
} rpc_kind;

/* The methods, indexed by rpc_kind (rpc.c). */
typedef struct srv_rpc {
	const char *name;
	ib_endpoint ep;
	bool side_effect_free; /* may come as a Connect GET */
	const ProtobufCMessageDescriptor *in, *out; /* its messages (proto/imagebuilder/v1) */
	bool streaming;        /* server-streaming: out is each message of the stream */
} srv_rpc;

typedef struct srv_watch srv_watch;

/*
 * One RPC, whatever carried it (Connect, gRPC, gRPC-Web; HTTP/1.1 or
 * HTTP/2): what a handler reads, and its outcome.  Handlers return
 * SRV_CALL_OK with answer set, SRV_CALL_ERROR with code and message set,
 * or SRV_CALL_WAIT: CancelBuild waits for its build to stop (the request r
 * is suspended, or without r the caller polls srv_cancel_poll()).
 * WatchBuild answers SRV_CALL_OK with watch set, read by srv_watch_next().
 */
enum { SRV_CALL_ERROR = -1, SRV_CALL_OK = 0, SRV_CALL_WAIT = 1 };

typedef struct srv_call {
	ib_server *srv;
	rpc_kind k;
	char *host;                  /* Host or :authority (owned), for absolute URLs; NULL none */
	struct req *r;               /* over libmicrohttpd: the request CancelBuild suspends */
	const unsigned char *digest; /* BuildImage: SHA-256 of its body, to remember the answer by */
	/* for the request log */
	char build_id[IB_BUILD_ID_MAX];
	char image_id[IB_SHA256_HEX];
	int cached;                  /* -1 n/a */
	/* the outcome */
	json_t *answer;
	ib_connect_code code;
	char *message;
	srv_watch *watch;
	job *wait_job;               /* CancelBuild without r: the build it waits for */
	double wait_deadline;
} srv_call;

extern const srv_rpc srv_rpcs[];

/* One line of the request log. */
typedef struct srv_access {
	const char *method, *path, *remote;
	const char *protocol; /* the RPC protocol (connect, grpc, grpc-web...), NULL for plain HTTP */
	const char *http;     /* "1.1", "2" */
	ib_endpoint ep;
	unsigned status;
	double seconds;
	uint64_t bytes;
	const char *code, *message, *build_id, *image_id;
	int cached;
	bool aborted;
} srv_access;

/* http.c: responses, the structured log, routing and libmicrohttpd's callbacks */
void srv_log_access(const ib_server *srv, const srv_access *a);
void srv_sockaddr_text(char out[46], const struct sockaddr *sa);
char *srv_dump_json(const json_t *v, size_t flags);
void srv_event(const ib_server *srv, json_t *obj);
json_t *srv_time_or_null(double t);
enum MHD_Result srv_send(req *r, struct MHD_Connection *c, unsigned status, struct MHD_Response *resp);
enum MHD_Result srv_respond(req *r, struct MHD_Connection *c, unsigned status, const char *ctype, char *body,
			       size_t len);
enum MHD_Result srv_respond_json(req *r, struct MHD_Connection *c, json_t *doc);
enum MHD_Result srv_respond_error(req *r, struct MHD_Connection *c, ib_connect_code code, const char *fmt, ...) IB_PRINTF(4, 5);
enum MHD_Result srv_respond_http(req *r, struct MHD_Connection *c, unsigned status, ib_connect_code code,
				    const char *header, const char *value, const char *message);
const char *srv_header_value(struct MHD_Connection *c, const char *name);
/* h2.c: the acceptor and HTTP/2 */
int srv_accept_start(ib_server *srv);
void srv_accept_stop(ib_server *srv);
/* End every HTTP/2 connection (their streams unavailable), and wait for their threads. */
void srv_h2_stop(ib_server *srv);

/* A request that ends is off srv->streams. */
void srv_stream_forget(ib_server *srv, req *r);
/* Start libmicrohttpd's threads on srv->listen_fd. */
int srv_http_start(ib_server *srv);

/* files.c: build logs and the image files */
char *srv_log_path(const ib_server *srv, const char *build_id);
uint64_t srv_log_size(const ib_server *srv, const char *build_id);
void srv_build_log(const ib_server *srv, const char *build_id, int fd, const char *fmt, ...) IB_PRINTF(4, 5);
char *srv_log_tail_of(const ib_server *srv, const char *id);
void srv_touch_image(ib_server *srv, const char *image_id);
enum MHD_Result srv_serve_logs(req *r, struct MHD_Connection *c, const char *id);
/* GET|HEAD /v1/images/<id>/rootfs.ext4 (kind -1), .ext4.zst, .ext4.bmap (an ib_artifact) */
enum MHD_Result srv_serve_rootfs(req *r, struct MHD_Connection *c, const char *id, int kind, bool head);

/* queue.c: jobs, the queue and the builder threads */
void srv_new_build_id(char out[IB_BUILD_ID_MAX]);
void srv_job_free(job *j);
void srv_job_ref(job *j);
void srv_job_unref_locked(job *j);
void srv_job_unref(ib_server *srv, job *j);
void srv_list_append(ib_server *srv, job *j);
void srv_list_remove(ib_server *srv, job *j);
job *srv_find_job(ib_server *srv, const char *id);
job *srv_find_inflight(ib_server *srv, const char *image_id, bool force);
unsigned srv_queue_position(ib_server *srv, const job *j);
void srv_queue_push(ib_server *srv, job *j);
void srv_queue_remove(ib_server *srv, job *j);
void srv_job_finished_locked(ib_server *srv, job *j);
json_t *srv_steps_of(ib_build *b);
json_t *srv_steps_all_cached(ib_build *b);
void srv_build_event(ib_server *srv, const job *j, job_status status, double seconds, const char *error);
void srv_finish_unrun(ib_server *srv, job *j);
/* What a submitted build became. */
typedef struct srv_submission {
	char build_id[IB_BUILD_ID_MAX];
	const char *status;   /* its status now: "QUEUED", ... */
	bool cached;          /* READY: the image was in the cache */
	ib_connect_code code; /* on failure: internal, unavailable, resource_exhausted */
} srv_submission;

/*
 * Submit a planned build (spec and b are taken, freed or kept by the job):
 * join a build in flight for the same image, answer from the cache (with
 * the record of the build that made it; images built elsewhere get one
 * READY record, made once), or queue a new job, recorded before anyone can
 * run it.  0, or <0 with the message set and out->code for the answer.
 */
int srv_submit(ib_server *srv, ib_spec *spec, ib_build *b, bool force, int64_t timeout, const ib_limits *limits,
	       srv_submission *out);

typedef enum srv_cancel_result {
	SRV_CANCEL_UNKNOWN,  /* not in memory: answer from the records */
	SRV_CANCEL_ANSWERED, /* *out_status is the status to answer */
	SRV_CANCEL_WAITING,  /* running: r is suspended until it stops or the wait runs out */
} srv_cancel_result;

srv_cancel_result srv_cancel(ib_server *srv, const char *id, srv_call *c, const char **out_status);

/* The builder threads and the timer: started once, stopped (joined) once. */
int srv_threads_start(ib_server *srv);
void srv_threads_stop(ib_server *srv);

/* rpc.c: the ImageBuilder methods */
bool srv_build_id_ok(const char *s);
bool srv_answer_lookup(ib_server *srv, const unsigned char key[IB_SHA256_LEN], char image_id[IB_SHA256_HEX],
			  char build_id[IB_BUILD_ID_MAX]);
json_t *srv_cached_answer(ib_server *srv, const char *image_id, const char *build_id);
enum MHD_Result srv_respond_cached(req *r, struct MHD_Connection *c);
void srv_call_init(srv_call *c, ib_server *srv, rpc_kind k, const char *host);
void srv_call_clear(srv_call *c);
int srv_call_error(srv_call *c, ib_connect_code code, const char *fmt, ...) IB_PRINTF(3, 4);
/* A request message d, binary or JSON, as the JSON document the handlers read. */
int srv_call_decode(srv_call *c, const ProtobufCMessageDescriptor *d, bool proto, const char *data, size_t len,
		    json_t **out);
/* Decode a request (binary or JSON) and run its method. */
int srv_call_run(srv_call *c, bool proto, const char *data, size_t len);
/* An answer's JSON document as bytes: JSON, or the binary message d. */
int srv_call_encode(srv_call *c, const ProtobufCMessageDescriptor *d, bool proto, json_t *doc, char **out,
		    size_t *out_len);
int srv_build_answer(srv_call *c, const char *id);
/* An integer field, as a number or a decimal string (proto3 int64): 1 found, 0 absent, -1 bad. */
int srv_int_field(int64_t *out, json_t *msg, const char *snake, const char *camel);
/* The build_id of a request, checked (NULL with c's error set). */
const char *srv_build_id_arg(srv_call *c, json_t *msg);
int srv_cancel_answer(srv_call *c, const char *status);
int srv_cancel_poll(srv_call *c);
rpc_kind srv_rpc_of(const char *url);
enum MHD_Result srv_dispatch_rpc(req *r, struct MHD_Connection *c, rpc_kind k, const char *data, size_t len);
enum MHD_Result srv_connect_get(req *r, struct MHD_Connection *c, rpc_kind k);

/* ---- wire.c: the RPC protocols, whatever the transport ---- */

typedef enum srv_wire {
	WIRE_NONE = -1,
	WIRE_CONNECT,        /* Connect unary: application/json, application/proto */
	WIRE_CONNECT_STREAM, /* Connect streaming: application/connect+json, +proto */
	WIRE_GRPC,           /* application/grpc[+proto|+json]: HTTP/2 only (trailers) */
	WIRE_GRPC_WEB,       /* application/grpc-web[+proto|+json] */
	WIRE_GRPC_WEB_TEXT,  /* application/grpc-web-text[+proto]: the body in base64 */
} srv_wire;

typedef enum srv_service {
	SVC_IMAGEBUILDER,
	SVC_HEALTH_CHECK,
	SVC_HEALTH_WATCH,
	SVC_REFLECTION, /* v1 and v1alpha: the same messages */
} srv_service;

/* A request header's value (NULL: absent), from whichever transport carries it. */
typedef const char *(*srv_header_fn)(void *ctx, const char *name);

/*
 * One RPC exchange on the wire: the request's bytes in (framed as its
 * protocol frames them), the response's status, headers, body and
 * trailers out.  The transport feeds it, sends what it has in out, and
 * polls it while it runs (a stream, a CancelBuild wait).
 */
typedef struct srv_exchange {
	ib_server *srv;
	srv_wire wire;
	srv_service svc;
	bool proto;           /* binary Protobuf, not JSON */
	bool h2;
	bool gzip_body;       /* Connect unary: the body is gzip (Content-Encoding) */
	bool gzip_msgs;       /* framed: flag 1 messages are gzip (grpc-encoding, connect-content-encoding) */
	bool gzip_out;        /* the client takes gzip answers */
	ib_buf in;            /* request bytes not consumed yet */
	bool in_too_large;
	bool ended;           /* the request is in */
	bool running;         /* the method goes on: polled */
	/* the response */
	unsigned status;      /* HTTP status; 0 until known */
	char ctype[48];
	const char *content_encoding; /* Connect unary answer: "gzip" or NULL */
	const char *msg_encoding;     /* framed answers: grpc-encoding / connect-content-encoding, or NULL */
	ib_buf out;           /* body bytes ready to send, from out_off (srv_exchange_take) */
	size_t out_off;
	bool done;            /* out holds the rest of the body; then trailers (gRPC) */
	int grpc_status;      /* gRPC status code for the trailers */
	char *grpc_message;   /* percent-encoded */
	srv_call call;
	char *service;        /* Health.Watch: the service watched */
	char health_sent[24]; /* the status last sent to it */
	uint64_t messages;    /* messages sent */
} srv_exchange;

/* The wire of a Content-Type, and whether it is binary. */
srv_wire srv_wire_of(const char *ctype, bool *proto);
/*
 * A request's headers are in: route it (path), check the token and
 * encodings.  An error ends the exchange at once (done).
 */
void srv_exchange_begin(srv_exchange *x, ib_server *srv, const char *path, srv_header_fn header, void *ctx,
			bool h2);
/* Request body bytes. */
void srv_exchange_data(srv_exchange *x, const void *data, size_t len);
/* The request is complete: run it. */
void srv_exchange_end(srv_exchange *x);
/* While running: more of the answer, when there is some. */
void srv_exchange_poll(srv_exchange *x);
/* Answer bytes not yet taken, and taking them. */
size_t srv_exchange_pending(const srv_exchange *x);
size_t srv_exchange_take(srv_exchange *x, void *buf, size_t max);
/* Every stream still running ends with unavailable: the server is stopping. */
void srv_exchange_abort(srv_exchange *x, const char *why);
void srv_exchange_free(srv_exchange *x);
const char *srv_wire_name(srv_wire w);

/* grpcsvc.c: grpc.health.v1 and grpc.reflection */
/* Health: the answer (HealthCheckResponse document) for a service name; NULL: unknown service. */
json_t *srv_health_status(ib_server *srv, const char *service);
/* Reflection: the answer document to one ServerReflectionRequest document. */
json_t *srv_reflect(json_t *request);

/* watch.c: WatchBuild's stream */
int srv_watch_start(srv_call *c, json_t *msg);
/*
 * The stream's next messages (WatchBuildResponse documents) appended to
 * events: SRV_CALL_WAIT when more will come, SRV_CALL_OK when these end
 * the stream, SRV_CALL_ERROR (c's code and message) when it ends in an
 * error.  Never blocks.
 */
int srv_watch_next(srv_call *c, json_t *events);
void srv_watch_free(srv_watch *w);

#endif

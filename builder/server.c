/*
 * The BuildImage service.
 *
 * Threads:
 *
 *   libmicrohttpd's pool    parses requests and answers them; never waits
 *                           for a build (CancelBuild suspends its
 *                           connection instead, see the waiters below)
 *   builders (--jobs N)     take queued builds and run ib_build_run()
 *   timer                   resumes CancelBuild connections whose wait ran out
 *
 * Builds in memory ("jobs") are on one list, newest last: every queued and
 * running build, and the last IB_SERVE_RECENT_MAX finished ones.  Older
 * builds are answered from their records in the cache index.  Everything
 * a job has that changes (status, the queue links, refs) is guarded by
 * srv->mu; the layer states inside job->b by the build's own lock.
 *
 * Single flight: a BuildImage for an image that a queued or running build
 * will produce joins that build and gets its id (a forced build joins only
 * a forced one).  Two different specs that share a missing layer still
 * build it once: the per-layer locks of the cache see to that, across
 * builders and processes.
 *
 * Every RPC is safe to repeat: BuildImage joins or answers from the cache,
 * GetBuild and GetImage only read, CancelBuild of a finished build returns
 * its final status.
 */
#include "server.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "build.h"
#include "cache/builds.h"
#include "limits.h"
#include "server-http.h"
#include "server-metrics.h"
#include "spec.h"
#include "util.h"

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

static const char *const status_names[] = { "QUEUED", "BUILDING", "READY", "FAILED", "CANCELLED", "TIMEOUT" };

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
	bool have_digest;
	unsigned char digest[IB_SHA256_LEN]; /* of a BuildImage body */
	unsigned status;     /* HTTP status queued, 0 none */
	const char *code;    /* Connect code of an error response */
	char *message;       /* its message */
	uint64_t length;     /* response body bytes */
	char build_id[IB_BUILD_ID_MAX];
	char image_id[IB_SHA256_HEX];
	int cached;          /* -1 n/a */
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
	char *apt_mirror;
	char *pip_index_url;
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
	struct MHD_Daemon *mhd;
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
	} answers[ANSWER_SLOTS];
};

/* ---- small helpers ---- */

static char *dump_json(const json_t *v, size_t flags)
{
	char *s = json_dumps(v, flags | JSON_COMPACT);

	if (!s)
		abort();
	return s;
}

static void new_build_id(char out[IB_BUILD_ID_MAX])
{
	unsigned char r[16];
	size_t got = 0;

	while (got < sizeof(r)) {
		ssize_t n = getrandom(r + got, sizeof(r) - got, 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			abort(); /* the kernel always has entropy for getrandom after boot */
		got += (size_t)n;
	}
	ib_hex(out, r, sizeof(r));
}

/* Build ids are ours (32 lowercase hex digits); reject anything else early. */
static bool build_id_ok(const char *s)
{
	size_t n = 0;

	for (; s[n]; n++)
		if (!((s[n] >= '0' && s[n] <= '9') || (s[n] >= 'a' && s[n] <= 'f')) || n >= IB_BUILD_ID_MAX - 1)
			return false;
	return n == 32;
}

static char *log_path(const ib_server *srv, const char *build_id)
{
	return ib_xasprintf("%s/logs/%s.log", ib_cache_dir(srv->cache), build_id);
}

static uint64_t log_size(const ib_server *srv, const char *build_id)
{
	char *path = log_path(srv, build_id);
	struct stat st;
	uint64_t n = stat(path, &st) == 0 ? (uint64_t)st.st_size : 0;

	free(path);
	return n;
}

/* Append a line to a build's log: "[time] text\n". */
static void build_log(const ib_server *srv, const char *build_id, int fd, const char *fmt, ...) IB_PRINTF(4, 5);

static void build_log(const ib_server *srv, const char *build_id, int fd, const char *fmt, ...)
{
	char ts[32], line[1024];
	int own = -1, n;
	va_list ap;

	if (fd < 0) {
		char *path = log_path(srv, build_id);
		fd = own = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
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
static void event(const ib_server *srv, json_t *obj)
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
	s = dump_json(obj, JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(9));
	ib_buf_printf(&line, "{\"ts\":\"%s\",%s\n", ts, s + 1);
	ib_write_all(srv->log_fd, line.ptr, line.len);
	ib_buf_free(&line);
	free(s);
	json_decref(obj);
}

static json_t *time_or_null(double t)
{
	char buf[32];

	if (t <= 0)
		return json_null();
	ib_http_time(buf, t);
	return json_string(buf);
}

/* Mark an image used, at most once a minute each (every write is an fsync). */
static void touch_image(ib_server *srv, const char *image_id)
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

static struct answer *answer_slot(ib_server *srv, const unsigned char key[IB_SHA256_LEN])
{
	return &srv->answers[((unsigned)key[0] << 8 | key[1]) % ANSWER_SLOTS];
}

/* A fresh remembered answer for this body: its ids, true. */
static bool answer_lookup(ib_server *srv, const unsigned char key[IB_SHA256_LEN], char image_id[IB_SHA256_HEX],
			  char build_id[IB_BUILD_ID_MAX])
{
	struct answer *a = answer_slot(srv, key);
	bool hit;

	pthread_mutex_lock(&srv->answer_mu);
	hit = a->used && !memcmp(a->key, key, IB_SHA256_LEN) && ib_now() - a->checked < ANSWER_TTL;
	if (hit) {
		memcpy(image_id, a->image_id, IB_SHA256_HEX);
		memcpy(build_id, a->build_id, IB_BUILD_ID_MAX);
	}
	pthread_mutex_unlock(&srv->answer_mu);
	return hit;
}

static void answer_store(ib_server *srv, const unsigned char key[IB_SHA256_LEN], const char *image_id,
			 const char *build_id)
{
	struct answer *a = answer_slot(srv, key);

	pthread_mutex_lock(&srv->answer_mu);
	memcpy(a->key, key, IB_SHA256_LEN);
	a->used = true;
	a->checked = ib_now();
	snprintf(a->image_id, sizeof(a->image_id), "%s", image_id);
	snprintf(a->build_id, sizeof(a->build_id), "%s", build_id);
	pthread_mutex_unlock(&srv->answer_mu);
}

/* Is the image's file there?  (The remembered answer's only check.) */
static bool image_file_present(ib_server *srv, const char *image_id)
{
	char *path = ib_cache_image_path(srv->cache, image_id);
	struct stat st;
	bool ok = stat(path, &st) == 0 && S_ISREG(st.st_mode);

	free(path);
	return ok;
}

/* ---- jobs ---- */

static void job_free(job *j)
{
	if (!j)
		return;
	ib_build_free(j->b);
	ib_spec_free(j->spec);
	free(j->error);
	free(j->log_tail);
	free(j);
}

/* Both under srv->mu. */
static void job_ref(job *j)
{
	j->refs++;
}

static void job_unref_locked(job *j)
{
	if (--j->refs == 0)
		job_free(j);
}

static void job_unref(ib_server *srv, job *j)
{
	pthread_mutex_lock(&srv->mu);
	job_unref_locked(j);
	pthread_mutex_unlock(&srv->mu);
}

static void list_append(ib_server *srv, job *j)
{
	j->prev = srv->jobs_tail;
	j->next = NULL;
	if (srv->jobs_tail)
		srv->jobs_tail->next = j;
	else
		srv->jobs_head = j;
	srv->jobs_tail = j;
}

static void list_remove(ib_server *srv, job *j)
{
	if (j->prev)
		j->prev->next = j->next;
	else
		srv->jobs_head = j->next;
	if (j->next)
		j->next->prev = j->prev;
	else
		srv->jobs_tail = j->prev;
	j->prev = j->next = NULL;
}

static job *find_job(ib_server *srv, const char *id)
{
	for (job *j = srv->jobs_tail; j; j = j->prev)
		if (!strcmp(j->id, id))
			return j;
	return NULL;
}

/* A queued or running build that will produce image_id (force: a forced one). */
static job *find_inflight(ib_server *srv, const char *image_id, bool force)
{
	for (job *j = srv->jobs_tail; j; j = j->prev)
		if (!IS_FINAL(j->status) && j->force == force && !strcmp(j->image_id, image_id))
			return j;
	return NULL;
}

static unsigned queue_position(ib_server *srv, const job *j)
{
	unsigned pos = 1;

	for (job *q = srv->queue_head; q; q = q->qnext, pos++)
		if (q == j)
			return pos;
	return 0;
}

static void queue_push(ib_server *srv, job *j)
{
	j->qnext = NULL;
	j->queued = true;
	if (srv->queue_tail)
		srv->queue_tail->qnext = j;
	else
		srv->queue_head = j;
	srv->queue_tail = j;
	srv->nqueued++;
	pthread_cond_signal(&srv->work_cv);
}

static void queue_remove(ib_server *srv, job *j)
{
	job **pp = &srv->queue_head, *prev = NULL;

	while (*pp && *pp != j) {
		prev = *pp;
		pp = &(*pp)->qnext;
	}
	if (!*pp)
		return;
	*pp = j->qnext;
	if (srv->queue_tail == j)
		srv->queue_tail = prev;
	j->qnext = NULL;
	j->queued = false;
	srv->nqueued--;
}

/* Wake CancelBuild requests waiting on j (all of them when j is NULL).  Under mu. */
static void resume_waiters(ib_server *srv, const job *j)
{
	req **pp = &srv->waiters;

	while (*pp) {
		req *r = *pp;
		if (j && r->wait_job != j) {
			pp = &r->wnext;
			continue;
		}
		*pp = r->wnext;
		r->wnext = NULL;
		r->phase = PHASE_RESUMED;
		MHD_resume_connection(r->conn);
	}
}

/*
 * A job reached its final status: keep it among the recent ones (dropping
 * the oldest finished beyond the limit) and wake whoever waits.  Under mu.
 */
static void job_finished_locked(ib_server *srv, job *j)
{
	srv->nfinished++;
	resume_waiters(srv, j);
	pthread_cond_broadcast(&srv->done_cv);
	for (job *o = srv->jobs_head; o && srv->nfinished > IB_SERVE_RECENT_MAX;) {
		job *next = o->next;
		if (IS_FINAL(o->status)) {
			list_remove(srv, o);
			srv->nfinished--;
			job_unref_locked(o);
		}
		o = next;
	}
}

/* ---- rendering builds ---- */

static json_t *step_json(size_t i, const char *kind, const char *key, const char *state, bool cached,
			 double seconds)
{
	return json_pack("{s:i, s:s, s:s, s:s, s:b, s:f}", "index", (int)i, "kind", kind, "key", key, "state", state,
			 "cached", cached, "seconds", (double)(int64_t)(seconds * 1000 + 0.5) / 1000);
}

/* The steps of a build as they stand (pending, with force, for a queued one). */
static json_t *steps_of(ib_build *b)
{
	json_t *a = json_array();

	ib_build_lock(b);
	for (size_t i = 0; i < b->nlayers; i++) {
		const ib_build_layer *l = &b->layers[i];
		json_array_append_new(a, step_json(i, l->kind, l->key, ib_layer_state_name(l->state), l->cached,
						   l->seconds));
	}
	ib_build_unlock(b);
	return a;
}

/* Every layer cached: what a build of an image found in the cache looks like. */
static json_t *steps_all_cached(ib_build *b)
{
	json_t *a = json_array();

	for (size_t i = 0; i < b->nlayers; i++)
		json_array_append_new(a, step_json(i, b->layers[i].kind, b->layers[i].key, "cached", true, 0));
	return a;
}

static json_t *error_json(int step, const char *message, const char *log_tail)
{
	char *m = ib_http_utf8_clean(message, SIZE_MAX), *t = ib_http_utf8_clean(log_tail, SIZE_MAX);
	json_t *e = json_pack("{s:o, s:s, s:s}", "step", step >= 0 ? json_integer(step) : json_null(), "message", m,
			      "log_tail", t);

	free(m);
	free(t);
	return e;
}

/* The GetBuild answer for a job in memory.  Under mu. */
static json_t *job_json_locked(ib_server *srv, job *j)
{
	json_t *doc = json_object();
	unsigned pos = j->status == ST_QUEUED ? queue_position(srv, j) : 0;

	json_object_set_new(doc, "build_id", json_string(j->id));
	json_object_set_new(doc, "image_id", json_string(j->image_id));
	json_object_set_new(doc, "status", json_string(status_names[j->status]));
	json_object_set_new(doc, "cached", json_boolean(j->cached));
	json_object_set_new(doc, "force_build", json_boolean(j->force));
	json_object_set_new(doc, "timeout_s", json_integer(j->timeout_s));
	json_object_set_new(doc, "queue_position", pos ? json_integer(pos) : json_null());
	json_object_set_new(doc, "created_at", time_or_null(j->created));
	json_object_set_new(doc, "started_at", time_or_null(j->started));
	json_object_set_new(doc, "finished_at", time_or_null(j->finished));
	json_object_set_new(doc, "steps", steps_of(j->b));
	json_object_set_new(doc, "error",
			    j->status == ST_FAILED || j->status == ST_CANCELLED || j->status == ST_TIMEOUT
				    ? error_json(j->error_step, j->error, j->log_tail)
				    : json_null());
	return doc;
}

static json_t *record_json(const ib_build_record *rec)
{
	json_t *doc = json_object(), *steps = rec->steps ? json_loads(rec->steps, 0, NULL) : NULL;

	json_object_set_new(doc, "build_id", json_string(rec->id));
	json_object_set_new(doc, "image_id", json_string(rec->image_id));
	json_object_set_new(doc, "status", json_string(rec->status));
	json_object_set_new(doc, "cached", json_boolean(rec->cached));
	json_object_set_new(doc, "force_build", json_boolean(rec->force));
	json_object_set_new(doc, "timeout_s", json_integer(rec->timeout_s));
	json_object_set_new(doc, "queue_position", json_null());
	json_object_set_new(doc, "created_at", time_or_null((double)rec->created));
	json_object_set_new(doc, "started_at", time_or_null((double)rec->started));
	json_object_set_new(doc, "finished_at", time_or_null((double)rec->finished));
	json_object_set_new(doc, "steps", json_is_array(steps) ? steps : json_array());
	if (steps && !json_is_array(steps))
		json_decref(steps);
	json_object_set_new(doc, "error",
			    ib_build_status_final(rec->status) && strcmp(rec->status, "READY")
				    ? error_json(rec->error_step, rec->error, rec->log_tail)
				    : json_null());
	return doc;
}

/* ---- running builds ---- */

static ib_final_status final_of(job_status s)
{
	switch (s) {
	case ST_READY: return IB_FINAL_READY;
	case ST_CANCELLED: return IB_FINAL_CANCELLED;
	case ST_TIMEOUT: return IB_FINAL_TIMEOUT;
	default: return IB_FINAL_FAILED;
	}
}

static void build_event(ib_server *srv, const job *j, job_status status, double seconds, const char *error)
{
	json_t *e = json_pack("{s:s, s:s, s:s, s:s}", "event", "build", "build_id", j->id, "image_id", j->image_id,
			      "status", status_names[status]);

	if (seconds >= 0)
		json_object_set_new(e, "seconds", json_real((double)(int64_t)(seconds * 1000) / 1000));
	if (error) {
		char *clean = ib_http_utf8_clean(error, 512);
		json_object_set_new(e, "error", json_string(clean));
		free(clean);
	}
	event(srv, e);
}

/*
 * Persist a final status reached without running (cancelled in the queue,
 * at shutdown, or a record that could not be written); j's outcome fields
 * are set.  Not under mu.
 */
static void finish_unrun(ib_server *srv, job *j)
{
	ib_build_record rec = { .error_step = -1 };
	json_t *steps = steps_of(j->b);

	rec.steps = dump_json(steps, 0);
	json_decref(steps);
	snprintf(rec.id, sizeof(rec.id), "%s", j->id);
	snprintf(rec.status, sizeof(rec.status), "%s", status_names[j->status]);
	rec.finished = (int64_t)j->finished;
	rec.error = j->error;
	rec.error_step = j->error_step;
	if (ib_builds_finish(srv->builds, &rec) < 0)
		event(srv, json_pack("{s:s, s:s, s:s}", "event", "error", "build_id", j->id, "message",
				     ib_error_last()));
	free(rec.steps);
	build_log(srv, j->id, -1, "build %s: %s", status_names[j->status], j->error ? j->error : "");
	ib_metrics_build(srv->metrics, final_of(j->status), 0);
	build_event(srv, j, j->status, 0, j->error);
}

static void run_job(ib_server *srv, job *j)
{
	ib_build_opts o = {
		.force = j->force,
		.timeout = (double)j->timeout_s,
		.log_fd = -1,
		.cancel = &j->cancel,
		.apt_mirror = srv->apt_mirror,
		.pip_index_url = srv->pip_index_url,
	};
	ib_build_record rec = { .error_step = -1 };
	char *path = log_path(srv, j->id), *steps = NULL;
	json_t *steps_doc;
	job_status status;
	double seconds;
	int err;

	o.log_fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
	if (o.log_fd < 0)
		event(srv, json_pack("{s:s, s:s, s:s}", "event", "error", "build_id", j->id, "message",
				     strerror(errno)));
	build_log(srv, j->id, o.log_fd, "build %s started: image %s%s, timeout %llds", j->id, j->image_id,
		  j->force ? " (forced)" : "", (long long)j->timeout_s);
	steps_doc = steps_of(j->b);
	steps = dump_json(steps_doc, 0);
	json_decref(steps_doc);
	if (ib_builds_start(srv->builds, j->id, (int64_t)j->started, steps) < 0)
		event(srv, json_pack("{s:s, s:s, s:s}", "event", "error", "build_id", j->id, "message",
				     ib_error_last()));
	free(steps);
	build_event(srv, j, ST_BUILDING, ib_now() - j->run_t0, NULL);

	err = ib_build_run(j->b, srv->cache, &o);
	seconds = ib_now() - j->run_t0;

	switch (err) {
	case 0: status = ST_READY; break;
	case IB_ETIMEOUT: status = ST_TIMEOUT; break;
	case IB_ECANCELED: status = ST_CANCELLED; break;
	default: status = j->cancel ? ST_CANCELLED : ST_FAILED; break;
	}

	pthread_mutex_lock(&srv->mu);
	ib_build_lock(j->b);
	j->cached = j->b->cached;
	if (status != ST_READY) {
		j->error_step = j->b->failed_layer;
		j->error = ib_xstrdup(j->shutdown_cancel && status == ST_CANCELLED
					      ? SHUTDOWN_MESSAGE
					      : j->b->error ? j->b->error : ib_error_last());
		j->log_tail = ib_xstrdup(j->b->log_tail ? j->b->log_tail : "");
	}
	ib_build_unlock(j->b);
	pthread_mutex_unlock(&srv->mu);

	/* The record and the log first: a poll that sees the final status finds them complete. */
	if (status == ST_READY)
		build_log(srv, j->id, o.log_fd, "build READY in %.1fs%s", seconds, j->cached ? " (cached)" : "");
	else
		build_log(srv, j->id, o.log_fd, "build %s after %.1fs: %s", status_names[status], seconds, j->error);
	steps_doc = steps_of(j->b);
	rec.steps = dump_json(steps_doc, 0);
	json_decref(steps_doc);
	snprintf(rec.id, sizeof(rec.id), "%s", j->id);
	snprintf(rec.status, sizeof(rec.status), "%s", status_names[status]);
	rec.finished = (int64_t)ib_http_wallclock();
	rec.cached = j->cached;
	rec.error_step = j->error_step;
	rec.error = j->error;
	rec.log_tail = j->log_tail;
	if (ib_builds_finish(srv->builds, &rec) < 0)
		event(srv, json_pack("{s:s, s:s, s:s}", "event", "error", "build_id", j->id, "message",
				     ib_error_last()));
	free(rec.steps);

	ib_metrics_build(srv->metrics, final_of(status), seconds);
	ib_build_lock(j->b);
	for (size_t i = 0; i < j->b->nlayers; i++) {
		const ib_build_layer *l = &j->b->layers[i];
		if (l->state == IB_LAYER_CACHED || l->state == IB_LAYER_DONE)
			ib_metrics_layer(srv->metrics, l->kind, l->state == IB_LAYER_CACHED, l->seconds);
	}
	ib_build_unlock(j->b);

	pthread_mutex_lock(&srv->mu);
	j->status = status;
	j->finished = ib_http_wallclock();
	srv->nbuilding--;
	job_finished_locked(srv, j);
	pthread_mutex_unlock(&srv->mu);

	build_event(srv, j, status, seconds, status == ST_READY ? NULL : j->error);
	if (o.log_fd >= 0)
		close(o.log_fd);
	free(path);
}

static void *builder_main(void *arg)
{
	ib_server *srv = arg;

	pthread_mutex_lock(&srv->mu);
	for (;;) {
		job *j;

		while (!srv->queue_head && !srv->stopping)
			pthread_cond_wait(&srv->work_cv, &srv->mu);
		if (srv->stopping)
			break;
		j = srv->queue_head;
		queue_remove(srv, j);
		job_ref(j);
		j->status = ST_BUILDING;
		j->started = ib_http_wallclock();
		j->run_t0 = ib_now();
		srv->nbuilding++;
		pthread_mutex_unlock(&srv->mu);
		run_job(srv, j);
		pthread_mutex_lock(&srv->mu);
		job_unref_locked(j);
	}
	pthread_mutex_unlock(&srv->mu);
	return NULL;
}

/* Resumes CancelBuild requests whose wait ran out. */
static void *timer_main(void *arg)
{
	ib_server *srv = arg;

	pthread_mutex_lock(&srv->mu);
	while (!srv->stopping) {
		double now = ib_now(), next = now + 1;
		req **pp = &srv->waiters;
		struct timespec ts;

		while (*pp) {
			req *r = *pp;
			if (r->wait_deadline <= now) {
				*pp = r->wnext;
				r->wnext = NULL;
				r->phase = PHASE_RESUMED;
				MHD_resume_connection(r->conn);
				continue;
			}
			if (r->wait_deadline < next)
				next = r->wait_deadline;
			pp = &r->wnext;
		}
		ts.tv_sec = (time_t)next;
		ts.tv_nsec = (long)((next - (double)ts.tv_sec) * 1e9);
		pthread_cond_timedwait(&srv->timer_cv, &srv->mu, &ts);
	}
	resume_waiters(srv, NULL);
	pthread_mutex_unlock(&srv->mu);
	return NULL;
}

/* ---- HTTP plumbing ---- */

static enum MHD_Result queue(req *r, struct MHD_Connection *c, unsigned status, struct MHD_Response *resp)
{
	enum MHD_Result ret;

	if (!resp)
		return MHD_NO;
	r->status = status;
	r->phase = PHASE_DONE;
	ret = MHD_queue_response(c, status, resp);
	MHD_destroy_response(resp);
	return ret;
}

/* Respond with body (owned, malloc'd), len bytes. */
static enum MHD_Result respond(req *r, struct MHD_Connection *c, unsigned status, const char *ctype, char *body,
			       size_t len)
{
	struct MHD_Response *resp = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);

	if (!resp) {
		free(body);
		return MHD_NO;
	}
	MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
	r->length = len;
	return queue(r, c, status, resp);
}

static enum MHD_Result respond_json(req *r, struct MHD_Connection *c, json_t *doc)
{
	char *s = dump_json(doc, 0);

	json_decref(doc);
	return respond(r, c, MHD_HTTP_OK, "application/json", s, strlen(s));
}

static enum MHD_Result respond_error(req *r, struct MHD_Connection *c, ib_connect_code code, const char *fmt, ...)
	IB_PRINTF(4, 5);

static enum MHD_Result respond_error(req *r, struct MHD_Connection *c, ib_connect_code code, const char *fmt, ...)
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
	return queue(r, c, ib_connect_http_status(code), resp);
}

/* A plain-HTTP status with a Connect-style body, for statuses Connect has no code for. */
static enum MHD_Result respond_http(req *r, struct MHD_Connection *c, unsigned status, ib_connect_code code,
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
	return queue(r, c, status, resp);
}

static const char *header_value(struct MHD_Connection *c, const char *name)
{
	return MHD_lookup_connection_value(c, MHD_HEADER_KIND, name);
}

/* Media type of a Content-Type value is application/json (parameters allowed)? */
static bool is_json_type(const char *ctype)
{
	size_t n;

	if (!ctype)
		return false;
	while (*ctype == ' ' || *ctype == '\t')
		ctype++;
	n = strcspn(ctype, "; \t");
	return n == 16 && !strncasecmp(ctype, "application/json", 16);
}

/* ---- request fields (proto3 JSON: snake_case or lowerCamelCase names) ---- */

static json_t *field(json_t *msg, const char *snake, const char *camel)
{
	json_t *v = json_object_get(msg, snake);

	if (!v || json_is_null(v))
		v = json_object_get(msg, camel);
	return json_is_null(v) ? NULL : v;
}

/* An integer field, as a number or a decimal string (proto3 int64). */
static int int_field(int64_t *out, json_t *msg, const char *snake, const char *camel)
{
	json_t *v = field(msg, snake, camel);
	uint64_t u;

	if (!v)
		return 0;
	if (json_is_integer(v)) {
		*out = json_integer_value(v);
		return 1;
	}
	if (json_is_real(v) && json_real_value(v) == (double)(int64_t)json_real_value(v)) {
		*out = (int64_t)json_real_value(v);
		return 1;
	}
	if (json_is_string(v) && ib_parse_u64(&u, json_string_value(v), INT64_MAX) == 0) {
		*out = (int64_t)u;
		return 1;
	}
	return -1;
}

static const char *string_field(json_t *msg, const char *snake, const char *camel, bool *bad)
{
	json_t *v = field(msg, snake, camel);

	*bad = v && !json_is_string(v);
	return json_is_string(v) ? json_string_value(v) : NULL;
}

/* ---- RPCs ---- */

/* READY, cached: the answer for r->image_id and r->build_id. */
static enum MHD_Result respond_cached(req *r, struct MHD_Connection *c)
{
	char *body = ib_xasprintf("{\"image_id\":\"%s\",\"build_id\":\"%s\",\"status\":\"READY\",\"cached\":true}",
				  r->image_id, r->build_id);

	touch_image(r->srv, r->image_id);
	ib_metrics_image_lookup(r->srv->metrics, true);
	r->cached = 1;
	return respond(r, c, MHD_HTTP_OK, "application/json", body, strlen(body));
}

static enum MHD_Result rpc_build_image(req *r, struct MHD_Connection *c, json_t *msg)
{
	ib_server *srv = r->srv;
	json_t *spec_v = field(msg, "spec", "spec"), *force_v = field(msg, "force_build", "forceBuild");
	char *doc = NULL;
	size_t len;
	ib_spec *spec = NULL;
	ib_build *b = NULL;
	job *j = NULL, *other;
	int64_t timeout = 0;
	int err, rc;
	enum MHD_Result ret;
	const char *status;
	bool force = force_v && json_is_true(force_v);

	if (!spec_v)
		return respond_error(r, c, IB_CONNECT_INVALID_ARGUMENT, "spec: required");
	if (force_v && !json_is_boolean(force_v))
		return respond_error(r, c, IB_CONNECT_INVALID_ARGUMENT, "force_build: must be a boolean");
	if ((rc = int_field(&timeout, msg, "timeout_s", "timeoutS")) < 0 || timeout < 0 || timeout > IB_TIMEOUT_MAX)
		return respond_error(r, c, IB_CONNECT_INVALID_ARGUMENT,
				     "timeout_s: must be a whole number of seconds from 1 to %d (0: the default, %d)",
				     IB_TIMEOUT_MAX, IB_STEP_TIMEOUT_DEFAULT);
	if (timeout == 0)
		timeout = IB_STEP_TIMEOUT_DEFAULT;

	/* The spec as an object, or as a JSON document in a string. */
	if (json_is_object(spec_v)) {
		doc = dump_json(spec_v, JSON_ENCODE_ANY);
		len = strlen(doc);
	} else if (json_is_string(spec_v)) {
		len = json_string_length(spec_v);
		doc = ib_xstrndup(json_string_value(spec_v), len);
		/* keep NUL bytes: the spec parser names the field that holds one */
		memcpy(doc, json_string_value(spec_v), len);
	} else {
		return respond_error(r, c, IB_CONNECT_INVALID_ARGUMENT,
				     "spec: must be an object (or a string holding a JSON document), not %s",
				     ib_spec_type_name(spec_v));
	}
	if ((err = ib_spec_parse(&spec, doc, len)) < 0) {
		const char *m = ib_error_last();
		ret = err == IB_EINVALID ? respond_error(r, c, IB_CONNECT_INVALID_ARGUMENT, "%s%s",
							 strncmp(m, "spec", 4) ? "spec." : "", m)
					 : respond_error(r, c, IB_CONNECT_INTERNAL, "%s", m);
		goto out;
	}
	if ((err = ib_build_plan(&b, spec)) < 0) {
		ret = respond_error(r, c, err == IB_EINVALID ? IB_CONNECT_INVALID_ARGUMENT : IB_CONNECT_INTERNAL, "%s",
				    ib_error_last());
		goto out;
	}
	snprintf(r->image_id, sizeof(r->image_id), "%s", b->image_id);

	/* 1. a build in flight for this image: join it */
	pthread_mutex_lock(&srv->mu);
	if ((other = find_inflight(srv, b->image_id, force))) {
		snprintf(r->build_id, sizeof(r->build_id), "%s", other->id);
		status = status_names[other->status];
		pthread_mutex_unlock(&srv->mu);
		goto joined;
	}
	pthread_mutex_unlock(&srv->mu);

	/* 2. in the cache: READY at once, with the build that made it */
	if (!force && (rc = ib_cache_image_get(srv->cache, b->image_id, NULL)) != 0) {
		if (rc < 0) {
			ret = respond_error(r, c, IB_CONNECT_INTERNAL, "%s", ib_error_last());
			goto out;
		}
		if ((rc = ib_builds_last_ready(srv->builds, b->image_id, r->build_id)) == 0) {
			/* built elsewhere (a CLI build): one READY record to point at, made once */
			pthread_mutex_lock(&srv->adopt_mu);
			if ((rc = ib_builds_last_ready(srv->builds, b->image_id, r->build_id)) == 0) {
				ib_build_record rec = { .error_step = -1, .cached = true };
				json_t *steps = steps_all_cached(b);
				new_build_id(rec.id);
				snprintf(rec.image_id, sizeof(rec.image_id), "%s", b->image_id);
				snprintf(rec.status, sizeof(rec.status), "READY");
				rec.spec = ib_spec_canonical(spec);
				rec.created = rec.started = rec.finished = (int64_t)ib_http_wallclock();
				rec.timeout_s = timeout;
				rec.steps = dump_json(steps, 0);
				json_decref(steps);
				build_log(srv, rec.id, -1, "image %s was in the cache; nothing to build", b->image_id);
				rc = ib_builds_insert(srv->builds, &rec);
				if (rc == 0)
					snprintf(r->build_id, sizeof(r->build_id), "%s", rec.id);
				free(rec.spec);
				free(rec.steps);
			}
			pthread_mutex_unlock(&srv->adopt_mu);
		}
		if (rc < 0) {
			ret = respond_error(r, c, IB_CONNECT_INTERNAL, "%s", ib_error_last());
			goto out;
		}
		if (r->have_digest)
			answer_store(srv, r->digest, b->image_id, r->build_id);
		ret = respond_cached(r, c);
		goto out;
	}

	/* 3. a new build; someone may have queued the same meanwhile */
	j = ib_xcalloc(1, sizeof(*j));
	new_build_id(j->id);
	snprintf(j->image_id, sizeof(j->image_id), "%s", b->image_id);
	j->spec = spec;
	j->b = b;
	spec = NULL;
	b = NULL;
	j->force = force;
	j->timeout_s = timeout;
	j->error_step = -1;
	j->created = ib_http_wallclock();
	j->status = ST_QUEUED;
	j->refs = 1; /* the list's */

	pthread_mutex_lock(&srv->mu);
	if ((other = find_inflight(srv, j->image_id, force))) {
		snprintf(r->build_id, sizeof(r->build_id), "%s", other->id);
		status = status_names[other->status];
		pthread_mutex_unlock(&srv->mu);
		job_free(j);
		goto joined;
	}
	if (srv->draining || srv->nqueued + srv->ninserting >= IB_SERVE_QUEUE_MAX) {
		bool draining = srv->draining;
		pthread_mutex_unlock(&srv->mu);
		job_free(j);
		ret = draining ? respond_error(r, c, IB_CONNECT_UNAVAILABLE, "the server is shutting down; retry later")
			       : respond_error(r, c, IB_CONNECT_RESOURCE_EXHAUSTED,
					       "the build queue is full (%d builds waiting)", IB_SERVE_QUEUE_MAX);
		goto out;
	}
	j->inserting = true;
	srv->ninserting++;
	list_append(srv, j);
	job_ref(j); /* ours, until queued */
	pthread_mutex_unlock(&srv->mu);

	/* Record it (and its log) before anyone can run it. */
	{
		ib_build_record rec = { .error_step = -1 };
		snprintf(rec.id, sizeof(rec.id), "%s", j->id);
		snprintf(rec.image_id, sizeof(rec.image_id), "%s", j->image_id);
		snprintf(rec.status, sizeof(rec.status), "QUEUED");
		rec.spec = ib_spec_canonical(j->spec);
		rec.created = (int64_t)j->created;
		rec.force = force;
		rec.timeout_s = timeout;
		build_log(srv, j->id, -1, "build %s queued: image %s", j->id, j->image_id);
		err = ib_builds_insert(srv->builds, &rec);
		free(rec.spec);
	}
	snprintf(r->build_id, sizeof(r->build_id), "%s", j->id);

	pthread_mutex_lock(&srv->mu);
	j->inserting = false;
	srv->ninserting--;
	if (err < 0 || j->cancel) {
		/* unrunnable: the record failed, or CancelBuild (or shutdown) came first */
		j->status = err < 0 ? ST_FAILED : ST_CANCELLED;
		j->error = ib_xstrdup(err < 0 ? ib_error_last()
				      : j->shutdown_cancel ? SHUTDOWN_MESSAGE
							    : "cancelled before it started");
		j->finished = ib_http_wallclock();
		job_finished_locked(srv, j);
		status = status_names[j->status];
		pthread_mutex_unlock(&srv->mu);
		if (err == 0)
			finish_unrun(srv, j);
		if (err < 0) {
			ret = respond_error(r, c, IB_CONNECT_INTERNAL, "%s", j->error);
			job_unref(srv, j);
			goto out;
		}
	} else {
		queue_push(srv, j);
		status = status_names[j->status];
		pthread_mutex_unlock(&srv->mu);
		build_event(srv, j, ST_QUEUED, -1, NULL);
	}
	job_unref(srv, j);
joined:
	ib_metrics_image_lookup(srv->metrics, false);
	r->cached = 0;
	ret = respond_json(r, c, json_pack("{s:s, s:s, s:s, s:b}", "image_id", r->image_id, "build_id", r->build_id,
					   "status", status, "cached", 0));
out:
	ib_build_free(b);
	ib_spec_free(spec);
	free(doc);
	return ret;
}

/* The build id of a GetBuild or CancelBuild request, or an error response. */
static const char *build_id_arg(req *r, struct MHD_Connection *c, json_t *msg, enum MHD_Result *ret)
{
	bool bad;
	const char *id = string_field(msg, "build_id", "buildId", &bad);

	if (!id || bad) {
		*ret = respond_error(r, c, IB_CONNECT_INVALID_ARGUMENT, "build_id: %s",
				     bad ? "must be a string" : "required");
		return NULL;
	}
	if (!build_id_ok(id)) {
		char q[IB_SPEC_QUOTE_MAX];
		*ret = respond_error(r, c, IB_CONNECT_NOT_FOUND, "no build %s",
				     ib_spec_quote(q, id, json_string_length(field(msg, "build_id", "buildId"))));
		return NULL;
	}
	snprintf(r->build_id, sizeof(r->build_id), "%s", id);
	return id;
}

static enum MHD_Result rpc_get_build(req *r, struct MHD_Connection *c, json_t *msg)
{
	ib_server *srv = r->srv;
	ib_build_record rec;
	enum MHD_Result ret;
	const char *id = build_id_arg(r, c, msg, &ret);
	json_t *doc = NULL;
	job *j;
	int rc;

	if (!id)
		return ret;
	pthread_mutex_lock(&srv->mu);
	if ((j = find_job(srv, id)))
		doc = job_json_locked(srv, j);
	pthread_mutex_unlock(&srv->mu);
	if (!doc) {
		if ((rc = ib_builds_get(srv->builds, id, &rec)) < 0)
			return respond_error(r, c, IB_CONNECT_INTERNAL, "%s", ib_error_last());
		if (rc == 0)
			return respond_error(r, c, IB_CONNECT_NOT_FOUND, "no build '%s'", id);
		doc = record_json(&rec);
		ib_build_record_clear(&rec);
	}
	snprintf(r->image_id, sizeof(r->image_id), "%s", json_string_value(json_object_get(doc, "image_id")));
	json_object_set_new(doc, "log_bytes", json_integer((json_int_t)log_size(srv, id)));
	json_object_set_new(doc, "log_url", json_sprintf("/v1/builds/%s/logs", id));
	return respond_json(r, c, doc);
}

static enum MHD_Result cancel_answer(req *r, struct MHD_Connection *c, const char *status)
{
	return respond_json(r, c, json_pack("{s:s, s:s}", "build_id", r->build_id, "status", status));
}

static enum MHD_Result rpc_cancel_build(req *r, struct MHD_Connection *c, json_t *msg)
{
	ib_server *srv = r->srv;
	ib_build_record rec;
	enum MHD_Result ret;
	const char *id = build_id_arg(r, c, msg, &ret);
	job *j;
	int rc;

	if (!id)
		return ret;
	pthread_mutex_lock(&srv->mu);
	j = find_job(srv, id);
	if (j && IS_FINAL(j->status)) {
		const char *s = status_names[j->status];
		pthread_mutex_unlock(&srv->mu);
		return cancel_answer(r, c, s);
	}
	if (j && j->queued) {
		queue_remove(srv, j);
		j->cancel = 1;
		j->status = ST_CANCELLED;
		j->error = ib_xstrdup("cancelled before it started");
		j->finished = ib_http_wallclock();
		job_ref(j);
		job_finished_locked(srv, j);
		pthread_mutex_unlock(&srv->mu);
		finish_unrun(srv, j);
		job_unref(srv, j);
		return cancel_answer(r, c, "CANCELLED");
	}
	if (j && srv->stopping) {
		/* no timer left to resume a wait: answer as things stand */
		const char *s = status_names[j->status];
		j->cancel = 1;
		pthread_mutex_unlock(&srv->mu);
		return cancel_answer(r, c, s);
	}
	if (j) {
		/* running (or being recorded): stop it and wait, without holding a thread */
		j->cancel = 1;
		job_ref(j);
		r->wait_job = j;
		r->wait_deadline = ib_now() + IB_SERVE_CANCEL_WAIT;
		r->phase = PHASE_WAITING;
		r->wnext = srv->waiters;
		srv->waiters = r;
		MHD_suspend_connection(c);
		pthread_cond_signal(&srv->timer_cv);
		pthread_mutex_unlock(&srv->mu);
		return MHD_YES;
	}
	pthread_mutex_unlock(&srv->mu);
	if ((rc = ib_builds_get(srv->builds, id, &rec)) < 0)
		return respond_error(r, c, IB_CONNECT_INTERNAL, "%s", ib_error_last());
	if (rc == 0)
		return respond_error(r, c, IB_CONNECT_NOT_FOUND, "no build '%s'", id);
	snprintf(r->image_id, sizeof(r->image_id), "%s", rec.image_id);
	ret = cancel_answer(r, c, rec.status);
	ib_build_record_clear(&rec);
	return ret;
}

/* The base URL of rootfs links: --public-url, else the Host the client used. */
static char *base_url(req *r, struct MHD_Connection *c)
{
	const char *host = header_value(c, MHD_HTTP_HEADER_HOST);

	if (r->srv->public_url)
		return ib_xstrdup(r->srv->public_url);
	if (host && *host && strlen(host) < 256 && !strpbrk(host, "/\\ \"<>"))
		return ib_xasprintf("http://%s", host);
	return ib_xstrdup("");
}

/* A member of the image's metadata, or def; borrowed. */
static json_t *meta_field(json_t *meta, const char *key, json_t *def)
{
	json_t *v = json_object_get(meta, key);

	return v ? v : def;
}

static enum MHD_Result rpc_get_image(req *r, struct MHD_Connection *c, json_t *msg)
{
	ib_server *srv = r->srv;
	ib_image_info info = { 0 };
	json_t *meta = NULL, *doc, *layers, *env_default = json_object();
	enum MHD_Result ret;
	bool bad;
	const char *id = string_field(msg, "image_id", "imageId", &bad);
	char *base, created[32];
	int rc;

	if (!id || bad) {
		json_decref(env_default);
		return respond_error(r, c, IB_CONNECT_INVALID_ARGUMENT, "image_id: %s",
				     bad ? "must be a string" : "required");
	}
	if (!ib_is_hex64(id)) {
		char q[IB_SPEC_QUOTE_MAX];
		json_decref(env_default);
		return respond_error(r, c, IB_CONNECT_INVALID_ARGUMENT, "image_id: %s is not an image id (64 hex digits)",
				     ib_spec_quote(q, id, strlen(id)));
	}
	snprintf(r->image_id, sizeof(r->image_id), "%s", id);
	if ((rc = ib_cache_image_get(srv->cache, id, &info)) <= 0) {
		json_decref(env_default);
		return rc < 0 ? respond_error(r, c, IB_CONNECT_INTERNAL, "%s", ib_error_last())
			      : respond_error(r, c, IB_CONNECT_NOT_FOUND, "no image '%s'", id);
	}
	meta = json_loads(info.meta, 0, NULL);
	layers = json_array();
	for (size_t i = 0; i < info.nlayers; i++)
		json_array_append_new(layers, json_string(info.layers[i]));
	base = base_url(r, c);
	ib_http_time(created, (double)info.created);
	doc = json_pack("{s:s, s:s, s:O, s:O, s:O, s:s, s:I, s:s, s:o, s:s+++}", "image_id", info.id, "arch", info.arch,
			"base", meta_field(meta, "base", json_null()), "env", meta_field(meta, "env", env_default),
			"python_version", meta_field(meta, "python_version", json_null()), "ext4_sha256",
			info.ext4_sha256, "ext4_bytes", (json_int_t)info.ext4_bytes, "created_at", created, "layers",
			layers, "rootfs_url", base, "/v1/images/", info.id, "/rootfs.ext4");
	free(base);
	json_decref(meta);
	json_decref(env_default);
	ib_image_info_clear(&info);
	if (!doc)
		return respond_error(r, c, IB_CONNECT_INTERNAL, "cannot render image '%s'", id);
	ret = respond_json(r, c, doc);
	return ret;
}

/* ---- plain HTTP endpoints ---- */

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
	return respond(r, c, MHD_HTTP_OK, "text/plain; version=0.0.4; charset=utf-8", ib_buf_detach(&out), len);
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

static enum MHD_Result serve_logs(req *r, struct MHD_Connection *c, const char *id)
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

	if (!build_id_ok(id))
		return respond_error(r, c, IB_CONNECT_NOT_FOUND, "no build with that id");
	snprintf(r->build_id, sizeof(r->build_id), "%s", id);
	pthread_mutex_lock(&srv->mu);
	if ((j = find_job(srv, id)))
		status = status_names[j->status];
	pthread_mutex_unlock(&srv->mu);
	if (!status) {
		ib_build_record rec;
		if ((rc = ib_builds_get(srv->builds, id, &rec)) < 0)
			return respond_error(r, c, IB_CONNECT_INTERNAL, "%s", ib_error_last());
		if (rc == 0)
			return respond_error(r, c, IB_CONNECT_NOT_FOUND, "no build '%s'", id);
		for (size_t i = 0; i < sizeof(status_names) / sizeof(status_names[0]); i++)
			if (!strcmp(rec.status, status_names[i]))
				status = status_names[i];
		ib_build_record_clear(&rec);
		if (!status)
			status = "FAILED";
	}
	if (off_s && ib_parse_u64(&off, off_s, INT64_MAX) < 0)
		return respond_error(r, c, IB_CONNECT_INVALID_ARGUMENT, "offset: must be a byte offset (0 or more)");
	path = log_path(srv, id);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	free(path);
	if (fd < 0 && errno != ENOENT)
		return respond_error(r, c, IB_CONNECT_INTERNAL, "cannot open the log of '%s': %s", id, strerror(errno));
	if (fd >= 0) {
		if (fstat(fd, &st) < 0) {
			close(fd);
			return respond_error(r, c, IB_CONNECT_INTERNAL, "cannot read the log of '%s'", id);
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
		return respond_http(r, c, MHD_HTTP_RANGE_NOT_SATISFIABLE, IB_CONNECT_OUT_OF_RANGE,
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
	return queue(r, c, MHD_HTTP_OK, resp);
}

static enum MHD_Result serve_rootfs(req *r, struct MHD_Connection *c, const char *id, bool head)
{
	ib_server *srv = r->srv;
	ib_image_info info = { 0 };
	struct MHD_Response *resp;
	char etag[IB_SHA256_HEX + 16], cr[96], *path;
	const char *inm = header_value(c, MHD_HTTP_HEADER_IF_NONE_MATCH);
	const char *if_range = header_value(c, MHD_HTTP_HEADER_IF_RANGE);
	const char *range = header_value(c, MHD_HTTP_HEADER_RANGE);
	uint64_t start = 0, len = 0, size;
	ib_range_result rr = IB_RANGE_NONE;
	unsigned status = MHD_HTTP_OK;
	struct stat st;
	int fd, rc;

	if (!ib_is_hex64(id))
		return respond_error(r, c, IB_CONNECT_NOT_FOUND, "no such image");
	snprintf(r->image_id, sizeof(r->image_id), "%s", id);
	if ((rc = ib_cache_image_get(srv->cache, id, &info)) < 0)
		return respond_error(r, c, IB_CONNECT_INTERNAL, "%s", ib_error_last());
	if (rc == 0)
		return respond_error(r, c, IB_CONNECT_NOT_FOUND, "no image '%s'", id);
	snprintf(etag, sizeof(etag), "\"sha256:%s\"", info.ext4_sha256);
	size = info.ext4_bytes;
	ib_image_info_clear(&info);

	/* The file as it is now; a concurrent gc or forced rebuild cannot change what this fd reads. */
	path = ib_cache_image_path(srv->cache, id);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	free(path);
	if (fd < 0)
		return errno == ENOENT ? respond_error(r, c, IB_CONNECT_NOT_FOUND, "no image '%s'", id)
				       : respond_error(r, c, IB_CONNECT_INTERNAL, "cannot open image '%s': %s", id,
						       strerror(errno));
	if (fstat(fd, &st) < 0 || (uint64_t)st.st_size != size) {
		close(fd);
		return respond_error(r, c, IB_CONNECT_DATA_LOSS,
				     "image '%s' does not have the size the index records; run 'cache verify'", id);
	}

	if (inm && ib_http_etag_match(inm, etag)) {
		close(fd);
		resp = MHD_create_response_from_buffer(0, NULL, MHD_RESPMEM_PERSISTENT);
		if (!resp)
			return MHD_NO;
		MHD_add_response_header(resp, MHD_HTTP_HEADER_ETAG, etag);
		return queue(r, c, MHD_HTTP_NOT_MODIFIED, resp);
	}
	/* If-Range with another tag (or a date: we keep no dates) means "send it all". */
	if (range && (!if_range || !strcmp(if_range, etag)))
		rr = ib_http_parse_range(range, size, &start, &len);
	if (rr == IB_RANGE_UNSATISFIABLE) {
		close(fd);
		snprintf(cr, sizeof(cr), "bytes */%llu", (unsigned long long)size);
		return respond_http(r, c, MHD_HTTP_RANGE_NOT_SATISFIABLE, IB_CONNECT_OUT_OF_RANGE,
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
	MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/octet-stream");
	MHD_add_response_header(resp, MHD_HTTP_HEADER_ETAG, etag);
	MHD_add_response_header(resp, MHD_HTTP_HEADER_ACCEPT_RANGES, "bytes");
	if (status == MHD_HTTP_PARTIAL_CONTENT)
		MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_RANGE, cr);
	r->length = head ? 0 : len;
	if (!head)
		touch_image(srv, id);
	return queue(r, c, status, resp);
}

/* ---- routing ---- */

typedef enum rpc_kind { RPC_NONE = -1, RPC_BUILD_IMAGE, RPC_GET_BUILD, RPC_CANCEL_BUILD, RPC_GET_IMAGE } rpc_kind;

static const struct {
	const char *name;
	ib_endpoint ep;
	bool side_effect_free; /* may come as a Connect GET */
} rpcs[] = {
	[RPC_BUILD_IMAGE] = { "BuildImage", IB_EP_BUILD_IMAGE, false },
	[RPC_GET_BUILD] = { "GetBuild", IB_EP_GET_BUILD, true },
	[RPC_CANCEL_BUILD] = { "CancelBuild", IB_EP_CANCEL_BUILD, false },
	[RPC_GET_IMAGE] = { "GetImage", IB_EP_GET_IMAGE, true },
};

static rpc_kind rpc_of(const char *url)
{
	if (strncmp(url, RPC_PREFIX, sizeof(RPC_PREFIX) - 1))
		return RPC_NONE;
	url += sizeof(RPC_PREFIX) - 1;
	for (size_t i = 0; i < sizeof(rpcs) / sizeof(rpcs[0]); i++)
		if (!strcmp(url, rpcs[i].name))
			return (rpc_kind)i;
	return RPC_NONE;
}

static enum MHD_Result dispatch_rpc(req *r, struct MHD_Connection *c, rpc_kind k, const char *data, size_t len)
{
	json_t *msg;
	json_error_t jerr;
	enum MHD_Result ret;

	/* An empty body is the empty message, as in Connect. */
	if (len == 0) {
		msg = json_object();
	} else {
		msg = json_loadb(data, len, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, &jerr);
		if (!msg)
			return respond_error(r, c, IB_CONNECT_INVALID_ARGUMENT, "request: invalid JSON at line %d column %d: %s",
					     jerr.line, jerr.column, jerr.text);
		if (!json_is_object(msg)) {
			json_decref(msg);
			return respond_error(r, c, IB_CONNECT_INVALID_ARGUMENT, "request: must be a JSON object");
		}
	}
	switch (k) {
	case RPC_BUILD_IMAGE: ret = rpc_build_image(r, c, msg); break;
	case RPC_GET_BUILD: ret = rpc_get_build(r, c, msg); break;
	case RPC_CANCEL_BUILD: ret = rpc_cancel_build(r, c, msg); break;
	case RPC_GET_IMAGE: ret = rpc_get_image(r, c, msg); break;
	default: ret = respond_error(r, c, IB_CONNECT_UNIMPLEMENTED, "no such method"); break;
	}
	json_decref(msg);
	return ret;
}

/* base64url (RFC 4648 section 5), padding optional; NULL when malformed. */
static char *base64url_decode(const char *in, size_t *out_len)
{
	size_t n = strlen(in), o = 0;
	char *out = ib_xmalloc(n / 4 * 3 + 4);
	uint32_t acc = 0;
	int bits = 0;

	for (size_t i = 0; i < n; i++) {
		char ch = in[i];
		int v;
		if (ch >= 'A' && ch <= 'Z') v = ch - 'A';
		else if (ch >= 'a' && ch <= 'z') v = ch - 'a' + 26;
		else if (ch >= '0' && ch <= '9') v = ch - '0' + 52;
		else if (ch == '-' || ch == '+') v = 62;
		else if (ch == '_' || ch == '/') v = 63;
		else if (ch == '=') break;
		else {
			free(out);
			return NULL;
		}
		acc = (acc << 6) | (uint32_t)v;
		bits += 6;
		if (bits >= 8) {
			bits -= 8;
			out[o++] = (char)((acc >> bits) & 0xff);
		}
	}
	out[o] = '\0';
	*out_len = o;
	return out;
}

/* A Connect GET: ?encoding=json&message=...[&base64=1][&compression=identity]. */
static enum MHD_Result connect_get(req *r, struct MHD_Connection *c, rpc_kind k)
{
	const char *enc = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "encoding");
	const char *message = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "message");
	const char *b64 = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "base64");
	const char *comp = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "compression");
	enum MHD_Result ret;
	char *data;
	size_t len;

	if (!enc || strcmp(enc, "json"))
		return respond_http(r, c, MHD_HTTP_UNSUPPORTED_MEDIA_TYPE, IB_CONNECT_INVALID_ARGUMENT, NULL, NULL,
				    "encoding: only json is supported");
	if (comp && *comp && strcmp(comp, "identity"))
		return respond_error(r, c, IB_CONNECT_UNIMPLEMENTED, "compression '%.32s' is not supported (identity only)",
				     comp);
	if (!message)
		message = "";
	if (b64 && !strcmp(b64, "1")) {
		if (!(data = base64url_decode(message, &len)))
			return respond_error(r, c, IB_CONNECT_INVALID_ARGUMENT, "message: invalid base64");
	} else {
		len = strlen(message);
		data = ib_xstrndup(message, len);
	}
	ret = dispatch_rpc(r, c, k, data, len);
	free(data);
	return ret;
}

static bool authorized(ib_server *srv, struct MHD_Connection *c)
{
	return !srv->auth || ib_http_bearer_ok(&srv->token, header_value(c, MHD_HTTP_HEADER_AUTHORIZATION));
}

/* The first call for a request: headers are in, the body (if any) is not. */
static enum MHD_Result on_headers(req *r, struct MHD_Connection *c, const char *url, const char *method)
{
	ib_server *srv = r->srv;
	bool get = !strcmp(method, MHD_HTTP_METHOD_GET), head = !strcmp(method, MHD_HTTP_METHOD_HEAD);
	bool post = !strcmp(method, MHD_HTTP_METHOD_POST);
	const char *p;
	rpc_kind k;

	if (!strcmp(url, "/healthz")) {
		bool draining;
		r->ep = IB_EP_HEALTHZ;
		if (!get && !head)
			return respond_http(r, c, MHD_HTTP_METHOD_NOT_ALLOWED, IB_CONNECT_UNIMPLEMENTED,
					    MHD_HTTP_HEADER_ALLOW, "GET, HEAD", "use GET");
		pthread_mutex_lock(&srv->mu);
		draining = srv->draining;
		pthread_mutex_unlock(&srv->mu);
		return draining ? respond(r, c, MHD_HTTP_SERVICE_UNAVAILABLE, "text/plain", ib_xstrdup("draining\n"), 9)
				: respond(r, c, MHD_HTTP_OK, "text/plain", ib_xstrdup("ok\n"), 3);
	}
	k = rpc_of(url);
	if (k != RPC_NONE)
		r->ep = rpcs[k].ep;
	else if (!strcmp(url, "/metrics"))
		r->ep = IB_EP_METRICS;
	else if (!strncmp(url, "/v1/builds/", 11))
		r->ep = IB_EP_LOGS;
	else if (!strncmp(url, "/v1/images/", 11))
		r->ep = IB_EP_ROOTFS;

	if (!authorized(srv, c))
		return respond_error(r, c, IB_CONNECT_UNAUTHENTICATED,
				     "missing or wrong bearer token (Authorization: Bearer <token>)");

	if (k != RPC_NONE) {
		const char *ctype = header_value(c, MHD_HTTP_HEADER_CONTENT_TYPE);
		const char *version = header_value(c, "Connect-Protocol-Version");
		const char *cenc = header_value(c, MHD_HTTP_HEADER_CONTENT_ENCODING);
		const char *clen = header_value(c, MHD_HTTP_HEADER_CONTENT_LENGTH);
		uint64_t n;

		if (version && strcmp(version, "1"))
			return respond_error(r, c, IB_CONNECT_INVALID_ARGUMENT,
					     "connect-protocol-version: '%.16s' is not supported (1)", version);
		if (get && rpcs[k].side_effect_free)
			return connect_get(r, c, k);
		if (!post)
			return respond_http(r, c, MHD_HTTP_METHOD_NOT_ALLOWED, IB_CONNECT_UNIMPLEMENTED,
					    MHD_HTTP_HEADER_ALLOW, rpcs[k].side_effect_free ? "POST, GET" : "POST",
					    "Connect unary calls are POST requests");
		if (!is_json_type(ctype))
			return respond_http(r, c, MHD_HTTP_UNSUPPORTED_MEDIA_TYPE, IB_CONNECT_INVALID_ARGUMENT,
					    "Accept-Post", "application/json",
					    "content-type must be application/json (the proto codec is not served)");
		if (cenc && strcmp(cenc, "identity"))
			return respond_error(r, c, IB_CONNECT_UNIMPLEMENTED,
					     "content-encoding '%.32s' is not supported (identity only)", cenc);
		if (clen && ib_parse_u64(&n, clen, UINT64_MAX) == 0 && n > IB_SERVE_BODY_MAX)
			return respond_error(r, c, IB_CONNECT_RESOURCE_EXHAUSTED,
					     "request: %llu bytes; at most %d are accepted", (unsigned long long)n,
					     IB_SERVE_BODY_MAX);
		r->phase = PHASE_BODY;
		return MHD_YES;
	}
	if (r->ep == IB_EP_METRICS) {
		if (!get)
			return respond_http(r, c, MHD_HTTP_METHOD_NOT_ALLOWED, IB_CONNECT_UNIMPLEMENTED,
					    MHD_HTTP_HEADER_ALLOW, "GET", "use GET");
		return serve_metrics(r, c);
	}
	if (r->ep == IB_EP_LOGS && (p = strchr(url + 11, '/')) && !strcmp(p, "/logs")) {
		char id[IB_BUILD_ID_MAX];
		size_t n = (size_t)(p - (url + 11));
		if (!get && !head)
			return respond_http(r, c, MHD_HTTP_METHOD_NOT_ALLOWED, IB_CONNECT_UNIMPLEMENTED,
					    MHD_HTTP_HEADER_ALLOW, "GET, HEAD", "use GET");
		if (n >= sizeof(id))
			return respond_error(r, c, IB_CONNECT_NOT_FOUND, "no build with that id");
		memcpy(id, url + 11, n);
		id[n] = '\0';
		return serve_logs(r, c, id);
	}
	if (r->ep == IB_EP_ROOTFS && (p = strchr(url + 11, '/')) && !strcmp(p, "/rootfs.ext4")) {
		char id[IB_SHA256_HEX];
		size_t n = (size_t)(p - (url + 11));
		if (!get && !head)
			return respond_http(r, c, MHD_HTTP_METHOD_NOT_ALLOWED, IB_CONNECT_UNIMPLEMENTED,
					    MHD_HTTP_HEADER_ALLOW, "GET, HEAD", "use GET or HEAD");
		if (n >= sizeof(id))
			return respond_error(r, c, IB_CONNECT_NOT_FOUND, "no such image");
		memcpy(id, url + 11, n);
		id[n] = '\0';
		return serve_rootfs(r, c, id, head);
	}
	r->ep = IB_EP_OTHER;
	if (!strncmp(url, RPC_PREFIX, sizeof(RPC_PREFIX) - 1))
		return respond_error(r, c, IB_CONNECT_UNIMPLEMENTED, "imagebuilder.v1.ImageBuilder has no method '%.64s'",
				     url + sizeof(RPC_PREFIX) - 1);
	return respond_error(r, c, IB_CONNECT_NOT_FOUND, "no such endpoint");
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
		if (*upload_data_size) {
			if (r->body.len + *upload_data_size > IB_SERVE_BODY_MAX)
				r->too_large = true;
			else
				ib_buf_add(&r->body, upload_data, *upload_data_size);
			*upload_data_size = 0;
			return MHD_YES;
		}
		if (r->too_large)
			return respond_error(r, c, IB_CONNECT_RESOURCE_EXHAUSTED, "request: at most %d bytes are accepted",
					     IB_SERVE_BODY_MAX);
		k = rpc_of(url);
		if (k == RPC_BUILD_IMAGE) {
			ib_http_sha256(r->digest, r->body.ptr ? r->body.ptr : "", r->body.len);
			r->have_digest = true;
			if (answer_lookup(r->srv, r->digest, r->image_id, r->build_id) &&
			    image_file_present(r->srv, r->image_id)) {
				ib_buf_free(&r->body);
				return respond_cached(r, c);
			}
		}
		ret = dispatch_rpc(r, c, k, r->body.ptr, r->body.len);
		ib_buf_free(&r->body);
		return ret;
	case PHASE_RESUMED: {
		ib_server *srv = r->srv;
		const char *status;
		job *j = r->wait_job;

		pthread_mutex_lock(&srv->mu);
		status = status_names[j->status];
		r->wait_job = NULL;
		job_unref_locked(j);
		pthread_mutex_unlock(&srv->mu);
		return cancel_answer(r, c, status);
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
		job_unref(srv, r->wait_job);
	if (r->status) {
		ib_metrics_request(srv->metrics, r->ep, r->status, seconds);
		if (toe == MHD_REQUEST_TERMINATED_COMPLETED_OK && (r->ep == IB_EP_ROOTFS || r->ep == IB_EP_LOGS) &&
		    r->status < 300)
			ib_metrics_bytes(srv->metrics, r->ep, r->length);
	}
	if (srv->log_fd >= 0) {
		char ts[32], part[512];
		ib_buf line = IB_BUF_INIT;
		int n;

		ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
		if (ci && ci->client_addr) {
			const struct sockaddr *sa = ci->client_addr;
			if (sa->sa_family == AF_INET)
				inet_ntop(AF_INET, &((const struct sockaddr_in *)sa)->sin_addr, addr, sizeof(addr));
			else if (sa->sa_family == AF_INET6)
				inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)sa)->sin6_addr, addr, sizeof(addr));
		}
		if ((q = strchr(r->uri, '?')))
			*q = '\0';
		/* By hand rather than through jansson: this runs once per request. */
		ib_http_time(ts, ib_http_wallclock());
		ib_buf_grow(&line, 512);
		n = snprintf(part, sizeof(part), "{\"ts\":\"%s\",\"event\":\"request\",\"method\":", ts);
		ib_buf_add(&line, part, (size_t)n);
		json_string_to(&line, r->method, sizeof(r->method));
		ib_buf_add(&line, ",\"path\":", 8);
		json_string_to(&line, r->uri, 512);
		n = snprintf(part, sizeof(part),
			     ",\"endpoint\":\"%s\",\"status\":%u,\"ms\":%.3f,\"bytes\":%llu,\"remote\":\"%s\"%s%s%s%s%s%s%s%s%s%s",
			     ib_endpoint_name(r->ep), r->status, seconds * 1e3, (unsigned long long)r->length, addr,
			     r->code ? ",\"code\":\"" : "", r->code ? r->code : "", r->code ? "\"" : "",
			     r->build_id[0] ? ",\"build_id\":\"" : "", r->build_id, r->build_id[0] ? "\"" : "",
			     r->image_id[0] ? ",\"image_id\":\"" : "", r->image_id, r->image_id[0] ? "\"" : "",
			     r->cached < 0 ? "" : r->cached ? ",\"cached\":true" : ",\"cached\":false");
		ib_buf_add(&line, part, (size_t)n < sizeof(part) ? (size_t)n : sizeof(part) - 1);
		if (r->message) {
			ib_buf_add(&line, ",\"message\":", 11);
			json_string_to(&line, r->message, 512);
		}
		if (toe != MHD_REQUEST_TERMINATED_COMPLETED_OK)
			ib_buf_puts(&line, ",\"aborted\":true");
		ib_buf_add(&line, "}\n", 2);
		ib_write_all(srv->log_fd, line.ptr, line.len);
		ib_buf_free(&line);
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
	event(srv, json_pack("{s:s, s:s}", "event", "http_error", "message", msg));
}

/* ---- lifecycle ---- */

static int take_daemon_lock(ib_server *srv)
{
	char *path = ib_xasprintf("%s/serve.lock", ib_cache_dir(srv->cache));
	char pid[32];
	int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644), err = 0;

	if (fd < 0) {
		err = ib_error_set_errno(errno, "cannot open '%s'", path);
		goto out;
	}
	if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
		err = errno == EWOULDBLOCK
			      ? (ib_error_set("another 'imagebuilder serve' is using the cache dir '%s'",
					      ib_cache_dir(srv->cache)), IB_EEXISTS)
			      : ib_error_set_errno(errno, "cannot lock '%s'", path);
		close(fd);
		goto out;
	}
	snprintf(pid, sizeof(pid), "%ld\n", (long)getpid());
	if (ftruncate(fd, 0) == 0)
		ib_write_all(fd, pid, strlen(pid));
	srv->lock_fd = fd;
out:
	free(path);
	return err;
}

/* Read the last IB_LOG_TAIL_MAX bytes of a build's log. */
static char *log_tail_of(const ib_server *srv, const char *id)
{
	char *path = log_path(srv, id), *buf = NULL;
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

static char *recover_cb(const ib_build_record *rec, void *arg)
{
	ib_server *srv = arg;
	char *tail = log_tail_of(srv, rec->id);

	build_log(srv, rec->id, -1, "build FAILED: %s", INTERRUPTED_MESSAGE);
	event(srv, json_pack("{s:s, s:s, s:s, s:s, s:s, s:s}", "event", "build", "build_id", rec->id, "image_id",
			     rec->image_id, "status", "FAILED", "was", rec->status, "error", INTERRUPTED_MESSAGE));
	return tail;
}

static int open_listener(ib_server *srv)
{
	struct sockaddr_storage ss;
	socklen_t len;
	int fd, one = 1, err;

	if ((err = ib_http_parse_listen(&ss, &len, srv->listen)) < 0)
		return err;
	fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return ib_error_set_errno(errno, "cannot create a socket");
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (ss.ss_family == AF_INET6)
		setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
	if (bind(fd, (struct sockaddr *)&ss, len) < 0 || listen(fd, 1024) < 0) {
		err = ib_error_set_errno(errno, "cannot listen on '%s'", srv->listen);
		close(fd);
		return err;
	}
	len = sizeof(ss);
	if (getsockname(fd, (struct sockaddr *)&ss, &len) == 0)
		srv->port = ntohs(ss.ss_family == AF_INET ? ((struct sockaddr_in *)&ss)->sin_port
							  : ((struct sockaddr_in6 *)&ss)->sin6_port);
	srv->listen_fd = fd;
	return 0;
}

static unsigned cpu_count(void)
{
	long n = sysconf(_SC_NPROCESSORS_ONLN);

	return n > 0 ? (unsigned)n : 1;
}

int ib_server_start(ib_server **out, ib_cache *cache, const ib_server_opts *opts)
{
	ib_server *srv = ib_xcalloc(1, sizeof(*srv));
	pthread_condattr_t ca;
	unsigned recovered = 0;
	unsigned flags;
	int err = 0;

	srv->cache = cache;
	srv->lock_fd = srv->listen_fd = -1;
	srv->log_fd = opts->log_fd;
	srv->listen = ib_xstrdup(opts->listen ? opts->listen : "127.0.0.1:8470");
	srv->public_url = opts->public_url ? ib_xstrdup(opts->public_url) : NULL;
	if (srv->public_url) /* no trailing slash: paths are appended */
		for (size_t n = strlen(srv->public_url); n && srv->public_url[n - 1] == '/'; n--)
			srv->public_url[n - 1] = '\0';
	srv->apt_mirror = opts->apt_mirror ? ib_xstrdup(opts->apt_mirror) : NULL;
	srv->pip_index_url = opts->pip_index_url ? ib_xstrdup(opts->pip_index_url) : NULL;
	srv->jobs = opts->jobs ? opts->jobs : 1;
	srv->http_threads = opts->http_threads ? opts->http_threads : cpu_count();
	srv->http_mode = opts->http_mode;
	srv->cancel_on_shutdown = opts->cancel_on_shutdown;
	if (opts->token) {
		srv->auth = true;
		ib_http_token_init(&srv->token, opts->token, strlen(opts->token));
	}
	srv->metrics = ib_metrics_new();
	srv->t_start = ib_now();
	pthread_mutex_init(&srv->mu, NULL);
	pthread_mutex_init(&srv->adopt_mu, NULL);
	pthread_mutex_init(&srv->touch_mu, NULL);
	pthread_mutex_init(&srv->answer_mu, NULL);
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&srv->work_cv, NULL);
	pthread_cond_init(&srv->done_cv, &ca);
	pthread_cond_init(&srv->timer_cv, &ca);
	pthread_condattr_destroy(&ca);

	if (srv->jobs > IB_SERVE_JOBS_MAX || srv->http_threads > IB_SERVE_HTTP_THREADS_MAX) {
		err = ib_error_set("at most %d builders and %d http threads", IB_SERVE_JOBS_MAX,
				   IB_SERVE_HTTP_THREADS_MAX);
		err = IB_EINVALID;
		goto out;
	}
	if ((err = take_daemon_lock(srv)) < 0)
		goto out;
	if ((err = ib_builds_open(&srv->builds, cache)) < 0)
		goto out;
	/* What a killed daemon left: scratch dirs, and builds that will never finish. */
	ib_cache_clean_tmp(cache);
	if ((err = ib_builds_recover(srv->builds, INTERRUPTED_MESSAGE, recover_cb, srv, &recovered)) < 0)
		goto out;
	if ((err = open_listener(srv)) < 0)
		goto out;

	srv->workers = ib_xcalloc(srv->jobs, sizeof(*srv->workers));
	for (; srv->nworkers < srv->jobs; srv->nworkers++)
		if ((err = pthread_create(&srv->workers[srv->nworkers], NULL, builder_main, srv)) != 0) {
			err = ib_error_set_errno(err, "cannot start a builder thread");
			goto out;
		}
	if ((err = pthread_create(&srv->timer, NULL, timer_main, srv)) != 0) {
		err = ib_error_set_errno(err, "cannot start the timer thread");
		goto out;
	}
	srv->timer_running = true;

	flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG |
		(srv->http_mode == IB_HTTP_POLL ? MHD_USE_POLL : MHD_USE_EPOLL);
	srv->mhd = MHD_start_daemon(flags, 0, NULL, NULL, on_request, srv,
				    MHD_OPTION_EXTERNAL_LOGGER, on_mhd_log, srv,
				    MHD_OPTION_LISTEN_SOCKET, srv->listen_fd,
				    MHD_OPTION_THREAD_POOL_SIZE, srv->http_threads,
				    MHD_OPTION_CONNECTION_LIMIT, (unsigned)IB_SERVE_CONNECTIONS_MAX,
				    MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)IB_SERVE_CONN_MEMORY,
				    MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)IB_SERVE_IDLE_TIMEOUT,
				    MHD_OPTION_URI_LOG_CALLBACK, on_uri, srv,
				    MHD_OPTION_NOTIFY_COMPLETED, on_completed, srv,
				    MHD_OPTION_END);
	if (!srv->mhd) {
		err = ib_error_set("cannot start the HTTP server on '%s'", srv->listen);
		goto out;
	}
	event(srv, json_pack("{s:s, s:s, s:i, s:i, s:i, s:s, s:b, s:s, s:i}", "event", "start", "listen", srv->listen,
			     "port", (int)srv->port, "jobs", (int)srv->jobs, "http_threads", (int)srv->http_threads,
			     "http_mode", srv->http_mode == IB_HTTP_POLL ? "poll" : "epoll", "auth", srv->auth,
			     "cache_dir", ib_cache_dir(cache), "recovered_builds", (int)recovered));
out:
	if (err) {
		ib_server_free(srv);
		return err;
	}
	*out = srv;
	return 0;
}

unsigned ib_server_port(const ib_server *srv)
{
	return srv->port;
}

void ib_server_stop_accepting(ib_server *srv)
{
	job *cancelled = NULL;
	bool first;

	pthread_mutex_lock(&srv->mu);
	first = !srv->draining;
	srv->draining = true;
	/* Queued builds will not start: they end CANCELLED, with the reason. */
	while (srv->queue_head) {
		job *j = srv->queue_head;
		queue_remove(srv, j);
		j->cancel = 1;
		j->shutdown_cancel = true;
		j->status = ST_CANCELLED;
		j->error = ib_xstrdup(SHUTDOWN_MESSAGE " before the build started");
		j->finished = ib_http_wallclock();
		job_ref(j);
		j->qnext = cancelled;
		cancelled = j;
		job_finished_locked(srv, j);
	}
	for (job *j = srv->jobs_head; j; j = j->next)
		if (j->inserting) {
			j->cancel = 1;
			j->shutdown_cancel = true;
		}
	pthread_mutex_unlock(&srv->mu);
	while (cancelled) {
		job *next = cancelled->qnext;
		cancelled->qnext = NULL;
		finish_unrun(srv, cancelled);
		job_unref(srv, cancelled);
		cancelled = next;
	}
	if (first && srv->mhd) {
		/*
		 * The listening socket leaves the daemon; shutting it down makes
		 * new connections fail at once instead of waiting in the backlog.
		 * It is closed only after MHD_stop_daemon, as MHD asks.
		 */
		MHD_socket fd = MHD_quiesce_daemon(srv->mhd);
		if (fd != MHD_INVALID_SOCKET)
			shutdown(fd, SHUT_RDWR);
		event(srv, json_pack("{s:s, s:b}", "event", "draining", "cancel_running", srv->cancel_on_shutdown));
	}
	if (srv->cancel_on_shutdown)
		ib_server_cancel_running(srv);
}

void ib_server_cancel_running(ib_server *srv)
{
	int n = 0;

	pthread_mutex_lock(&srv->mu);
	for (job *j = srv->jobs_head; j; j = j->next)
		if (!IS_FINAL(j->status) && !j->cancel) {
			j->shutdown_cancel = true;
			j->cancel = 1;
			n++;
		}
	pthread_mutex_unlock(&srv->mu);
	if (n)
		event(srv, json_pack("{s:s, s:i}", "event", "cancel_running", "builds", n));
}

bool ib_server_wait_idle(ib_server *srv, double timeout)
{
	double deadline = ib_now() + timeout;
	struct timespec ts;
	bool idle;

	ts.tv_sec = (time_t)deadline;
	ts.tv_nsec = (long)((deadline - (double)ts.tv_sec) * 1e9);
	pthread_mutex_lock(&srv->mu);
	while (srv->nbuilding + srv->ninserting + srv->nqueued > 0 &&
	       pthread_cond_timedwait(&srv->done_cv, &srv->mu, &ts) == 0)
		;
	idle = srv->nbuilding + srv->ninserting + srv->nqueued == 0;
	pthread_mutex_unlock(&srv->mu);
	return idle;
}

void ib_server_free(ib_server *srv)
{
	if (!srv)
		return;
	if (srv->mhd || srv->nworkers) {
		ib_server_stop_accepting(srv);
		ib_server_cancel_running(srv);
	}
	pthread_mutex_lock(&srv->mu);
	srv->stopping = true;
	pthread_cond_broadcast(&srv->work_cv);
	pthread_cond_broadcast(&srv->timer_cv);
	pthread_mutex_unlock(&srv->mu);
	for (unsigned i = 0; i < srv->nworkers; i++)
		pthread_join(srv->workers[i], NULL);
	if (srv->timer_running)
		pthread_join(srv->timer, NULL);
	/* no connection is suspended now: the timer resumed every waiter */
	if (srv->mhd) {
		MHD_stop_daemon(srv->mhd);
		event(srv, json_pack("{s:s}", "event", "stop"));
	}
	if (srv->listen_fd >= 0)
		close(srv->listen_fd);
	while (srv->jobs_head) {
		job *j = srv->jobs_head;
		list_remove(srv, j);
		job_unref_locked(j);
	}
	ib_builds_close(srv->builds);
	ib_metrics_free(srv->metrics);
	if (srv->lock_fd >= 0)
		close(srv->lock_fd);
	pthread_mutex_destroy(&srv->mu);
	pthread_mutex_destroy(&srv->adopt_mu);
	pthread_mutex_destroy(&srv->touch_mu);
	pthread_mutex_destroy(&srv->answer_mu);
	pthread_cond_destroy(&srv->work_cv);
	pthread_cond_destroy(&srv->done_cv);
	pthread_cond_destroy(&srv->timer_cv);
	free(srv->workers);
	free(srv->listen);
	free(srv->public_url);
	free(srv->apt_mirror);
	free(srv->pip_index_url);
	free(srv);
}

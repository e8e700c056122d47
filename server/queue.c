/*
 * Jobs: builds in memory, the queue, and the builder threads that run
 * them.  Single flight: a BuildImage for an image that a queued or running
 * build will produce joins that build and gets its id (a forced build
 * joins only a forced one).  Two different specs that share a missing
 * layer still build it once: the per-layer locks of the cache see to that,
 * across builders and processes.
 */
#include "server/server-internal.h"

#define STREAM_TICK 0.1 /* seconds a streaming answer with nothing to send sleeps */

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

const char *const srv_status_names[] = { "QUEUED", "BUILDING", "READY", "FAILED", "CANCELLED", "TIMEOUT" };

void srv_new_build_id(char out[IB_BUILD_ID_MAX])
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

void srv_job_free(job *j)
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
void srv_job_ref(job *j)
{
	j->refs++;
}

void srv_job_unref_locked(job *j)
{
	if (--j->refs == 0)
		srv_job_free(j);
}

void srv_job_unref(ib_server *srv, job *j)
{
	pthread_mutex_lock(&srv->mu);
	srv_job_unref_locked(j);
	pthread_mutex_unlock(&srv->mu);
}

void srv_list_append(ib_server *srv, job *j)
{
	j->prev = srv->jobs_tail;
	j->next = NULL;
	if (srv->jobs_tail)
		srv->jobs_tail->next = j;
	else
		srv->jobs_head = j;
	srv->jobs_tail = j;
}

void srv_list_remove(ib_server *srv, job *j)
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

job *srv_find_job(ib_server *srv, const char *id)
{
	for (job *j = srv->jobs_tail; j; j = j->prev)
		if (!strcmp(j->id, id))
			return j;
	return NULL;
}

/* A queued or running build that will produce image_id (force: a forced one). */
job *srv_find_inflight(ib_server *srv, const char *image_id, bool force)
{
	for (job *j = srv->jobs_tail; j; j = j->prev)
		if (!IS_FINAL(j->status) && j->force == force && !strcmp(j->image_id, image_id))
			return j;
	return NULL;
}

unsigned srv_queue_position(ib_server *srv, const job *j)
{
	unsigned pos = 1;

	for (job *q = srv->queue_head; q; q = q->qnext, pos++)
		if (q == j)
			return pos;
	return 0;
}

void srv_queue_push(ib_server *srv, job *j)
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

void srv_queue_remove(ib_server *srv, job *j)
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
void srv_job_finished_locked(ib_server *srv, job *j)
{
	srv->nfinished++;
	resume_waiters(srv, j);
	pthread_cond_broadcast(&srv->done_cv);
	for (job *o = srv->jobs_head; o && srv->nfinished > IB_SERVE_RECENT_MAX;) {
		job *next = o->next;
		if (IS_FINAL(o->status)) {
			srv_list_remove(srv, o);
			srv->nfinished--;
			srv_job_unref_locked(o);
		}
		o = next;
	}
}

static json_t *step_json(size_t i, const char *kind, const char *key, const char *state, bool cached,
			 double seconds)
{
	return json_pack("{s:i, s:s, s:s, s:s, s:b, s:f}", "index", (int)i, "kind", kind, "key", key, "state", state,
			 "cached", cached, "seconds", (double)(int64_t)(seconds * 1000 + 0.5) / 1000);
}

/* The steps of a build as they stand (pending, with force, for a queued one). */
json_t *srv_steps_of(ib_build *b)
{
	const ib_plan *plan = ib_build_plan(b);
	ib_build_status st;
	json_t *a = json_array();

	ib_build_status_get(b, &st);
	for (size_t i = 0; i < plan->nlayers; i++) {
		const ib_build_layer_status *l = &st.layers[i];
		json_array_append_new(a, step_json(i, plan->layers[i].kind, plan->layers[i].key,
						   ib_layer_state_name(l->state), l->cached, l->seconds));
	}
	ib_build_status_clear(&st);
	return a;
}

/* Every layer cached: what a build of an image found in the cache looks like. */
json_t *srv_steps_all_cached(ib_build *b)
{
	const ib_plan *plan = ib_build_plan(b);
	json_t *a = json_array();

	for (size_t i = 0; i < plan->nlayers; i++)
		json_array_append_new(a, step_json(i, plan->layers[i].kind, plan->layers[i].key, "cached", true, 0));
	return a;
}

static ib_final_status final_of(job_status s)
{
	switch (s) {
	case ST_READY: return IB_FINAL_READY;
	case ST_CANCELLED: return IB_FINAL_CANCELLED;
	case ST_TIMEOUT: return IB_FINAL_TIMEOUT;
	default: return IB_FINAL_FAILED;
	}
}

void srv_build_event(ib_server *srv, const job *j, job_status status, double seconds, const char *error)
{
	json_t *e = json_pack("{s:s, s:s, s:s, s:s}", "event", "build", "build_id", j->id, "image_id", j->image_id,
			      "status", srv_status_names[status]);

	if (seconds >= 0)
		json_object_set_new(e, "seconds", json_real((double)(int64_t)(seconds * 1000) / 1000));
	if (error) {
		char *clean = ib_http_utf8_clean(error, 512);
		json_object_set_new(e, "error", json_string(clean));
		free(clean);
	}
	srv_event(srv, e);
}

/*
 * Persist a final status reached without running (cancelled in the queue,
 * at shutdown, or a record that could not be written); j's outcome fields
 * are set.  Not under mu.
 */
void srv_finish_unrun(ib_server *srv, job *j)
{
	ib_build_record rec = { .error_step = -1 };
	json_t *steps = srv_steps_of(j->b);

	rec.steps = srv_dump_json(steps, 0);
	json_decref(steps);
	snprintf(rec.id, sizeof(rec.id), "%s", j->id);
	snprintf(rec.status, sizeof(rec.status), "%s", srv_status_names[j->status]);
	rec.finished = (int64_t)j->finished;
	rec.error = j->error;
	rec.error_step = j->error_step;
	if (ib_builds_finish(srv->builds, &rec) < 0)
		srv_event(srv, json_pack("{s:s, s:s, s:s}", "event", "error", "build_id", j->id, "message",
				     ib_error_last()));
	free(rec.steps);
	srv_build_log(srv, j->id, -1, "build %s: %s", srv_status_names[j->status], j->error ? j->error : "");
	ib_metrics_build(srv->metrics, final_of(j->status), 0);
	srv_build_event(srv, j, j->status, 0, j->error);
}

static void run_job(ib_server *srv, job *j)
{
	ib_build_opts o = {
		.force = j->force,
		.timeout = (double)j->timeout_s,
		.limits = &j->limits,
		.log_fd = -1,
		.cancel = &j->cancel,
	};
	ib_build_record rec = { .error_step = -1 };
	ib_build_status st;
	char *path = srv_log_path(srv, j->id), *steps = NULL, limits[128];
	json_t *steps_doc;
	job_status status;
	double seconds;
	int err;

	o.log_fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0600);
	if (o.log_fd < 0)
		srv_event(srv, json_pack("{s:s, s:s, s:s}", "event", "error", "build_id", j->id, "message",
				     strerror(errno)));
	ib_limits_describe(limits, sizeof(limits), &j->limits);
	srv_build_log(srv, j->id, o.log_fd, "build %s started: image %s%s, timeout %llds, %s", j->id, j->image_id,
		  j->force ? " (forced)" : "", (long long)j->timeout_s, limits);
	steps_doc = srv_steps_of(j->b);
	steps = srv_dump_json(steps_doc, 0);
	json_decref(steps_doc);
	if (ib_builds_start(srv->builds, j->id, (int64_t)j->started, steps) < 0)
		srv_event(srv, json_pack("{s:s, s:s, s:s}", "event", "error", "build_id", j->id, "message",
				     ib_error_last()));
	IB_CRASH_POINT("build-record:after-start");
	free(steps);
	srv_build_event(srv, j, ST_BUILDING, ib_now() - j->run_t0, NULL);

	err = ib_build_run(j->b, srv->cache, &o);
	seconds = ib_now() - j->run_t0;

	switch (err) {
	case 0: status = ST_READY; break;
	case IB_ETIMEOUT: status = ST_TIMEOUT; break;
	case IB_ECANCELED: status = ST_CANCELLED; break;
	default: status = j->cancel ? ST_CANCELLED : ST_FAILED; break;
	}

	ib_build_status_get(j->b, &st);
	pthread_mutex_lock(&srv->mu);
	j->cached = st.cached;
	if (status != ST_READY) {
		j->error_step = st.failed_layer;
		j->error = ib_xstrdup(j->shutdown_cancel && status == ST_CANCELLED ? SHUTDOWN_MESSAGE
				      : st.error ? st.error : ib_error_last());
		j->log_tail = ib_xstrdup(st.log_tail ? st.log_tail : "");
	}
	pthread_mutex_unlock(&srv->mu);

	/* The record and the log first: a poll that sees the final status finds them complete. */
	if (status == ST_READY)
		srv_build_log(srv, j->id, o.log_fd, "build READY in %.1fs%s", seconds, j->cached ? " (cached)" : "");
	else
		srv_build_log(srv, j->id, o.log_fd, "build %s after %.1fs: %s", srv_status_names[status], seconds, j->error);
	steps_doc = srv_steps_of(j->b);
	rec.steps = srv_dump_json(steps_doc, 0);
	json_decref(steps_doc);
	snprintf(rec.id, sizeof(rec.id), "%s", j->id);
	snprintf(rec.status, sizeof(rec.status), "%s", srv_status_names[status]);
	rec.finished = (int64_t)ib_http_wallclock();
	rec.cached = j->cached;
	rec.error_step = j->error_step;
	rec.error = j->error;
	rec.log_tail = j->log_tail;
	if (ib_builds_finish(srv->builds, &rec) < 0)
		srv_event(srv, json_pack("{s:s, s:s, s:s}", "event", "error", "build_id", j->id, "message",
				     ib_error_last()));
	free(rec.steps);
	IB_CRASH_POINT("build-record:after-finish");

	ib_metrics_build(srv->metrics, final_of(status), seconds);
	ib_build_status_clear(&st);
	ib_build_status_get(j->b, &st);
	for (size_t i = 0; i < st.nlayers; i++) {
		const ib_build_layer_status *l = &st.layers[i];
		if (l->state == IB_LAYER_CACHED || l->state == IB_LAYER_DONE)
			ib_metrics_layer(srv->metrics, ib_build_plan(j->b)->layers[i].kind, l->state == IB_LAYER_CACHED,
					 l->seconds);
	}
	ib_build_status_clear(&st);

	pthread_mutex_lock(&srv->mu);
	j->status = status;
	j->finished = ib_http_wallclock();
	srv->nbuilding--;
	srv_job_finished_locked(srv, j);
	pthread_mutex_unlock(&srv->mu);

	srv_build_event(srv, j, status, seconds, status == ST_READY ? NULL : j->error);
	if (o.log_fd >= 0)
		close(o.log_fd);
	free(path);
	/*
	 * The whole file's SHA-256 (GetImage's ext4_sha256, the download's
	 * ETag) reads every byte, holes too: a few seconds for 4 GiB.  Made
	 * here, after READY, so that the first GetImage rarely waits for it.
	 */
	if (status == ST_READY) {
		char sha[IB_SHA256_HEX];
		if (ib_cache_image_digest(srv->cache, j->image_id, sha) < 0)
			ib_error_clear();
	}
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
		srv_queue_remove(srv, j);
		srv_job_ref(j);
		j->status = ST_BUILDING;
		j->started = ib_http_wallclock();
		j->run_t0 = ib_now();
		srv->nbuilding++;
		pthread_mutex_unlock(&srv->mu);
		run_job(srv, j);
		pthread_mutex_lock(&srv->mu);
		srv_job_unref_locked(j);
	}
	pthread_mutex_unlock(&srv->mu);
	return NULL;
}

static void resume_streams(ib_server *srv)
{
	while (srv->streams) {
		req *r = srv->streams;
		srv->streams = r->snext;
		r->snext = NULL;
		r->suspended = false;
		MHD_resume_connection(r->conn);
	}
}

/* Resumes CancelBuild requests whose wait ran out, and streams each tick. */
static void *timer_main(void *arg)
{
	ib_server *srv = arg;
	double tick = 0;

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
		/* streaming answers with nothing to send sleep one tick (a fixed one, however many there are) */
		if (srv->streams && !tick)
			tick = now + STREAM_TICK;
		if (tick && tick < next)
			next = tick;
		ts.tv_sec = (time_t)next;
		ts.tv_nsec = (long)((next - (double)ts.tv_sec) * 1e9);
		pthread_cond_timedwait(&srv->timer_cv, &srv->mu, &ts);
		if (tick && ib_now() >= tick) {
			resume_streams(srv);
			tick = 0;
		}
	}
	resume_waiters(srv, NULL);
	resume_streams(srv);
	pthread_mutex_unlock(&srv->mu);
	return NULL;
}

int srv_threads_start(ib_server *srv)
{
	int err;

	srv->workers = ib_xcalloc(srv->jobs, sizeof(*srv->workers));
	for (; srv->nworkers < srv->jobs; srv->nworkers++)
		if ((err = pthread_create(&srv->workers[srv->nworkers], NULL, builder_main, srv)) != 0)
			return ib_error_set_errno(err, "cannot start a builder thread");
	if ((err = pthread_create(&srv->timer, NULL, timer_main, srv)) != 0)
		return ib_error_set_errno(err, "cannot start the timer thread");
	srv->timer_running = true;
	return 0;
}

void srv_threads_stop(ib_server *srv)
{
	pthread_mutex_lock(&srv->mu);
	srv->stopping = true;
	pthread_cond_broadcast(&srv->work_cv);
	pthread_cond_broadcast(&srv->timer_cv);
	pthread_mutex_unlock(&srv->mu);
	for (unsigned i = 0; i < srv->nworkers; i++)
		pthread_join(srv->workers[i], NULL);
	if (srv->timer_running)
		pthread_join(srv->timer, NULL);
	srv->nworkers = 0;
	srv->timer_running = false;
	free(srv->workers);
	srv->workers = NULL;
}

/* A READY record for an image built elsewhere (a CLI build), made once; its id in out. */
static int adopt_cached(ib_server *srv, ib_spec *spec, ib_build *b, int64_t timeout, char out[IB_BUILD_ID_MAX])
{
	const char *image_id = ib_build_plan(b)->image_id;
	int rc;

	if ((rc = ib_builds_last_ready(srv->builds, image_id, out)) != 0)
		return rc < 0 ? rc : 0;
	pthread_mutex_lock(&srv->adopt_mu);
	if ((rc = ib_builds_last_ready(srv->builds, image_id, out)) == 0) {
		ib_build_record rec = { .error_step = -1, .cached = true };
		json_t *steps = srv_steps_all_cached(b);
		srv_new_build_id(rec.id);
		snprintf(rec.image_id, sizeof(rec.image_id), "%s", image_id);
		snprintf(rec.status, sizeof(rec.status), "READY");
		rec.spec = ib_spec_canonical(spec);
		rec.created = rec.started = rec.finished = (int64_t)ib_http_wallclock();
		rec.timeout_s = timeout;
		rec.steps = srv_dump_json(steps, 0);
		json_decref(steps);
		srv_build_log(srv, rec.id, -1, "image %s was in the cache; nothing to build", image_id);
		rc = ib_builds_insert(srv->builds, &rec);
		if (rc == 0)
			snprintf(out, IB_BUILD_ID_MAX, "%s", rec.id);
		free(rec.spec);
		free(rec.steps);
	}
	pthread_mutex_unlock(&srv->adopt_mu);
	return rc < 0 ? rc : 0;
}

/* Join a build in flight for j's image (under mu): 1 and out filled, 0 none. */
static int join_locked(ib_server *srv, const char *image_id, bool force, srv_submission *out)
{
	job *other = srv_find_inflight(srv, image_id, force);

	if (!other)
		return 0;
	snprintf(out->build_id, sizeof(out->build_id), "%s", other->id);
	out->status = srv_status_names[other->status];
	return 1;
}

int srv_submit(ib_server *srv, ib_spec *spec, ib_build *b, bool force, int64_t timeout, const ib_limits *limits,
	       srv_submission *out)
{
	const char *image_id = ib_build_plan(b)->image_id;
	job *j = NULL;
	int err = 0, rc;

	memset(out, 0, sizeof(*out));
	out->code = IB_CONNECT_INTERNAL;

	/* 1. a build in flight for this image: join it */
	pthread_mutex_lock(&srv->mu);
	rc = join_locked(srv, image_id, force, out);
	pthread_mutex_unlock(&srv->mu);
	if (rc)
		goto done;

	/* 2. in the cache: READY at once, with the build that made it */
	if (!force && (rc = ib_cache_image_get(srv->cache, image_id, NULL)) != 0) {
		if (rc < 0 || (rc = adopt_cached(srv, spec, b, timeout, out->build_id)) < 0) {
			err = rc;
			goto done;
		}
		out->status = srv_status_names[ST_READY];
		out->cached = true;
		goto done;
	}

	/* 3. a new build; someone may have queued the same meanwhile */
	j = ib_xcalloc(1, sizeof(*j));
	srv_new_build_id(j->id);
	snprintf(j->image_id, sizeof(j->image_id), "%s", image_id);
	j->spec = spec;
	j->b = b;
	spec = NULL;
	b = NULL;
	j->force = force;
	j->timeout_s = timeout;
	j->limits = *limits;
	j->error_step = -1;
	j->created = ib_http_wallclock();
	j->status = ST_QUEUED;
	j->refs = 1; /* the list's */

	pthread_mutex_lock(&srv->mu);
	if (join_locked(srv, j->image_id, force, out)) {
		pthread_mutex_unlock(&srv->mu);
		srv_job_free(j);
		goto done;
	}
	if (srv->draining || srv->nqueued + srv->ninserting >= IB_SERVE_QUEUE_MAX) {
		bool draining = srv->draining;
		pthread_mutex_unlock(&srv->mu);
		srv_job_free(j);
		out->code = draining ? IB_CONNECT_UNAVAILABLE : IB_CONNECT_RESOURCE_EXHAUSTED;
		err = draining ? ib_error_set("the server is shutting down; retry later")
			       : ib_error_set("the build queue is full (%d builds waiting)", IB_SERVE_QUEUE_MAX);
		goto done;
	}
	j->inserting = true;
	srv->ninserting++;
	srv_list_append(srv, j);
	srv_job_ref(j); /* ours, until queued */
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
		srv_build_log(srv, j->id, -1, "build %s queued: image %s", j->id, j->image_id);
		err = ib_builds_insert(srv->builds, &rec);
		free(rec.spec);
		if (!err)
			IB_CRASH_POINT("build-record:after-insert");
	}
	snprintf(out->build_id, sizeof(out->build_id), "%s", j->id);

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
		srv_job_finished_locked(srv, j);
		out->status = srv_status_names[j->status];
		pthread_mutex_unlock(&srv->mu);
		if (err == 0)
			srv_finish_unrun(srv, j);
		else
			ib_error_set("%s", j->error);
	} else {
		srv_queue_push(srv, j);
		out->status = srv_status_names[j->status];
		pthread_mutex_unlock(&srv->mu);
		srv_build_event(srv, j, ST_QUEUED, -1, NULL);
	}
	srv_job_unref(srv, j);
done:
	ib_build_free(b);
	ib_spec_free(spec);
	return err;
}

srv_cancel_result srv_cancel(ib_server *srv, const char *id, srv_call *c, const char **out_status)
{
	req *r = c->r;
	job *j;

	pthread_mutex_lock(&srv->mu);
	j = srv_find_job(srv, id);
	if (!j) {
		pthread_mutex_unlock(&srv->mu);
		return SRV_CANCEL_UNKNOWN;
	}
	if (IS_FINAL(j->status)) {
		*out_status = srv_status_names[j->status];
		pthread_mutex_unlock(&srv->mu);
		return SRV_CANCEL_ANSWERED;
	}
	if (j->queued) {
		srv_queue_remove(srv, j);
		j->cancel = 1;
		j->status = ST_CANCELLED;
		j->error = ib_xstrdup("cancelled before it started");
		j->finished = ib_http_wallclock();
		srv_job_ref(j);
		srv_job_finished_locked(srv, j);
		pthread_mutex_unlock(&srv->mu);
		srv_finish_unrun(srv, j);
		srv_job_unref(srv, j);
		*out_status = srv_status_names[ST_CANCELLED];
		return SRV_CANCEL_ANSWERED;
	}
	j->cancel = 1;
	if (srv->stopping) {
		/* no timer left to resume a wait: answer as things stand */
		*out_status = srv_status_names[j->status];
		pthread_mutex_unlock(&srv->mu);
		return SRV_CANCEL_ANSWERED;
	}
	/* running (or being recorded): wait for it to stop, without holding a thread */
	srv_job_ref(j);
	if (!r) {
		/* the caller polls */
		c->wait_job = j;
		c->wait_deadline = ib_now() + IB_SERVE_CANCEL_WAIT;
		pthread_mutex_unlock(&srv->mu);
		return SRV_CANCEL_WAITING;
	}
	r->wait_job = j;
	r->wait_deadline = ib_now() + IB_SERVE_CANCEL_WAIT;
	r->phase = PHASE_WAITING;
	r->wnext = srv->waiters;
	srv->waiters = r;
	MHD_suspend_connection(r->conn);
	pthread_cond_signal(&srv->timer_cv);
	pthread_mutex_unlock(&srv->mu);
	return SRV_CANCEL_WAITING;
}

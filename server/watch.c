/*
 * WatchBuild: a build followed until its final status, as a stream of
 * WatchBuildResponse documents (proto/imagebuilder/v1, "WatchBuild").
 * The transports poll srv_watch_next() when they can send (each tick, or
 * at once for the first message); it never blocks, so one thread can
 * carry many streams.
 */
#include "server/server-internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define WATCH_CHUNK (32 * 1024)         /* log bytes per message */
#define WATCH_LOG_PER_POLL (256 * 1024) /* log bytes per call, so no stream holds its thread long */

struct srv_watch {
	char id[IB_BUILD_ID_MAX];
	uint64_t offset;   /* the next log byte to send */
	bool started;      /* the first snapshot is sent */
	char status[16];   /* as last sent */
	json_int_t position;
	json_t *states;    /* the steps' states as last sent: an array of strings */
	bool short_read;   /* the log file ended before the size it had */
	int final_polls;   /* polls that saw the final status with the whole log sent */
};

void srv_watch_free(srv_watch *w)
{
	if (!w)
		return;
	json_decref(w->states);
	free(w);
}

int srv_watch_start(srv_call *c, json_t *msg)
{
	const char *id = srv_build_id_arg(c, msg);
	int64_t offset = 0;
	uint64_t size;
	srv_watch *w;

	if (!id)
		return SRV_CALL_ERROR;
	if (srv_int_field(&offset, msg, "log_offset", "logOffset") < 0 || offset < 0)
		return srv_call_error(c, IB_CONNECT_INVALID_ARGUMENT, "log_offset: must be a whole number of bytes");
	/* the build must exist now: not_found before the stream starts */
	if (srv_build_answer(c, id) < 0)
		return SRV_CALL_ERROR;
	json_decref(c->answer);
	c->answer = NULL;
	size = srv_log_size(c->srv, id);
	if ((uint64_t)offset > size)
		return srv_call_error(c, IB_CONNECT_OUT_OF_RANGE, "log_offset: %lld is past the end of the log (%llu bytes)",
				      (long long)offset, (unsigned long long)size);
	w = ib_xcalloc(1, sizeof(*w));
	snprintf(w->id, sizeof(w->id), "%s", id);
	w->offset = (uint64_t)offset;
	w->states = json_array();
	c->watch = w;
	return SRV_CALL_OK;
}

/* Log bytes from w->offset up to end (at most WATCH_LOG_PER_POLL), as log messages. */
static int add_log(srv_call *c, srv_watch *w, uint64_t end, json_t *events)
{
	char *path, *buf;
	uint64_t stop = end - w->offset > WATCH_LOG_PER_POLL ? w->offset + WATCH_LOG_PER_POLL : end;
	int fd, err = 0;

	if (w->offset >= end)
		return 0;
	path = srv_log_path(c->srv, w->id);
	fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
	free(path);
	if (fd < 0)
		return srv_call_error(c, IB_CONNECT_INTERNAL, "cannot read the build log: %s", strerror(errno));
	buf = ib_xmalloc(WATCH_CHUNK);
	while (w->offset < stop) {
		size_t want = stop - w->offset < WATCH_CHUNK ? (size_t)(stop - w->offset) : WATCH_CHUNK;
		ssize_t n = pread(fd, buf, want, (off_t)w->offset);
		json_t *data;

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			err = srv_call_error(c, IB_CONNECT_INTERNAL, "cannot read the build log: %s", strerror(errno));
			break;
		}
		if (n == 0) {
			w->short_read = true; /* shorter than it was */
			break;
		}
		data = srv_json_base64(buf, (size_t)n);
		json_array_append_new(events, json_pack("{s:{s:I, s:o}}", "log", "offset", (json_int_t)w->offset, "data",
							data));
		w->offset += (uint64_t)n;
	}
	free(buf);
	close(fd);
	return err;
}

/* Did the build finish in the last two seconds? */
static bool just_finished(json_t *doc)
{
	const char *at = json_string_value(json_object_get(doc, "finished_at"));
	struct tm tm = { 0 };
	const char *end;

	if (!at || !(end = strptime(at, "%Y-%m-%dT%H:%M:%S", &tm)))
		return false;
	return ib_http_wallclock() - (double)timegm(&tm) < 3;
}

int srv_watch_next(srv_call *c, json_t *events)
{
	srv_watch *w = c->watch;
	json_t *doc, *steps;
	const char *status;
	json_int_t position;
	uint64_t log_bytes;
	bool final, changed;
	size_t i;
	json_t *step;

	if (srv_build_answer(c, w->id) < 0)
		return SRV_CALL_ERROR;
	doc = c->answer;
	c->answer = NULL;
	status = json_string_value(json_object_get(doc, "status"));
	position = json_integer_value(json_object_get(doc, "queue_position"));
	log_bytes = (uint64_t)json_integer_value(json_object_get(doc, "log_bytes"));
	final = ib_build_status_final(status);
	steps = json_object_get(doc, "steps");
	changed = strcmp(status, w->status) || position != w->position;

	if (!w->started) {
		json_array_append_new(events, json_pack("{s:O}", "build", doc));
		json_array_foreach(steps, i, step)
			json_array_append_new(w->states, json_copy(json_object_get(step, "state")));
	} else {
		/* a step event for each state that changed */
		json_array_foreach(steps, i, step) {
			json_t *state = json_object_get(step, "state"), *was = json_array_get(w->states, i);
			if (was && json_equal(was, state))
				continue;
			json_array_append_new(events, json_pack("{s:O}", "step", step));
			if (was)
				json_array_set(w->states, i, state);
			else
				json_array_append(w->states, state);
		}
	}
	if (add_log(c, w, log_bytes, events) < 0) {
		json_decref(doc);
		return SRV_CALL_ERROR;
	}
	if (final && w->offset < log_bytes && !w->short_read) {
		/* the final snapshot waits for the rest of the log */
		w->started = true;
		json_decref(doc);
		return SRV_CALL_WAIT;
	}
	/*
	 * A build that has just ended may still get its last log line (a
	 * build cancelled while queued, or at shutdown, has it written after
	 * its status): one more poll before the stream ends.
	 */
	if (final && w->final_polls++ == 0 && just_finished(doc)) {
		w->started = true;
		json_decref(doc);
		return SRV_CALL_WAIT;
	}
	if (w->started && (changed || final))
		json_array_append_new(events, json_pack("{s:O}", "build", doc));
	else if (!w->started && final && json_array_size(events) > 1)
		json_array_append_new(events, json_pack("{s:O}", "build", doc)); /* after the log it carried */
	w->started = true;
	snprintf(w->status, sizeof(w->status), "%s", status);
	w->position = position;
	json_decref(doc);
	return final ? SRV_CALL_OK : SRV_CALL_WAIT;
}

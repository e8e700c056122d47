/*
 * The ImageBuilder methods (CONTRACT.md section 5) over Connect's unary
 * JSON protocol.  Every method is safe to repeat: BuildImage joins or
 * answers from the cache, GetBuild and GetImage only read, CancelBuild of a
 * finished build returns its final status.
 */
#include "server/server-internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

const srv_rpc srv_rpcs[] = {
	[RPC_BUILD_IMAGE] = { "BuildImage", IB_EP_BUILD_IMAGE, false, &imagebuilder__v1__build_image_request__descriptor,
			      &imagebuilder__v1__build_image_response__descriptor },
	[RPC_GET_BUILD] = { "GetBuild", IB_EP_GET_BUILD, true, &imagebuilder__v1__get_build_request__descriptor,
			    &imagebuilder__v1__get_build_response__descriptor },
	[RPC_CANCEL_BUILD] = { "CancelBuild", IB_EP_CANCEL_BUILD, false,
			       &imagebuilder__v1__cancel_build_request__descriptor,
			       &imagebuilder__v1__cancel_build_response__descriptor },
	[RPC_GET_IMAGE] = { "GetImage", IB_EP_GET_IMAGE, true, &imagebuilder__v1__get_image_request__descriptor,
			    &imagebuilder__v1__get_image_response__descriptor },
	[RPC_WATCH_BUILD] = { "WatchBuild", IB_EP_WATCH_BUILD, false, &imagebuilder__v1__watch_build_request__descriptor,
			      &imagebuilder__v1__watch_build_response__descriptor, true },
};

/* Build ids are ours (32 lowercase hex digits); reject anything else early. */
bool srv_build_id_ok(const char *s)
{
	size_t n = 0;

	for (; s[n]; n++)
		if (!((s[n] >= '0' && s[n] <= '9') || (s[n] >= 'a' && s[n] <= 'f')) || n >= IB_BUILD_ID_MAX - 1)
			return false;
	return n == 32;
}

static struct answer *answer_slot(ib_server *srv, const unsigned char key[IB_SHA256_LEN])
{
	return &srv->answers[((unsigned)key[0] << 8 | key[1]) % ANSWER_SLOTS];
}

/*
 * A fresh remembered answer for this body whose image file is still there:
 * its ids, true.  The file is checked by the path remembered with the
 * answer, so a hit costs no index query.
 */
bool srv_answer_lookup(ib_server *srv, const unsigned char key[IB_SHA256_LEN], char image_id[IB_SHA256_HEX],
		       char build_id[IB_BUILD_ID_MAX])
{
	struct answer *a = answer_slot(srv, key);
	char *file = NULL;
	struct stat st;
	bool hit;

	pthread_mutex_lock(&srv->answer_mu);
	hit = a->used && !memcmp(a->key, key, IB_SHA256_LEN) && ib_now() - a->checked < ANSWER_TTL;
	if (hit) {
		memcpy(image_id, a->image_id, IB_SHA256_HEX);
		memcpy(build_id, a->build_id, IB_BUILD_ID_MAX);
		file = ib_xstrdup(a->file);
	}
	pthread_mutex_unlock(&srv->answer_mu);
	hit = hit && stat(file, &st) == 0 && S_ISREG(st.st_mode);
	free(file);
	return hit;
}

static void answer_store(ib_server *srv, const unsigned char key[IB_SHA256_LEN], const char *image_id,
			 const char *build_id)
{
	struct answer *a = answer_slot(srv, key);
	char *file = ib_cache_image_path(srv->cache, image_id);

	pthread_mutex_lock(&srv->answer_mu);
	memcpy(a->key, key, IB_SHA256_LEN);
	a->used = true;
	a->checked = ib_now();
	snprintf(a->image_id, sizeof(a->image_id), "%s", image_id);
	snprintf(a->build_id, sizeof(a->build_id), "%s", build_id);
	free(a->file);
	a->file = file;
	pthread_mutex_unlock(&srv->answer_mu);
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
	unsigned pos = j->status == ST_QUEUED ? srv_queue_position(srv, j) : 0;

	json_object_set_new(doc, "build_id", json_string(j->id));
	json_object_set_new(doc, "image_id", json_string(j->image_id));
	json_object_set_new(doc, "status", json_string(srv_status_names[j->status]));
	json_object_set_new(doc, "cached", json_boolean(j->cached));
	json_object_set_new(doc, "force_build", json_boolean(j->force));
	json_object_set_new(doc, "timeout_s", json_integer(j->timeout_s));
	json_object_set_new(doc, "queue_position", pos ? json_integer(pos) : json_null());
	json_object_set_new(doc, "created_at", srv_time_or_null(j->created));
	json_object_set_new(doc, "started_at", srv_time_or_null(j->started));
	json_object_set_new(doc, "finished_at", srv_time_or_null(j->finished));
	json_object_set_new(doc, "steps", srv_steps_of(j->b));
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
	json_object_set_new(doc, "created_at", srv_time_or_null((double)rec->created));
	json_object_set_new(doc, "started_at", srv_time_or_null((double)rec->started));
	json_object_set_new(doc, "finished_at", srv_time_or_null((double)rec->finished));
	json_object_set_new(doc, "steps", json_is_array(steps) ? steps : json_array());
	if (steps && !json_is_array(steps))
		json_decref(steps);
	json_object_set_new(doc, "error",
			    ib_build_status_final(rec->status) && strcmp(rec->status, "READY")
				    ? error_json(rec->error_step, rec->error, rec->log_tail)
				    : json_null());
	return doc;
}

static json_t *field(json_t *msg, const char *snake, const char *camel)
{
	json_t *v = json_object_get(msg, snake);

	if (!v || json_is_null(v))
		v = json_object_get(msg, camel);
	return json_is_null(v) ? NULL : v;
}

/* An integer field, as a number or a decimal string (proto3 int64). */
int srv_int_field(int64_t *out, json_t *msg, const char *snake, const char *camel)
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

/* READY, cached: the answer for image_id and build_id. */
json_t *srv_cached_answer(ib_server *srv, const char *image_id, const char *build_id)
{
	srv_touch_image(srv, image_id);
	ib_metrics_image_lookup(srv->metrics, true);
	return json_pack("{s:s, s:s, s:s, s:b}", "image_id", image_id, "build_id", build_id, "status", "READY", "cached",
			 1);
}

/* The same, as the Connect JSON body, written by hand: the hot path of a client polling BuildImage. */
enum MHD_Result srv_respond_cached(req *r, struct MHD_Connection *c)
{
	char *body;

	r->cached = 1;
	if (r->proto)
		return srv_respond_json(r, c, srv_cached_answer(r->srv, r->image_id, r->build_id));
	srv_touch_image(r->srv, r->image_id);
	ib_metrics_image_lookup(r->srv->metrics, true);
	body = ib_xasprintf("{\"image_id\":\"%s\",\"build_id\":\"%s\",\"status\":\"READY\",\"cached\":true}",
			    r->image_id, r->build_id);
	return srv_respond(r, c, MHD_HTTP_OK, "application/json", body, strlen(body));
}

int srv_call_error(srv_call *c, ib_connect_code code, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	free(c->message);
	if (vasprintf(&c->message, fmt, ap) < 0)
		abort();
	va_end(ap);
	c->code = code;
	return SRV_CALL_ERROR;
}

static int answer(srv_call *c, json_t *doc)
{
	if (!doc)
		return srv_call_error(c, IB_CONNECT_INTERNAL, "cannot render the answer");
	json_decref(c->answer);
	c->answer = doc;
	return SRV_CALL_OK;
}

/*
 * limits: {"memory": "2G", "pids": 512, "cpus": "1.5", "disk": "8G"}, each
 * as the command line takes it (a number or a string); what it leaves out
 * is the server's.  More than the server's (or none where the server has
 * one) is refused: a request may only ask for less.
 */
static int limits_field(ib_limits *out, json_t *msg, const ib_limits *server)
{
	json_t *v = field(msg, "limits", "limits"), *x;
	const char *name, *over;
	char buf[64], want[32], max[32];

	*out = *server;
	if (!v)
		return 0;
	if (!json_is_object(v))
		return ib_error_set("limits: must be an object, not %s", ib_field_type_name(v));
	json_object_foreach(v, name, x) {
		if (json_is_null(x))
			continue; /* the server's */
		if (json_is_integer(x) && json_integer_value(x) >= 0)
			snprintf(buf, sizeof(buf), "%" JSON_INTEGER_FORMAT, json_integer_value(x));
		else if (json_is_real(x) && json_real_value(x) >= 0 && json_real_value(x) < 1e15)
			snprintf(buf, sizeof(buf), "%.3f", json_real_value(x)); /* cpus: 1.5 */
		else if (json_is_string(x) && json_string_length(x) < sizeof(buf))
			snprintf(buf, sizeof(buf), "%s", json_string_value(x));
		else
			return ib_error_set("limits.%.64s: must be a number or a short string", name);
		if (ib_limits_set(out, name, buf) < 0)
			return ib_error_prefix("limits.%.64s", name), IB_EINVALID;
	}
	if (!(over = ib_limits_over(out, server)))
		return 0;
	ib_limit_format(want, out, over);
	ib_limit_format(max, server, over);
	return ib_error_set("limits.%s: %s is more than this server allows (%s); a build may ask for less, never more",
			    over, want, max);
}

static int rpc_build_image(srv_call *c, json_t *msg)
{
	ib_server *srv = c->srv;
	json_t *spec_v = field(msg, "spec", "spec"), *force_v = field(msg, "force_build", "forceBuild");
	char *doc = NULL;
	size_t len;
	ib_spec *spec = NULL;
	ib_build *b = NULL;
	srv_submission sub;
	int64_t timeout = 0;
	ib_limits limits;
	int err, rc;
	int ret;
	bool force = force_v && json_is_true(force_v);

	if (!spec_v)
		return srv_call_error(c, IB_CONNECT_INVALID_ARGUMENT, "spec: required");
	if (force_v && !json_is_boolean(force_v))
		return srv_call_error(c, IB_CONNECT_INVALID_ARGUMENT, "force_build: must be a boolean");
	if ((rc = srv_int_field(&timeout, msg, "timeout_s", "timeoutS")) < 0 || timeout < 0 || timeout > IB_TIMEOUT_MAX)
		return srv_call_error(c, IB_CONNECT_INVALID_ARGUMENT,
				     "timeout_s: must be a whole number of seconds from 1 to %d (0: the default, %d)",
				     IB_TIMEOUT_MAX, IB_STEP_TIMEOUT_DEFAULT);
	if (timeout == 0)
		timeout = IB_STEP_TIMEOUT_DEFAULT;
	if (limits_field(&limits, msg, &srv->cfg->limits) < 0)
		return srv_call_error(c, IB_CONNECT_INVALID_ARGUMENT, "%s", ib_error_last());

	/* The spec as an object, or as a JSON document in a string. */
	if (json_is_object(spec_v)) {
		doc = srv_dump_json(spec_v, JSON_ENCODE_ANY);
		len = strlen(doc);
	} else if (json_is_string(spec_v)) {
		len = json_string_length(spec_v);
		doc = ib_xstrndup(json_string_value(spec_v), len);
		/* keep NUL bytes: the spec parser names the field that holds one */
		memcpy(doc, json_string_value(spec_v), len);
	} else {
		return srv_call_error(c, IB_CONNECT_INVALID_ARGUMENT,
				     "spec: must be an object (or a string holding a JSON document), not %s",
				     ib_field_type_name(spec_v));
	}
	if ((err = ib_spec_parse(&spec, doc, len)) < 0) {
		const char *m = ib_error_last();
		ret = err == IB_EINVALID ? srv_call_error(c, IB_CONNECT_INVALID_ARGUMENT, "%s%s",
							 strncmp(m, "spec", 4) ? "spec." : "", m)
					 : srv_call_error(c, IB_CONNECT_INTERNAL, "%s", m);
		goto out;
	}
	if ((err = ib_build_new(&b, spec, srv->cfg)) < 0) {
		ret = srv_call_error(c, err == IB_EINVALID ? IB_CONNECT_INVALID_ARGUMENT : IB_CONNECT_INTERNAL,
					"%s", ib_error_last());
		goto out;
	}
	snprintf(c->image_id, sizeof(c->image_id), "%s", ib_build_plan(b)->image_id);
	err = srv_submit(srv, spec, b, force, timeout, &limits, &sub);
	spec = NULL;
	b = NULL;
	if (err < 0) {
		ret = srv_call_error(c, sub.code, "%s", ib_error_last());
		goto out;
	}
	snprintf(c->build_id, sizeof(c->build_id), "%s", sub.build_id);
	if (sub.cached) {
		if (c->digest)
			answer_store(srv, c->digest, c->image_id, c->build_id);
		c->cached = 1;
		ret = answer(c, srv_cached_answer(srv, c->image_id, c->build_id));
		goto out;
	}
	ib_metrics_image_lookup(srv->metrics, false);
	c->cached = 0;
	ret = answer(c, json_pack("{s:s, s:s, s:s, s:b}", "image_id", c->image_id, "build_id", c->build_id,
					   "status", sub.status, "cached", 0));
out:
	ib_build_free(b);
	ib_spec_free(spec);
	free(doc);
	return ret;
}

/* The build id of a GetBuild or CancelBuild request, or an error response. */
const char *srv_build_id_arg(srv_call *c, json_t *msg)
{
	bool bad;
	const char *id = string_field(msg, "build_id", "buildId", &bad);

	if (!id || bad) {
		srv_call_error(c, IB_CONNECT_INVALID_ARGUMENT, "build_id: %s",
				     bad ? "must be a string" : "required");
		return NULL;
	}
	if (!srv_build_id_ok(id)) {
		char q[IB_FIELD_QUOTE_MAX];
		srv_call_error(c, IB_CONNECT_NOT_FOUND, "no build %s",
				     ib_field_quote(q, id, json_string_length(field(msg, "build_id", "buildId"))));
		return NULL;
	}
	snprintf(c->build_id, sizeof(c->build_id), "%s", id);
	return id;
}

/* The base URL of rootfs and log links: --public-url, else the Host the client used. */
static char *base_url(srv_call *c)
{
	const char *host = c->host;

	if (c->srv->public_url)
		return ib_xstrdup(c->srv->public_url);
	if (host && *host && strlen(host) < 256 && !strpbrk(host, "/\\ \"<>"))
		return ib_xasprintf("http://%s", host);
	return ib_xstrdup("");
}

/*
 * The GetBuild answer for build id (well formed): from memory, else from
 * its record.  SRV_CALL_OK with c->answer, or an error.
 */
int srv_build_answer(srv_call *c, const char *id)
{
	ib_server *srv = c->srv;
	ib_build_record rec;
	json_t *doc = NULL;
	char *base;
	job *j;
	int rc;

	pthread_mutex_lock(&srv->mu);
	if ((j = srv_find_job(srv, id)))
		doc = job_json_locked(srv, j);
	pthread_mutex_unlock(&srv->mu);
	if (!doc) {
		if ((rc = ib_builds_get(srv->builds, id, &rec)) < 0)
			return srv_call_error(c, IB_CONNECT_INTERNAL, "%s", ib_error_last());
		if (rc == 0)
			return srv_call_error(c, IB_CONNECT_NOT_FOUND, "no build '%s'", id);
		doc = record_json(&rec);
		ib_build_record_clear(&rec);
	}
	snprintf(c->image_id, sizeof(c->image_id), "%s", json_string_value(json_object_get(doc, "image_id")));
	json_object_set_new(doc, "log_bytes", json_integer((json_int_t)srv_log_size(srv, id)));
	/* absolute, like rootfs_url */
	base = base_url(c);
	json_object_set_new(doc, "log_url", json_sprintf("%s/v1/builds/%s/logs", base, id));
	free(base);
	return answer(c, doc);
}

static int rpc_get_build(srv_call *c, json_t *msg)
{
	const char *id = srv_build_id_arg(c, msg);

	return id ? srv_build_answer(c, id) : SRV_CALL_ERROR;
}

int srv_cancel_answer(srv_call *c, const char *status)
{
	return answer(c, json_pack("{s:s, s:s}", "build_id", c->build_id, "status", status));
}

static int rpc_cancel_build(srv_call *c, json_t *msg)
{
	ib_server *srv = c->srv;
	ib_build_record rec;
	const char *id = srv_build_id_arg(c, msg), *status = NULL;
	int rc, ret;

	if (!id)
		return SRV_CALL_ERROR;
	switch (srv_cancel(srv, id, c, &status)) {
	case SRV_CANCEL_ANSWERED:
		return srv_cancel_answer(c, status);
	case SRV_CANCEL_WAITING:
		return SRV_CALL_WAIT;
	case SRV_CANCEL_UNKNOWN:
		break;
	}
	if ((rc = ib_builds_get(srv->builds, id, &rec)) < 0)
		return srv_call_error(c, IB_CONNECT_INTERNAL, "%s", ib_error_last());
	if (rc == 0)
		return srv_call_error(c, IB_CONNECT_NOT_FOUND, "no build '%s'", id);
	snprintf(c->image_id, sizeof(c->image_id), "%s", rec.image_id);
	ret = srv_cancel_answer(c, rec.status);
	ib_build_record_clear(&rec);
	return ret;
}

/*
 * A CancelBuild waiting for its build to stop, polled by a caller that
 * has no suspended request (HTTP/2): SRV_CALL_WAIT while it runs and the
 * wait has time left, else the answer.
 */
int srv_cancel_poll(srv_call *c)
{
	ib_server *srv = c->srv;
	const char *status = NULL;

	pthread_mutex_lock(&srv->mu);
	if (IS_FINAL(c->wait_job->status) || ib_now() >= c->wait_deadline || srv->stopping) {
		status = srv_status_names[c->wait_job->status];
		srv_job_unref_locked(c->wait_job);
		c->wait_job = NULL;
	}
	pthread_mutex_unlock(&srv->mu);
	return status ? srv_cancel_answer(c, status) : SRV_CALL_WAIT;
}

static int rpc_get_image(srv_call *c, json_t *msg)
{
	ib_server *srv = c->srv;
	ib_image_info info = { 0 };
	json_t *doc, *layers;
	bool bad;
	const char *id = string_field(msg, "image_id", "imageId", &bad);
	char *base, created[32];
	const ib_image_meta *m;
	int rc;

	if (!id || bad)
		return srv_call_error(c, IB_CONNECT_INVALID_ARGUMENT, "image_id: %s",
					 bad ? "must be a string" : "required");
	if (!ib_is_hex64(id)) {
		char q[IB_FIELD_QUOTE_MAX];
		return srv_call_error(c, IB_CONNECT_INVALID_ARGUMENT,
					 "image_id: %s is not an image id (64 hex digits)", ib_field_quote(q, id, strlen(id)));
	}
	snprintf(c->image_id, sizeof(c->image_id), "%s", id);
	if ((rc = ib_cache_image_get(srv->cache, id, &info)) <= 0)
		return rc < 0 ? srv_call_error(c, IB_CONNECT_INTERNAL, "%s", ib_error_last())
			      : srv_call_error(c, IB_CONNECT_NOT_FOUND, "no image '%s'", id);
	m = info.meta;
	if (!info.ext4_sha256[0] && ib_cache_image_digest(srv->cache, id, info.ext4_sha256) < 0) {
		ib_image_info_clear(&info);
		return srv_call_error(c, IB_CONNECT_INTERNAL, "%s", ib_error_last());
	}
	layers = json_array();
	for (size_t i = 0; i < info.nlayers; i++)
		json_array_append_new(layers, json_string(info.layers[i]));
	base = base_url(c);
	ib_http_time(created, (double)info.created);
	doc = json_pack("{s:s, s:s, s:o, s:O, s:o, s:s, s:I, s:I, s:s, s:o, s:s+++, s:s+++, s:s+++}", "image_id",
			info.id, "arch", info.arch, "base", m->base ? json_string(m->base) : json_null(), "env", m->env,
			"python_version", m->python_version ? json_string(m->python_version) : json_null(),
			"ext4_sha256", info.ext4_sha256, "ext4_bytes", (json_int_t)info.ext4_bytes, "disk_size",
			(json_int_t)(m->disk_size ? m->disk_size : info.ext4_bytes), "created_at", created, "layers",
			layers, "rootfs_url", base, "/v1/images/", info.id, "/rootfs.ext4", "rootfs_zst_url", base,
			"/v1/images/", info.id, "/rootfs.ext4.zst", "rootfs_bmap_url", base, "/v1/images/", info.id,
			"/rootfs.ext4.bmap");
	free(base);
	ib_image_info_clear(&info);
	if (!doc)
		return srv_call_error(c, IB_CONNECT_INTERNAL, "cannot render image '%s'", id);
	return answer(c, doc);
}

/* ---- routing ---- */

rpc_kind srv_rpc_of(const char *url)
{
	if (strncmp(url, RPC_PREFIX, sizeof(RPC_PREFIX) - 1))
		return RPC_NONE;
	url += sizeof(RPC_PREFIX) - 1;
	for (size_t i = 0; i < RPC_COUNT; i++)
		if (!strcmp(url, srv_rpcs[i].name))
			return (rpc_kind)i;
	return RPC_NONE;
}

int srv_call_decode(srv_call *c, const ProtobufCMessageDescriptor *d, bool proto, const char *data, size_t len,
		    json_t **out)
{
	json_error_t jerr;
	json_t *msg;

	*out = NULL;
	/* An empty body is the empty message, as in Connect. */
	if (len == 0) {
		msg = json_object();
	} else if (proto) {
		ProtobufCMessage *m = protobuf_c_message_unpack(d, NULL, len, (const uint8_t *)data);
		if (!m)
			return srv_call_error(c, IB_CONNECT_INVALID_ARGUMENT, "request: not a valid %s message", d->name);
		msg = srv_pb_to_json(m);
		protobuf_c_message_free_unpacked(m, NULL);
		if (!msg)
			return srv_call_error(c, IB_CONNECT_INVALID_ARGUMENT, "request: %s", ib_error_last());
	} else {
		msg = json_loadb(data, len, JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, &jerr);
		if (!msg)
			return srv_call_error(c, IB_CONNECT_INVALID_ARGUMENT,
					      "request: invalid JSON at line %d column %d: %s", jerr.line, jerr.column,
					      jerr.text);
		if (!json_is_object(msg)) {
			json_decref(msg);
			return srv_call_error(c, IB_CONNECT_INVALID_ARGUMENT, "request: must be a JSON object");
		}
	}
	*out = msg;
	return SRV_CALL_OK;
}

int srv_call_run(srv_call *c, bool proto, const char *data, size_t len)
{
	json_t *msg;
	int ret;

	if (srv_call_decode(c, srv_rpcs[c->k].in, proto, data, len, &msg) < 0)
		return SRV_CALL_ERROR;
	switch (c->k) {
	case RPC_BUILD_IMAGE: ret = rpc_build_image(c, msg); break;
	case RPC_GET_BUILD: ret = rpc_get_build(c, msg); break;
	case RPC_CANCEL_BUILD: ret = rpc_cancel_build(c, msg); break;
	case RPC_GET_IMAGE: ret = rpc_get_image(c, msg); break;
	case RPC_WATCH_BUILD: ret = srv_watch_start(c, msg); break;
	default: ret = srv_call_error(c, IB_CONNECT_UNIMPLEMENTED, "no such method"); break;
	}
	json_decref(msg);
	return ret;
}

int srv_call_encode(srv_call *c, const ProtobufCMessageDescriptor *d, bool proto, json_t *doc, char **out,
		    size_t *out_len)
{
	ProtobufCMessage *m = NULL;

	*out = NULL;
	if (!proto) {
		*out = srv_dump_json(doc, 0);
		*out_len = strlen(*out);
		return SRV_CALL_OK;
	}
	/* the same answer as binary Protobuf */
	if (srv_pb_from_json(d, doc, &m) < 0)
		return srv_call_error(c, IB_CONNECT_INTERNAL, "cannot encode the answer: %s", ib_error_last());
	*out_len = protobuf_c_message_get_packed_size(m);
	*out = ib_xmalloc(*out_len ? *out_len : 1);
	protobuf_c_message_pack(m, (uint8_t *)*out);
	protobuf_c_message_free_unpacked(m, NULL);
	return SRV_CALL_OK;
}

void srv_call_init(srv_call *c, ib_server *srv, rpc_kind k, const char *host)
{
	memset(c, 0, sizeof(*c));
	c->srv = srv;
	c->k = k;
	c->cached = -1;
	c->host = host && strlen(host) < 256 ? ib_xstrdup(host) : NULL;
}

void srv_call_clear(srv_call *c)
{
	if (c->wait_job)
		srv_job_unref(c->srv, c->wait_job);
	srv_watch_free(c->watch);
	json_decref(c->answer);
	free(c->message);
	free(c->host);
	memset(c, 0, sizeof(*c));
}

/* A Connect unary call over HTTP/1.1: the call's outcome as r's answer. */
enum MHD_Result srv_dispatch_rpc(req *r, struct MHD_Connection *c, rpc_kind k, const char *data, size_t len)
{
	srv_call call;
	enum MHD_Result ret;
	int rc;

	r->rpc = (int)k;
	if (srv_rpcs[k].streaming)
		return srv_respond_http(r, c, MHD_HTTP_UNSUPPORTED_MEDIA_TYPE, IB_CONNECT_UNIMPLEMENTED, "Accept-Post",
					"application/connect+json, application/connect+proto",
					"a server-streaming method: application/connect+json or +proto (or gRPC, gRPC-Web)");
	srv_call_init(&call, r->srv, k, srv_header_value(c, MHD_HTTP_HEADER_HOST));
	call.r = r;
	call.digest = r->have_digest ? r->digest : NULL;
	rc = srv_call_run(&call, r->proto, data, len);
	memcpy(r->build_id, call.build_id, sizeof(r->build_id));
	memcpy(r->image_id, call.image_id, sizeof(r->image_id));
	r->cached = call.cached;
	if (rc == SRV_CALL_OK) {
		ret = srv_respond_json(r, c, call.answer);
		call.answer = NULL;
	} else if (rc == SRV_CALL_WAIT) {
		ret = MHD_YES; /* r is suspended until its build stops */
	} else {
		ret = srv_respond_error(r, c, call.code, "%s", call.message);
	}
	srv_call_clear(&call);
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
enum MHD_Result srv_connect_get(req *r, struct MHD_Connection *c, rpc_kind k)
{
	const char *enc = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "encoding");
	const char *message = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "message");
	const char *b64 = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "base64");
	const char *comp = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "compression");
	enum MHD_Result ret;
	char *data;
	size_t len;

	if (!enc || (strcmp(enc, "json") && strcmp(enc, "proto")))
		return srv_respond_http(r, c, MHD_HTTP_UNSUPPORTED_MEDIA_TYPE, IB_CONNECT_INVALID_ARGUMENT, NULL, NULL,
				    "encoding: json or proto");
	r->rpc = (int)k;
	r->proto = !strcmp(enc, "proto");
	/* a query string holds no NUL byte: binary comes as base64 */
	if (r->proto && message && (!b64 || strcmp(b64, "1")))
		return srv_respond_error(r, c, IB_CONNECT_INVALID_ARGUMENT, "message: a proto message must be base64 (base64=1)");
	if (comp && *comp && strcmp(comp, "identity"))
		return srv_respond_error(r, c, IB_CONNECT_UNIMPLEMENTED, "compression '%.32s' is not supported (identity only)",
				     comp);
	if (!message)
		message = "";
	if (b64 && !strcmp(b64, "1")) {
		if (!(data = base64url_decode(message, &len)))
			return srv_respond_error(r, c, IB_CONNECT_INVALID_ARGUMENT, "message: invalid base64");
	} else {
		len = strlen(message);
		data = ib_xstrndup(message, len);
	}
	ret = srv_dispatch_rpc(r, c, k, data, len);
	free(data);
	return ret;
}

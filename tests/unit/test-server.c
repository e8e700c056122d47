/*
 * The BuildImage service without builds: protocol helpers (Connect codes,
 * ranges, entity tags, bearer tokens, listen addresses), metrics text, the
 * build records store, and a daemon on an empty cache answering real HTTP.
 */
#include <arpa/inet.h>
#include <imagebuilder/v1/imagebuilder.pb-c.h>
#include <jansson.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "server/httputil.h"
#include "server/metrics.h"
#include "server/pbjson.h"
#include "server/server.h"
#include "lib/util.h"
#include "server/builds.h"
#include "tests/unit/test.h"

static char *tmpdir(void)
{
	char *t = ib_xstrdup("/tmp/ib-unit-server.XXXXXX");

	if (!mkdtemp(t))
		abort();
	return t;
}

TEST(connect_codes_map_to_http_statuses)
{
	ASSERT_INT_EQ(ib_connect_http_status(IB_CONNECT_INVALID_ARGUMENT), 400);
	ASSERT_INT_EQ(ib_connect_http_status(IB_CONNECT_UNAUTHENTICATED), 401);
	ASSERT_INT_EQ(ib_connect_http_status(IB_CONNECT_PERMISSION_DENIED), 403);
	ASSERT_INT_EQ(ib_connect_http_status(IB_CONNECT_NOT_FOUND), 404);
	ASSERT_INT_EQ(ib_connect_http_status(IB_CONNECT_ALREADY_EXISTS), 409);
	ASSERT_INT_EQ(ib_connect_http_status(IB_CONNECT_RESOURCE_EXHAUSTED), 429);
	ASSERT_INT_EQ(ib_connect_http_status(IB_CONNECT_CANCELED), 499);
	ASSERT_INT_EQ(ib_connect_http_status(IB_CONNECT_INTERNAL), 500);
	ASSERT_INT_EQ(ib_connect_http_status(IB_CONNECT_UNIMPLEMENTED), 501);
	ASSERT_INT_EQ(ib_connect_http_status(IB_CONNECT_UNAVAILABLE), 503);
	ASSERT_INT_EQ(ib_connect_http_status(IB_CONNECT_DEADLINE_EXCEEDED), 504);
	ASSERT_STR_EQ(ib_connect_code_name(IB_CONNECT_RESOURCE_EXHAUSTED), "resource_exhausted");

	char *body = ib_connect_error_body(IB_CONNECT_NOT_FOUND, "no build \"x\"");
	json_t *doc = json_loads(body, 0, NULL);
	ASSERT_STR_EQ(json_string_value(json_object_get(doc, "code")), "not_found");
	ASSERT_STR_EQ(json_string_value(json_object_get(doc, "message")), "no build \"x\"");
	json_decref(doc);
	free(body);
}

TEST(utf8_for_json)
{
	char *c;

	ASSERT_TRUE(ib_http_utf8_valid("h\xc3\xa9", 3));
	ASSERT_TRUE(!ib_http_utf8_valid("h\xc3", 2));           /* cut in two */
	ASSERT_TRUE(!ib_http_utf8_valid("\xc0\xaf", 2));        /* overlong '/' */
	ASSERT_TRUE(!ib_http_utf8_valid("\xed\xa0\x80", 3));    /* a surrogate */
	c = ib_http_utf8_clean("a\xff" "b\xc3\xa9\xc3", SIZE_MAX);
	ASSERT_STR_EQ(c, "a\xef\xbf\xbd" "b\xc3\xa9\xef\xbf\xbd");
	free(c);
	c = ib_http_utf8_clean("abc\xc3\xa9", 4); /* max cuts the character: replaced, not split */
	ASSERT_STR_EQ(c, "abc\xef\xbf\xbd");
	free(c);
	c = ib_http_utf8_clean(NULL, 10);
	ASSERT_STR_EQ(c, "");
	free(c);
	c = ib_connect_error_body(IB_CONNECT_INTERNAL, "bad \xff byte");
	ASSERT_STR_CONTAINS(c, "\"message\":\"bad \xef\xbf\xbd byte\"");
	free(c);
}

TEST(ranges)
{
	uint64_t s = 0, n = 0;

	ASSERT_INT_EQ(ib_http_parse_range("bytes=0-99", 1000, &s, &n), IB_RANGE_OK);
	ASSERT_INT_EQ(s, 0);
	ASSERT_INT_EQ(n, 100);
	ASSERT_INT_EQ(ib_http_parse_range("bytes=900-", 1000, &s, &n), IB_RANGE_OK);
	ASSERT_INT_EQ(s, 900);
	ASSERT_INT_EQ(n, 100);
	ASSERT_INT_EQ(ib_http_parse_range("bytes=990-5000", 1000, &s, &n), IB_RANGE_OK); /* clamped */
	ASSERT_INT_EQ(n, 10);
	ASSERT_INT_EQ(ib_http_parse_range("bytes=-10", 1000, &s, &n), IB_RANGE_OK);
	ASSERT_INT_EQ(s, 990);
	ASSERT_INT_EQ(n, 10);
	ASSERT_INT_EQ(ib_http_parse_range("bytes=-5000", 1000, &s, &n), IB_RANGE_OK);
	ASSERT_INT_EQ(s, 0);
	ASSERT_INT_EQ(n, 1000);
	ASSERT_INT_EQ(ib_http_parse_range(" Bytes = 1-1", 1000, &s, &n), IB_RANGE_OK);
	ASSERT_INT_EQ(n, 1);
	/* unsatisfiable */
	ASSERT_INT_EQ(ib_http_parse_range("bytes=1000-", 1000, &s, &n), IB_RANGE_UNSATISFIABLE);
	ASSERT_INT_EQ(ib_http_parse_range("bytes=-0", 1000, &s, &n), IB_RANGE_UNSATISFIABLE);
	ASSERT_INT_EQ(ib_http_parse_range("bytes=0-", 0, &s, &n), IB_RANGE_UNSATISFIABLE);
	/* ignored: send it all */
	ASSERT_INT_EQ(ib_http_parse_range(NULL, 1000, &s, &n), IB_RANGE_NONE);
	ASSERT_INT_EQ(ib_http_parse_range("bytes=5-1", 1000, &s, &n), IB_RANGE_NONE);
	ASSERT_INT_EQ(ib_http_parse_range("bytes=0-1,5-6", 1000, &s, &n), IB_RANGE_NONE);
	ASSERT_INT_EQ(ib_http_parse_range("items=0-1", 1000, &s, &n), IB_RANGE_NONE);
	ASSERT_INT_EQ(ib_http_parse_range("bytes=x-1", 1000, &s, &n), IB_RANGE_NONE);
	ASSERT_INT_EQ(ib_http_parse_range("bytes=1-2x", 1000, &s, &n), IB_RANGE_NONE);
	ASSERT_INT_EQ(ib_http_parse_range("bytes=99999999999999999999-", 1000, &s, &n), IB_RANGE_NONE);
}

TEST(etags)
{
	const char *tag = "\"sha256:abc\"";

	ASSERT_TRUE(ib_http_etag_match("\"sha256:abc\"", tag));
	ASSERT_TRUE(ib_http_etag_match("W/\"sha256:abc\"", tag));
	ASSERT_TRUE(ib_http_etag_match("\"x\", \"sha256:abc\"", tag));
	ASSERT_TRUE(ib_http_etag_match("*", tag));
	ASSERT_TRUE(!ib_http_etag_match("\"sha256:abd\"", tag));
	ASSERT_TRUE(!ib_http_etag_match("\"sha256:ab\"", tag));
	ASSERT_TRUE(!ib_http_etag_match("sha256:abc", tag));
	ASSERT_TRUE(!ib_http_etag_match(NULL, tag));
}

TEST(bearer_tokens)
{
	ib_http_token t;

	ib_http_token_init(&t, "s3cret", 6);
	ASSERT_TRUE(ib_http_bearer_ok(&t, "Bearer s3cret"));
	ASSERT_TRUE(ib_http_bearer_ok(&t, "bearer   s3cret"));
	ASSERT_TRUE(!ib_http_bearer_ok(&t, "Bearer s3cre"));
	ASSERT_TRUE(!ib_http_bearer_ok(&t, "Bearer s3cretX"));
	ASSERT_TRUE(!ib_http_bearer_ok(&t, "Basic s3cret"));
	ASSERT_TRUE(!ib_http_bearer_ok(&t, "Bearers3cret"));
	ASSERT_TRUE(!ib_http_bearer_ok(&t, "s3cret"));
	ASSERT_TRUE(!ib_http_bearer_ok(&t, NULL));
}

TEST(listen_addresses)
{
	struct sockaddr_storage ss;
	socklen_t len;

	ASSERT_INT_EQ(ib_http_parse_listen(&ss, &len, "127.0.0.1:8470"), 0);
	ASSERT_INT_EQ(ss.ss_family, AF_INET);
	ASSERT_INT_EQ(ntohs(((struct sockaddr_in *)&ss)->sin_port), 8470);
	ASSERT_INT_EQ(ib_http_parse_listen(&ss, &len, ":0"), 0);
	ASSERT_INT_EQ(((struct sockaddr_in *)&ss)->sin_addr.s_addr, htonl(INADDR_LOOPBACK));
	ASSERT_INT_EQ(ib_http_parse_listen(&ss, &len, "9000"), 0);
	ASSERT_INT_EQ(ib_http_parse_listen(&ss, &len, "localhost:1"), 0);
	ASSERT_INT_EQ(ib_http_parse_listen(&ss, &len, "[::1]:80"), 0);
	ASSERT_INT_EQ(ss.ss_family, AF_INET6);
	ASSERT_INT_EQ(ib_http_parse_listen(&ss, &len, "0.0.0.0:65535"), 0);
	ASSERT_INT_EQ(ib_http_parse_listen(&ss, &len, "127.0.0.1:65536"), IB_EINVALID);
	ASSERT_INT_EQ(ib_http_parse_listen(&ss, &len, "example.com:80"), IB_EINVALID);
	ASSERT_INT_EQ(ib_http_parse_listen(&ss, &len, "::1:80"), IB_EINVALID);
	ASSERT_INT_EQ(ib_http_parse_listen(&ss, &len, "127.0.0.1:"), IB_EINVALID);
	ASSERT_INT_EQ(ib_http_parse_listen(&ss, &len, "[::1]80"), IB_EINVALID);
}

TEST(metrics_text)
{
	ib_metrics *m = ib_metrics_new();
	ib_metrics_gauges g = { .queued = 3, .building = 1, .jobs = 2 };
	ib_buf out = IB_BUF_INIT;

	ib_metrics_build(m, IB_FINAL_READY, 12.5);
	ib_metrics_build(m, IB_FINAL_TIMEOUT, 4000);
	ib_metrics_layer(m, "apt_install", false, 3);
	ib_metrics_layer(m, "base", true, 0);
	ib_metrics_layer(m, "future_kind", false, 1);
	ib_metrics_image_lookup(m, true);
	ib_metrics_request(m, IB_EP_BUILD_IMAGE, 200, 0.0007);
	ib_metrics_request(m, IB_EP_BUILD_IMAGE, 418, 0.0007);
	ib_metrics_bytes(m, IB_EP_ROOTFS, 4096);
	ib_metrics_render(m, &g, &out);
	ASSERT_STR_CONTAINS(out.ptr, "\nimagebuilder_builds_total{status=\"READY\"} 1\n");
	ASSERT_STR_CONTAINS(out.ptr, "\nimagebuilder_builds_total{status=\"TIMEOUT\"} 1\n");
	ASSERT_STR_CONTAINS(out.ptr, "\nimagebuilder_build_duration_seconds_bucket{le=\"10\"} 0\n");
	ASSERT_STR_CONTAINS(out.ptr, "\nimagebuilder_build_duration_seconds_bucket{le=\"30\"} 1\n");
	ASSERT_STR_CONTAINS(out.ptr, "\nimagebuilder_build_duration_seconds_bucket{le=\"+Inf\"} 2\n");
	ASSERT_STR_CONTAINS(out.ptr, "\nimagebuilder_build_duration_seconds_sum 4012.500000\n");
	ASSERT_STR_CONTAINS(out.ptr, "\nimagebuilder_step_duration_seconds_count{kind=\"apt_install\"} 1\n");
	ASSERT_STR_CONTAINS(out.ptr, "\nimagebuilder_layer_cache_misses_total{kind=\"other\"} 1\n");
	ASSERT_STR_CONTAINS(out.ptr, "\nimagebuilder_layer_cache_hits_total{kind=\"base\"} 1\n");
	ASSERT_STR_CONTAINS(out.ptr, "\nimagebuilder_queue_depth 3\n");
	ASSERT_STR_CONTAINS(out.ptr, "\nimagebuilder_served_bytes_total{endpoint=\"rootfs\"} 4096\n");
	ASSERT_STR_CONTAINS(out.ptr, "{endpoint=\"BuildImage\",code=\"200\"} 1\n");
	ASSERT_STR_CONTAINS(out.ptr, "{endpoint=\"BuildImage\",code=\"other\"} 1\n");
	ASSERT_STR_CONTAINS(out.ptr,
			    "\nimagebuilder_http_request_duration_seconds_bucket{endpoint=\"BuildImage\",le=\"0.001\"} 2\n");
	/* every sample line: name{labels} value, or a comment */
	for (char *line = out.ptr, *nl; *line; line = nl + 1) {
		nl = strchr(line, '\n');
		ASSERT_TRUE(nl != NULL);
		ASSERT_TRUE(line[0] == '#' || !strncmp(line, "imagebuilder_", 13));
	}
	ib_buf_free(&out);
	ib_metrics_free(m);
}

static char *tail_cb(const ib_build_record *rec, void *arg)
{
	(*(int *)arg)++;
	return ib_xasprintf("tail of %s", rec->id);
}

TEST(build_records)
{
	char *dir = tmpdir(), id[IB_BUILD_ID_MAX];
	ib_cache *c = NULL;
	ib_builds *b = NULL;
	ib_build_record rec = { .error_step = -1 }, got;
	int calls = 0;
	unsigned n = 0;

	ASSERT_INT_EQ(ib_cache_open(&c, dir), 0);
	ASSERT_INT_EQ(ib_builds_open(&b, c), 0);
	snprintf(rec.id, sizeof(rec.id), "aaaa");
	snprintf(rec.image_id, sizeof(rec.image_id), "%064d", 1);
	snprintf(rec.status, sizeof(rec.status), "QUEUED");
	rec.spec = (char *)"{}";
	rec.created = 100;
	rec.timeout_s = 60;
	ASSERT_INT_EQ(ib_builds_insert(b, &rec), 0);
	ASSERT_INT_EQ(ib_builds_insert(b, &rec), IB_EEXISTS);
	ASSERT_INT_EQ(ib_builds_start(b, "aaaa", 101, "[]"), 0);
	ASSERT_INT_EQ(ib_builds_start(b, "aaaa", 101, "[]"), IB_ENOTFOUND); /* not queued any more */
	ASSERT_INT_EQ(ib_builds_get(b, "aaaa", &got), 1);
	ASSERT_STR_EQ(got.status, "BUILDING");
	ASSERT_INT_EQ(got.started, 101);
	ASSERT_INT_EQ(got.timeout_s, 60);
	ASSERT_INT_EQ(got.error_step, -1);
	ASSERT_STR_EQ(got.steps, "[]");
	ib_build_record_clear(&got);
	ASSERT_INT_EQ(ib_builds_last_ready(b, rec.image_id, id), 0);

	/* a second build, finished READY */
	snprintf(rec.id, sizeof(rec.id), "bbbb");
	rec.created = 102;
	ASSERT_INT_EQ(ib_builds_insert(b, &rec), 0);
	snprintf(rec.status, sizeof(rec.status), "READY");
	rec.finished = 103;
	rec.cached = true;
	rec.steps = (char *)"[{\"index\":0}]";
	ASSERT_INT_EQ(ib_builds_finish(b, &rec), 0);
	ASSERT_INT_EQ(ib_builds_finish(b, &rec), IB_ENOTFOUND); /* final already */
	ASSERT_INT_EQ(ib_builds_last_ready(b, rec.image_id, id), 1);
	ASSERT_STR_EQ(id, "bbbb");
	ASSERT_INT_EQ(ib_builds_get(b, "nope", NULL), 0);

	/* a restart: the BUILDING one becomes FAILED, with its tail */
	ASSERT_INT_EQ(ib_builds_recover(b, "interrupted", tail_cb, &calls, &n), 0);
	ASSERT_INT_EQ(n, 1);
	ASSERT_INT_EQ(calls, 1);
	ASSERT_INT_EQ(ib_builds_get(b, "aaaa", &got), 1);
	ASSERT_STR_EQ(got.status, "FAILED");
	ASSERT_STR_EQ(got.error, "interrupted");
	ASSERT_STR_EQ(got.log_tail, "tail of aaaa");
	ASSERT_TRUE(got.finished > 0);
	ib_build_record_clear(&got);
	ASSERT_INT_EQ(ib_builds_get(b, "bbbb", &got), 1);
	ASSERT_STR_EQ(got.status, "READY");
	ASSERT_TRUE(got.cached);
	ib_build_record_clear(&got);
	ASSERT_INT_EQ(ib_builds_recover(b, "interrupted", tail_cb, &calls, &n), 0);
	ASSERT_INT_EQ(n, 0);
	ASSERT_TRUE(ib_build_status_final("TIMEOUT") && !ib_build_status_final("QUEUED"));

	ib_builds_close(b);
	ib_cache_close(c);
	ib_rm_rf(dir);
	free(dir);
}

/* One request over a fresh connection; returns the status, body in *body. */
static int http(unsigned port, const char *request, char **body)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
	ib_buf resp = IB_BUF_INIT;
	char buf[4096];
	int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), status = -1;
	ssize_t n;

	sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 ||
	    ib_write_all(fd, request, strlen(request)) < 0)
		goto out;
	while ((n = read(fd, buf, sizeof(buf))) > 0)
		ib_buf_add(&resp, buf, (size_t)n);
	if (resp.len > 12 && !strncmp(resp.ptr, "HTTP/1.1 ", 9))
		status = (int)strtol(resp.ptr + 9, NULL, 10);
	if (body) {
		char *p = resp.ptr ? strstr(resp.ptr, "\r\n\r\n") : NULL;
		*body = ib_xstrdup(p ? p + 4 : "");
	}
out:
	if (fd >= 0)
		close(fd);
	ib_buf_free(&resp);
	return status;
}

static char *post(const char *method, const char *json, const char *auth)
{
	return ib_xasprintf("POST /imagebuilder.v1.ImageBuilder/%s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
			    "Content-Type: application/json\r\n%s%s%sContent-Length: %zu\r\n\r\n%s",
			    method, auth ? "Authorization: Bearer " : "", auth ? auth : "", auth ? "\r\n" : "",
			    strlen(json), json);
}

TEST(daemon_answers_http)
{
	char *dir = tmpdir(), *body = NULL, *rq;
	ib_cache *c = NULL;
	ib_server *srv = NULL;
	ib_server_opts o = { .listen = "127.0.0.1:0", .token = "tok", .jobs = 1, .http_threads = 2, .log_fd = -1 };
	ib_config cfg;
	unsigned port;

	ASSERT_INT_EQ(ib_config_init(&cfg, NULL), 0);
	o.cfg = &cfg;
	ASSERT_INT_EQ(ib_cache_open(&c, dir), 0);
	ASSERT_INT_EQ(ib_server_start(&srv, c, &o), 0);
	port = ib_server_port(srv);
	ASSERT_TRUE(port > 0);
	{
		ib_server *second = NULL;
		ASSERT_INT_EQ(ib_server_start(&second, c, &o), IB_EEXISTS); /* one daemon per cache dir */
	}

	ASSERT_INT_EQ(http(port, "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", &body), 200);
	ASSERT_STR_EQ(body, "ok\n");
	free(body);

	rq = post("GetBuild", "{\"build_id\":\"0123456789abcdef0123456789abcdef\"}", NULL);
	ASSERT_INT_EQ(http(port, rq, &body), 401);
	ASSERT_STR_CONTAINS(body, "\"unauthenticated\"");
	free(body);
	free(rq);

	rq = post("GetBuild", "{\"build_id\":\"0123456789abcdef0123456789abcdef\"}", "tok");
	ASSERT_INT_EQ(http(port, rq, &body), 404);
	ASSERT_STR_CONTAINS(body, "\"not_found\"");
	free(body);
	free(rq);

	rq = post("BuildImage", "{\"spec\": {\"base\": \"debian_amd64\", \"steps\": [{\"nope\": 1}]}}", "tok");
	ASSERT_INT_EQ(http(port, rq, &body), 400);
	ASSERT_STR_CONTAINS(body, "spec.steps[0]");
	free(body);
	free(rq);

	rq = post("BuildImage", "{\"spec\": {\"base\": \"debian_amd64\"}, \"timeout_s\": \"x\"}", "tok");
	ASSERT_INT_EQ(http(port, rq, &body), 400);
	ASSERT_STR_CONTAINS(body, "timeout_s");
	free(body);
	free(rq);

	ASSERT_INT_EQ(http(port, "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\nConnection: close\r\n\r\n",
			   &body),
		      200);
	ASSERT_STR_CONTAINS(body, "imagebuilder_http_requests_total{endpoint=\"BuildImage\",code=\"400\"} 2");
	free(body);

	ASSERT_INT_EQ(http(port, "GET /nowhere HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\nConnection: close\r\n\r\n",
			   NULL),
		      404);

	ib_server_stop_accepting(srv);
	ASSERT_TRUE(ib_server_wait_idle(srv, 1));
	ASSERT_INT_EQ(http(port, "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", NULL), -1);
	ib_server_free(srv);
	ib_cache_close(c);
	ib_config_clear(&cfg);
	ib_rm_rf(dir);
	free(dir);
}

RUN_TESTS()

/* Pack and unpack m, then back to JSON: what a binary client sends and the server reads. */
static json_t *through_wire(const ProtobufCMessage *m)
{
	size_t len = protobuf_c_message_get_packed_size(m);
	uint8_t *buf = ib_xmalloc(len ? len : 1);
	ProtobufCMessage *back;
	json_t *j;

	protobuf_c_message_pack(m, buf);
	back = protobuf_c_message_unpack(m->descriptor, NULL, len, buf);
	free(buf);
	if (!back)
		return NULL;
	j = srv_pb_to_json(back);
	protobuf_c_message_free_unpacked(back, NULL);
	return j;
}

/*
 * The proto3 JSON mapping: a BuildImage request (Struct, ListValue and
 * Value in the spec, limits as numbers and strings) and a GetBuild answer
 * (an enum, Timestamps, a UInt32Value of 0, 64-bit numbers) survive the
 * binary form unchanged; a field the schema does not know is refused.
 */
TEST(pbjson_round_trip)
{
	const char *req = "{\"spec\": {\"base\": \"debian_amd64\", \"python_version\": \"3.12.1\", \"steps\": ["
			  "{\"apt_install\": [\"git\", \"curl\"]}, {\"env\": {\"A\": \"1\"}},"
			  "{\"run_commands\": [\"echo hi\"]}], \"disk_size\": \"8G\"},"
			  "\"force_build\": true, \"timeout_s\": 60,"
			  "\"limits\": {\"memory\": \"2G\", \"pids\": 512, \"cpus\": 1.5}}";
	const char *ans = "{\"build_id\": \"0123456789abcdef0123456789abcdef\", \"status\": \"FAILED\","
			  "\"created_at\": \"2026-11-30T12:34:56.789Z\", \"finished_at\": null, \"queue_position\": null,"
			  "\"steps\": [{\"index\": 0, \"kind\": \"base\", \"state\": \"failed\", \"seconds\": 1.5}],"
			  "\"error\": {\"step\": 0, \"message\": \"no\", \"log_tail\": \"\"},"
			  "\"log_bytes\": 5000000000, \"unknown_key\": 1}";
	json_t *in = json_loads(req, 0, NULL), *out, *a = json_loads(ans, 0, NULL);
	ProtobufCMessage *m = NULL;
	uint8_t unknown[] = { 0xf8, 0x06, 0x01 }; /* field 111, varint 1 */

	ASSERT_TRUE(in && a);
	ASSERT_INT_EQ(srv_pb_from_json(&imagebuilder__v1__build_image_request__descriptor, in, &m), 0);
	out = through_wire(m);
	protobuf_c_message_free_unpacked(m, NULL);
	ASSERT_TRUE(out && json_equal(in, out));
	json_decref(out);

	ASSERT_INT_EQ(srv_pb_from_json(&imagebuilder__v1__get_build_response__descriptor, a, &m), 0);
	out = through_wire(m);
	protobuf_c_message_free_unpacked(m, NULL);
	ASSERT_TRUE(out != NULL);
	ASSERT_STR_EQ(json_string_value(json_object_get(out, "status")), "FAILED");
	ASSERT_STR_EQ(json_string_value(json_object_get(out, "created_at")), "2026-11-30T12:34:56.789Z");
	ASSERT_TRUE(json_is_integer(json_object_get(json_object_get(out, "error"), "step")));
	ASSERT_INT_EQ(json_integer_value(json_object_get(json_object_get(out, "error"), "step")), 0);
	ASSERT_INT_EQ(json_integer_value(json_object_get(out, "log_bytes")), 5000000000LL);
	ASSERT_TRUE(!json_object_get(out, "finished_at") && !json_object_get(out, "unknown_key"));
	json_decref(out);

	/* a wrong type names its field */
	json_object_set_new(a, "status", json_integer(3));
	ASSERT_INT_EQ(srv_pb_from_json(&imagebuilder__v1__get_build_response__descriptor, a, &m), IB_ERROR);
	ASSERT_STR_CONTAINS(ib_error_last(), "GetBuildResponse.status");

	m = protobuf_c_message_unpack(&imagebuilder__v1__get_build_request__descriptor, NULL, sizeof(unknown), unknown);
	ASSERT_TRUE(m != NULL);
	ASSERT_TRUE(srv_pb_to_json(m) == NULL);
	ASSERT_STR_CONTAINS(ib_error_last(), "field 111");
	protobuf_c_message_free_unpacked(m, NULL);
	json_decref(in);
	json_decref(a);
}

/* gzip both ways, the size bound of a bomb, and Accept-Encoding. */
TEST(gzip_bodies)
{
	char *z = NULL, *back = NULL, data[5000];
	size_t zlen = 0, blen = 0;

	memset(data, 'a', sizeof(data));
	ASSERT_INT_EQ(ib_http_gzip(data, sizeof(data), &z, &zlen), 0);
	ASSERT_TRUE(zlen < 200);
	ASSERT_INT_EQ(ib_http_gunzip(z, zlen, sizeof(data), &back, &blen), 0);
	ASSERT_TRUE(blen == sizeof(data) && !memcmp(back, data, blen));
	free(back);
	back = NULL;
	ASSERT_INT_EQ(ib_http_gunzip(z, zlen, sizeof(data) - 1, &back, &blen), 1);
	ASSERT_TRUE(back == NULL);
	ASSERT_INT_EQ(ib_http_gunzip("not gzip", 8, 100, &back, &blen), IB_EINVALID);
	free(z);
	ASSERT_TRUE(ib_http_accepts_gzip("gzip"));
	ASSERT_TRUE(ib_http_accepts_gzip("deflate, gzip;q=0.5"));
	ASSERT_TRUE(ib_http_accepts_gzip("*"));
	ASSERT_TRUE(!ib_http_accepts_gzip("gzip;q=0"));
	ASSERT_TRUE(!ib_http_accepts_gzip("br, identity"));
	ASSERT_TRUE(!ib_http_accepts_gzip(NULL));
}

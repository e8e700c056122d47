#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <jansson.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "builder/build.h"
#include "lib/limits.h"
#include "server/httputil.h"
#include "lib/util.h"
#include "cli/cli.h"

static const char build_usage[] = "build SPEC.json [-o OUT.ext4] [--json] [--force] [--timeout S] " CLI_LIMIT_USAGE;

static volatile int cancel_flag;

static void on_signal(int sig)
{
	(void)sig;
	cancel_flag = 1;
}

static void to_stderr(const char *data, size_t len, void *arg)
{
	(void)arg;
	fwrite(data, 1, len, stderr);
}

static const char *status_of(int err)
{
	switch (err) {
	case 0: return "ready";
	case IB_ETIMEOUT: return "timeout";
	case IB_ECANCELED: return "cancelled";
	default: return "failed";
	}
}

static void print_json(ib_build *b, ib_cache *cache, int err, const char *output, const char *log_path)
{
	const ib_plan *plan = ib_build_plan(b);
	json_t *doc = json_object(), *layers = json_array();
	ib_build_status st;
	char *s;

	ib_build_status_get(b, &st);
	/* the file's SHA-256, made once and kept with the image */
	if (!err && !st.ext4_sha256[0] && ib_cache_image_digest(cache, plan->image_id, st.ext4_sha256) < 0)
		st.ext4_sha256[0] = '\0';
	for (size_t i = 0; i < plan->nlayers; i++) {
		const ib_build_layer_status *l = &st.layers[i];
		const char *source = ib_layer_source_name(l->source);
		json_array_append_new(layers, json_pack("{s:i, s:s, s:s, s:b, s:f, s:s, s:o}", "index", (int)i, "kind",
							plan->layers[i].kind, "key", plan->layers[i].key, "cached",
							l->cached, "seconds", l->seconds, "state",
							ib_layer_state_name(l->state), "source",
							source ? json_string(source) : json_null()));
	}
	json_object_set_new(doc, "image_id", json_string(plan->image_id));
	json_object_set_new(doc, "status", json_string(status_of(err)));
	json_object_set_new(doc, "cached", json_boolean(st.cached));
	json_object_set_new(doc, "output", output && !err ? json_string(output) : json_null());
	json_object_set_new(doc, "ext4_sha256", err ? json_null() : json_string(st.ext4_sha256));
	json_object_set_new(doc, "ext4_bytes", err ? json_null() : json_integer((json_int_t)st.ext4_bytes));
	json_object_set_new(doc, "layers", layers);
	json_object_set_new(doc, "log", log_path ? json_string(log_path) : json_null());
	if (err) {
		/* a log tail may cut a character in two, and the output is anyone's bytes */
		char *msg = ib_http_utf8_clean(st.error ? st.error : "", IB_ERROR_MAX);
		char *tail = ib_http_utf8_clean(st.log_tail ? st.log_tail : "", IB_LOG_TAIL_MAX);
		json_object_set_new(doc, "error",
				    json_pack("{s:i, s:s, s:s}", "step", st.failed_layer, "message", msg, "log_tail", tail));
		free(msg);
		free(tail);
	}
	ib_build_status_clear(&st);
	s = json_dumps(doc, JSON_COMPACT);
	puts(s);
	free(s);
	json_decref(doc);
}

int cmd_build(int argc, char **argv, ib_config *cfg)
{
	static const struct option longopts[] = {
		{ "output", required_argument, NULL, 'o' },
		{ "json", no_argument, NULL, 'j' },
		{ "force", no_argument, NULL, 'f' },
		{ "timeout", required_argument, NULL, 't' },
		{ "cache-dir", required_argument, NULL, 'C' },
		CLI_LIMIT_OPTIONS,
		{ NULL, 0, NULL, 0 },
	};
	const char *output = NULL, *spec_path;
	ib_build_opts opts = { .log_fd = -1 };
	ib_cache *cache = NULL;
	ib_spec *spec = NULL;
	ib_build *b = NULL;
	char *doc = NULL, *log_path = NULL;
	size_t len = 0;
	int json = 0, force = 0, c, err, ret = EXIT_FAIL;
	uint64_t timeout = 0;
	struct sigaction sa = { .sa_handler = on_signal };

	optind = 1;
	while ((c = getopt_long(argc, argv, "o:", longopts, NULL)) != -1) {
		switch (c) {
		case 'o': output = optarg; break;
		case 'j': json = 1; break;
		case 'f': force = 1; break;
		case 'C': ib_config_set(&cfg->cache_dir, optarg); break;
		case 't':
			if (ib_parse_u64(&timeout, optarg, IB_TIMEOUT_MAX) < 0 || timeout == 0) {
				cli_error("--timeout: %s", timeout == 0 ? "must be a positive number of seconds"
									: ib_error_last());
				return EXIT_USAGE;
			}
			break;
		default:
			if (cli_limit_option(c, optarg, cfg) > 0)
				break;
			return c >= CLI_OPT_MEMORY && c <= CLI_OPT_RUNNER ? EXIT_USAGE : cli_usage(build_usage);
		}
	}
	if (optind != argc - 1)
		return cli_usage(build_usage);
	spec_path = argv[optind];

	err = ib_read_file(&doc, &len, spec_path, IB_SPEC_MAX_BYTES);
	if (err < 0) {
		cli_error("%s", ib_error_last());
		return EXIT_USAGE;
	}
	if ((err = ib_spec_parse(&spec, doc, len)) < 0) {
		cli_error("invalid spec '%s': %s", spec_path, ib_error_last());
		ret = err == IB_EINVALID ? EXIT_USAGE : EXIT_FAIL;
		goto out;
	}
	if ((err = ib_build_new(&b, spec, cfg)) < 0) {
		cli_error("%s", ib_error_last());
		ret = err == IB_EINVALID ? EXIT_USAGE : EXIT_FAIL;
		goto out;
	}
	if (cli_open_cache(&cache, cfg) < 0)
		goto out;
	ib_cache_clean_tmp(cache);

	{
		char stamp[32];
		time_t now = time(NULL);
		struct tm tm;
		gmtime_r(&now, &tm);
		strftime(stamp, sizeof(stamp), "%Y%m%dT%H%M%SZ", &tm);
		log_path = ib_xasprintf("%s/logs/%s-%.12s-%ld.log", ib_cache_dir(cache), stamp, ib_build_plan(b)->image_id,
					(long)getpid());
	}
	opts.log_fd = open(log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
	if (opts.log_fd < 0) {
		cli_error("cannot open log '%s': %s", log_path, strerror(errno));
		goto out;
	}
	opts.force = force;
	opts.timeout = (double)timeout;
	opts.output = output;
	opts.progress = to_stderr;
	opts.cancel = &cancel_flag;
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGHUP, &sa, NULL);

	err = ib_build_run(b, cache, &opts);
	if (json)
		print_json(b, cache, err, output, log_path);
	else if (!err)
		puts(ib_build_plan(b)->image_id);
	if (err) {
		ib_build_status st;
		ib_build_status_get(b, &st);
		cli_error("build %s: %s", status_of(err), st.error ? st.error : ib_error_last());
		if (st.log_tail && *st.log_tail && !json) {
			/* the step's output was streamed already; point at the full log */
			fprintf(stderr, "imagebuilder: full log: %s\n", log_path);
		}
		ib_build_status_clear(&st);
		goto out;
	}
	ret = EXIT_OK;
out:
	if (opts.log_fd >= 0)
		close(opts.log_fd);
	ib_build_free(b);
	ib_spec_free(spec);
	ib_cache_close(cache);
	free(doc);
	free(log_path);
	return ret;
}

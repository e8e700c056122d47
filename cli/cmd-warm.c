/*
 * imagebuilder warm: build (or, with --check, only look up) every spec it
 * is given, from files or from a git repository's objects, in parallel.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "builder/build.h"
#include "builder/gitsrc.h"
#include "lib/limits.h"
#include "lib/util.h"
#include "cli/cli.h"

static const char warm_usage[] =
	"warm [--check | --push] [--jobs N] " CLI_LIMIT_USAGE " (SPEC.json ... | --git URL --ref REF [--path DIR])";

#define WARM_JOBS_MAX 64

enum outcome { W_PENDING, W_CACHED, W_BUILT, W_FAILED, W_MISS };

struct job {
	const char *name; /* the file, or the path in the repository */
	const char *data;
	size_t len;
	ib_spec *spec;
	ib_build *build;
	enum outcome outcome;
	double seconds;
	char *why; /* failed: the reason; miss: what misses and why */
};

struct warm {
	ib_cache *cache;
	struct job *jobs;
	size_t njobs;
	size_t next; /* the next job to take */
	pthread_mutex_t mu;
	const char *git_url;
	const char *commit;
	bool push; /* --push: the remote must end up with everything each spec needs */
};

static volatile int cancel_flag;

static void on_signal(int sig)
{
	(void)sig;
	cancel_flag = 1;
}

static void truncate_to(char *s, size_t max)
{
	if (strlen(s) > max)
		memcpy(s + max - 3, "...", 4);
}

struct children {
	ib_buf list;
	unsigned n;
};

static int child_cb(const char *key, const char *kind, const char *step, void *arg)
{
	struct children *ch = arg;
	char shown[160];

	(void)kind;
	if (ch->n++ >= 5)
		return 0;
	snprintf(shown, sizeof(shown), "%s", step);
	truncate_to(shown, 120);
	ib_buf_printf(&ch->list, "%s%s (%.12s)", ch->n > 1 ? "; " : "", shown, key);
	return 0;
}

/* --check: why the spec is not ready: its first missing layer, and what the cache has instead. */
static char *explain_miss(ib_cache *cache, const ib_build *build)
{
	const ib_plan *b = ib_build_plan(build);
	struct children ch = { IB_BUF_INIT, 0 };
	char wants[160];
	size_t i;
	int r;

	for (i = 0; i < b->nlayers; i++) {
		if ((r = ib_cache_layer_get(cache, b->layers[i].key, NULL)) < 0)
			return ib_xstrdup(ib_error_last());
		if (r == 0)
			break;
	}
	if (i == b->nlayers)
		return ib_xstrdup("every layer is cached, but the image is not exported yet");
	if (i == 0)
		return ib_xasprintf("the base layer (%s, %.12s) is not cached: no cached base has this definition "
				    "and SOURCE_DATE_EPOCH", b->spec->base, b->layers[0].key);
	snprintf(wants, sizeof(wants), "%s", b->layers[i].canonical);
	truncate_to(wants, 120);
	ib_cache_layer_children(cache, b->layers[i - 1].key, child_cb, &ch);
	char *msg = ib_xasprintf("layer %zu (%s) misses: wants %s; nearest cached ancestor is layer %zu (%s, %.12s), "
				 "%s%s%s",
				 i, b->layers[i].kind, wants, i - 1, b->layers[i - 1].kind, b->layers[i - 1].key,
				 ch.n ? "whose cached next steps differ: " : "after which nothing is cached",
				 ch.n ? ch.list.ptr : "", ch.n > 5 ? "; ..." : "");
	ib_buf_free(&ch.list);
	return msg;
}

static void build_one(struct warm *w, struct job *j)
{
	ib_build_opts opts = { .log_fd = -1, .cancel = &cancel_flag, .push = w->push };
	ib_build_status st;
	char *log_path;
	char stamp[32];
	time_t now = time(NULL);
	struct tm tm;
	double t0 = ib_now();
	int err;

	gmtime_r(&now, &tm);
	strftime(stamp, sizeof(stamp), "%Y%m%dT%H%M%SZ", &tm);
	log_path = ib_xasprintf("%s/logs/warm-%s-%.12s-%ld.log", ib_cache_dir(w->cache), stamp,
				ib_build_plan(j->build)->image_id, (long)getpid());
	opts.log_fd = open(log_path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
	err = ib_build_run(j->build, w->cache, &opts);
	j->seconds = ib_now() - t0;
	ib_build_status_get(j->build, &st);
	if (err) {
		j->outcome = W_FAILED;
		j->why = ib_xasprintf("%s (log: %s)", st.error ? st.error : ib_error_last(), log_path);
	} else {
		j->outcome = st.cached ? W_CACHED : W_BUILT;
		if (w->git_url && ib_cache_image_add_source(w->cache, ib_build_plan(j->build)->image_id, w->git_url,
							    w->commit, j->name) < 0) {
			j->outcome = W_FAILED;
			j->why = ib_xstrdup(ib_error_last());
		}
	}
	ib_build_status_clear(&st);
	if (opts.log_fd >= 0)
		close(opts.log_fd);
	free(log_path);
	fprintf(stderr, "warm: %s: %s\n", j->name,
		j->outcome == W_FAILED ? "failed" : j->outcome == W_CACHED ? "cached" : "built");
}

static void *worker(void *arg)
{
	struct warm *w = arg;

	for (;;) {
		struct job *j = NULL;

		pthread_mutex_lock(&w->mu);
		while (w->next < w->njobs && !j) {
			struct job *c = &w->jobs[w->next++];
			if (c->outcome == W_PENDING)
				j = c;
		}
		pthread_mutex_unlock(&w->mu);
		if (!j)
			return NULL;
		build_one(w, j);
	}
}

static void prepare_job(struct job *j, const ib_config *cfg)
{
	int err;

	if ((err = ib_spec_parse(&j->spec, j->data, j->len)) < 0) {
		j->outcome = W_FAILED;
		j->why = ib_xasprintf("invalid spec: %s", ib_error_last());
		return;
	}
	if ((err = ib_build_new(&j->build, j->spec, cfg)) < 0) {
		j->outcome = W_FAILED;
		j->why = ib_xstrdup(ib_error_last());
	}
}

static void print_line(const struct job *j)
{
	const char *id = j->build ? ib_build_plan(j->build)->image_id : "-";

	switch (j->outcome) {
	case W_CACHED: printf("%s  %s  cached\n", j->name, id); break;
	case W_BUILT: printf("%s  %s  built in %.1fs\n", j->name, id, j->seconds); break;
	case W_MISS: printf("%s  %s  not cached: %s\n", j->name, id, j->why); break;
	case W_FAILED: printf("%s  %s  failed: %s\n", j->name, id, j->why ? j->why : "?"); break;
	case W_PENDING: printf("%s  %s  not built (cancelled)\n", j->name, id); break;
	}
}

int cmd_warm(int argc, char **argv, ib_config *cfg)
{
	static const struct option longopts[] = {
		{ "check", no_argument, NULL, 'c' },
		{ "push", no_argument, NULL, 'P' },
		{ "jobs", required_argument, NULL, 'j' },
		{ "git", required_argument, NULL, 'g' },
		{ "ref", required_argument, NULL, 'r' },
		{ "path", required_argument, NULL, 'p' },
		{ "cache-dir", required_argument, NULL, 'C' },
		CLI_LIMIT_OPTIONS,
		{ NULL, 0, NULL, 0 },
	};
	const char *git = NULL, *ref = NULL, *dir = NULL;
	struct warm w = { .mu = PTHREAD_MUTEX_INITIALIZER };
	ib_git_files files = { 0 };
	char **texts = NULL;
	pthread_t threads[WARM_JOBS_MAX];
	struct sigaction sa = { .sa_handler = on_signal };
	uint64_t njobs = 1;
	int c, check = 0, ret = EXIT_FAIL, ok = 1;
	size_t nthreads = 0;

	optind = 1;
	while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
		switch (c) {
		case 'c': check = 1; break;
		case 'P': w.push = true; break;
		case 'j':
			if (ib_parse_u64(&njobs, optarg, WARM_JOBS_MAX) < 0 || njobs == 0) {
				cli_error("--jobs: give 1 to %d", WARM_JOBS_MAX);
				return EXIT_USAGE;
			}
			break;
		case 'g': git = optarg; break;
		case 'r': ref = optarg; break;
		case 'p': dir = optarg; break;
		case 'C': ib_config_set(&cfg->cache_dir, optarg); break;
		default:
			if (cli_limit_option(c, optarg, cfg) > 0)
				break;
			return c >= CLI_OPT_MEMORY && c <= CLI_OPT_RUNNER ? EXIT_USAGE : cli_usage(warm_usage);
		}
	}
	if (git ? (optind != argc || !ref) : (optind == argc || ref || dir))
		return cli_usage(warm_usage);
	if (w.push && (check || !cfg->remote)) {
		cli_error(check ? "--push and --check: give one" : "--push: give --remote URL or IMAGEBUILDER_REMOTE");
		return EXIT_USAGE;
	}
	if (cli_open_cache(&w.cache, cfg) < 0)
		return EXIT_FAIL;
	ib_cache_clean_tmp(w.cache);

	if (git) {
		if (ib_git_read_specs(&files, ib_cache_dir(w.cache), git, ref, dir) < 0) {
			cli_error("%s", ib_error_last());
			goto out;
		}
		if (!files.n) {
			cli_error("no *.json spec under '%s' at '%s' (%.12s) of '%s'", dir ? dir : "/", ref, files.commit,
				  git);
			goto out;
		}
		fprintf(stderr, "warm: %zu spec%s at %s (%.12s) of %s\n", files.n, files.n == 1 ? "" : "s", ref,
			files.commit, git);
		w.git_url = git;
		w.commit = files.commit;
		w.njobs = files.n;
		w.jobs = ib_xcalloc(w.njobs, sizeof(*w.jobs));
		for (size_t i = 0; i < files.n; i++) {
			w.jobs[i].name = files.files[i].path;
			w.jobs[i].data = files.files[i].data;
			w.jobs[i].len = files.files[i].len;
		}
	} else {
		w.njobs = (size_t)(argc - optind);
		w.jobs = ib_xcalloc(w.njobs, sizeof(*w.jobs));
		texts = ib_xcalloc(w.njobs, sizeof(*texts));
		for (size_t i = 0; i < w.njobs; i++) {
			w.jobs[i].name = argv[optind + (int)i];
			if (ib_read_file(&texts[i], &w.jobs[i].len, w.jobs[i].name, IB_SPEC_MAX_BYTES) < 0) {
				w.jobs[i].outcome = W_FAILED;
				w.jobs[i].why = ib_xstrdup(ib_error_last());
				continue;
			}
			w.jobs[i].data = texts[i];
		}
	}
	for (size_t i = 0; i < w.njobs; i++)
		if (w.jobs[i].outcome == W_PENDING)
			prepare_job(&w.jobs[i], cfg);

	if (check) {
		for (size_t i = 0; i < w.njobs; i++) {
			struct job *j = &w.jobs[i];
			int r;
			if (j->outcome != W_PENDING)
				continue;
			r = ib_cache_image_get(w.cache, ib_build_plan(j->build)->image_id, NULL);
			if (r < 0) {
				j->outcome = W_FAILED;
				j->why = ib_xstrdup(ib_error_last());
			} else if (r == 1) {
				j->outcome = W_CACHED;
			} else {
				j->outcome = W_MISS;
				j->why = explain_miss(w.cache, j->build);
			}
		}
	} else {
		sigaction(SIGINT, &sa, NULL);
		sigaction(SIGTERM, &sa, NULL);
		for (nthreads = 0; nthreads < njobs && nthreads < w.njobs; nthreads++)
			if (pthread_create(&threads[nthreads], NULL, worker, &w) != 0)
				break;
		if (!nthreads)
			worker(&w);
		for (size_t i = 0; i < nthreads; i++)
			pthread_join(threads[i], NULL);
	}

	for (size_t i = 0; i < w.njobs; i++) {
		print_line(&w.jobs[i]);
		if (w.jobs[i].outcome != W_CACHED && w.jobs[i].outcome != W_BUILT)
			ok = 0;
	}
	ret = ok ? EXIT_OK : EXIT_FAIL;
out:
	for (size_t i = 0; i < w.njobs; i++) {
		ib_build_free(w.jobs[i].build);
		ib_spec_free(w.jobs[i].spec);
		free(w.jobs[i].why);
		if (texts)
			free(texts[i]);
	}
	free(texts);
	free(w.jobs);
	ib_git_files_clear(&files);
	ib_cache_close(w.cache);
	return ret;
}

#include <getopt.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include "lib/util.h"
#include "cli/cli.h"

static const char gc_usage[] = "gc [--max-bytes N[K|M|G]] [--keep-days D] [--dry-run]";

static void report(const char *what, const char *id, uint64_t bytes, int64_t last_used, void *arg)
{
	const int *dry = arg;
	char when[32];
	time_t t = (time_t)last_used;
	struct tm tm;

	if (!strcmp(what, "orphans")) {
		printf("%s orphans (what a crash left, no row names it)  %10llu bytes\n",
		       *dry ? "would remove" : "removed", (unsigned long long)bytes);
		return;
	}
	gmtime_r(&t, &tm);
	strftime(when, sizeof(when), "%Y-%m-%dT%H:%M:%SZ", &tm);
	printf("%s %-5s %s  %10llu bytes  last used %s\n", *dry ? "would evict" : "evicted", what, id,
	       (unsigned long long)bytes, when);
}

int cmd_gc(int argc, char **argv, ib_config *cfg)
{
	static const struct option longopts[] = {
		{ "max-bytes", required_argument, NULL, 'm' },
		{ "keep-days", required_argument, NULL, 'k' },
		{ "dry-run", no_argument, NULL, 'n' },
		{ "cache-dir", required_argument, NULL, 'C' },
		{ NULL, 0, NULL, 0 },
	};
	ib_gc_opts opts = { .keep_days = -1 };
	ib_gc_result res = { 0 };
	ib_cache *cache = NULL;
	int c, dry = 0, ret = EXIT_FAIL;
	uint64_t days;

	optind = 1;
	while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
		switch (c) {
		case 'm':
			if (ib_parse_size(&opts.max_bytes, optarg, UINT64_MAX) < 0) {
				cli_error("--max-bytes: %s", ib_error_last());
				return EXIT_USAGE;
			}
			opts.has_max = true;
			break;
		case 'k':
			if (ib_parse_u64(&days, optarg, 100000) < 0) {
				cli_error("--keep-days: %s", ib_error_last());
				return EXIT_USAGE;
			}
			opts.keep_days = (int64_t)days;
			break;
		case 'n': dry = 1; break;
		case 'C': ib_config_set(&cfg->cache_dir, optarg); break;
		default: return cli_usage(gc_usage);
		}
	}
	if (optind != argc || (!opts.has_max && opts.keep_days < 0)) {
		if (optind == argc)
			cli_error("gc: give --max-bytes, --keep-days or both");
		return cli_usage(gc_usage);
	}
	opts.dry_run = dry;
	if (cli_open_cache(&cache, cfg) < 0)
		return EXIT_FAIL;
	if (ib_cache_gc(cache, &opts, report, &dry, &res) < 0) {
		cli_error("gc: %s", ib_error_last());
		goto out;
	}
	printf("%s %llu bytes (%u images, %u layers, %u orphans); cache %llu -> %llu bytes%s\n",
	       dry ? "would free" : "freed", (unsigned long long)res.freed, res.images, res.layers, res.orphans,
	       (unsigned long long)res.bytes_before,
	       (unsigned long long)res.bytes_after, res.in_use ? "; layers in use were kept" : "");
	if (opts.has_max && res.bytes_after > opts.max_bytes)
		fprintf(stderr, "imagebuilder: gc: the cache is still over %llu bytes (%u layers in use)\n",
			(unsigned long long)opts.max_bytes, res.in_use);
	ret = EXIT_OK;
out:
	ib_cache_close(cache);
	return ret;
}

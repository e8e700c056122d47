#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "lib/util.h"

static const char cache_usage[] = "cache verify [--repair]";

static void report(const char *what, const char *msg, bool problem, void *arg)
{
	(void)arg;
	fprintf(problem ? stdout : stderr, "%s %s: %s\n", problem ? "BAD " : "note", what, msg);
}

int cmd_cache(int argc, char **argv, ib_config *cfg)
{
	static const struct option longopts[] = {
		{ "repair", no_argument, NULL, 'r' },
		{ "cache-dir", required_argument, NULL, 'C' },
		{ NULL, 0, NULL, 0 },
	};
	ib_verify_opts opts = { 0 };
	ib_verify_result res = { 0 };
	ib_cache *cache = NULL;
	int c, ret = EXIT_FAIL;

	optind = 1;
	while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
		switch (c) {
		case 'r': opts.repair = true; break;
		case 'C': ib_config_set(&cfg->cache_dir, optarg); break;
		default: return cli_usage(cache_usage);
		}
	}
	if (optind != argc - 1 || strcmp(argv[optind], "verify"))
		return cli_usage(cache_usage);
	if (cli_open_cache(&cache, cfg) < 0)
		return EXIT_FAIL;
	if (ib_cache_verify(cache, &opts, report, NULL, &res) < 0) {
		cli_error("%s", ib_error_last());
		goto out;
	}
	if (res.orphans)
		fprintf(stderr, "imagebuilder: %u orphan%s, %llu bytes %s\n", res.orphans, res.orphans == 1 ? "" : "s",
			(unsigned long long)res.orphan_bytes,
			opts.repair ? "removed" : "reclaimable (gc or cache verify --repair removes them)");
	if (opts.repair && res.problems) {
		/* what is left must verify */
		ib_verify_result after = { 0 };
		printf("cache '%s': %u problem%s, %u layer%s or image%s removed\n", ib_cache_dir(cache), res.problems,
		       res.problems == 1 ? "" : "s", res.repaired, res.repaired == 1 ? "" : "s",
		       res.repaired == 1 ? "" : "s");
		if (ib_cache_verify(cache, NULL, report, NULL, &after) < 0) {
			cli_error("%s", ib_error_last());
			goto out;
		}
		res.problems = after.problems;
	}
	if (res.problems) {
		cli_error("cache '%s': %u problem%s", ib_cache_dir(cache), res.problems, res.problems == 1 ? "" : "s");
		goto out;
	}
	printf("cache '%s' is intact\n", ib_cache_dir(cache));
	ret = EXIT_OK;
out:
	ib_cache_close(cache);
	return ret;
}

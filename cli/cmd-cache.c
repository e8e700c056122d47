#include <getopt.h>
#include <stdio.h>
#include <string.h>

#include "lib/util.h"
#include "cli/cli.h"

static void report(const char *what, const char *msg, bool problem, void *arg)
{
	(void)arg;
	fprintf(problem ? stdout : stderr, "%s %s: %s\n", problem ? "BAD " : "note", what, msg);
}

int cmd_cache(int argc, char **argv, ib_config *cfg)
{
	static const struct option longopts[] = {
		{ "cache-dir", required_argument, NULL, 'C' },
		{ NULL, 0, NULL, 0 },
	};
	ib_cache *cache = NULL;
	unsigned problems = 0;
	int c, ret = EXIT_FAIL;

	optind = 1;
	while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
		if (c != 'C')
			return cli_usage("cache verify");
		ib_config_set(&cfg->cache_dir, optarg);
	}
	if (optind != argc - 1 || strcmp(argv[optind], "verify"))
		return cli_usage("cache verify");
	if (cli_open_cache(&cache, cfg) < 0)
		return EXIT_FAIL;
	if (ib_cache_verify(cache, report, NULL, &problems) < 0) {
		cli_error("%s", ib_error_last());
		goto out;
	}
	if (problems) {
		cli_error("cache '%s': %u problem%s", ib_cache_dir(cache), problems, problems == 1 ? "" : "s");
		goto out;
	}
	printf("cache '%s' is intact\n", ib_cache_dir(cache));
	ret = EXIT_OK;
out:
	ib_cache_close(cache);
	return ret;
}

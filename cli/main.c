/*
 * imagebuilder: the command line.  A table of commands, each a function
 * cmd_<name>(argc, argv) in its own file; this one dispatches and reports.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "builder/disk.h"
#include "cache/remote.h"
#include "cli/cli.h"
#include "lib/crash.h"
#include "lib/util.h"

extern char **environ;

static const struct cmd {
	const char *name;
	int (*fn)(int argc, char **argv, ib_config *cfg);
	const char *help;
} commands[] = {
	{ "build", cmd_build, "build SPEC.json [-o OUT.ext4] [--json] [--force] [--timeout S] " CLI_LIMIT_USAGE },
	{ "export", cmd_export, "export IMAGE_ID (-o OUT.ext4 [--from-layers] | --tar OUT.tar | --zstd OUT | --bmap OUT)" },
	{ "inspect", cmd_inspect, "inspect IMAGE_ID" },
	{ "ls", cmd_ls, "ls" },
	{ "cache", cmd_cache, "cache verify [--repair]" },
	{ "serve", cmd_serve, "serve --listen HOST:PORT [--token-file F] [--jobs N] " CLI_LIMIT_USAGE },
	{ "warm", cmd_warm, "warm [--check] [--jobs N] " CLI_LIMIT_USAGE " (SPEC.json ... | --git URL --ref REF [--path DIR])" },
	{ "pull", cmd_pull, "pull IMAGE_ID -o OUT.ext4 [--remote URL]" },
	{ "gc", cmd_gc, "gc [--max-bytes N[K|M|G]] [--keep-days D] [--dry-run]" },
	{ "debug", cmd_debug, "debug crash-points" },
};

void cli_error(const char *fmt, ...)
{
	va_list ap;

	fputs("imagebuilder: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
}

int cli_usage(const char *usage)
{
	fprintf(stderr, "usage: imagebuilder %s [--cache-dir DIR]\n", usage);
	return EXIT_USAGE;
}

int cli_limit_option(int c, const char *arg, ib_config *cfg)
{
	static const char *const names[] = { "memory", "pids", "cpus", "disk" };

	if (c == CLI_OPT_REMOTE) {
		ib_remote *r;
		if (ib_remote_open(&r, arg) < 0) {
			cli_error("--remote: %s", ib_error_last());
			return -1;
		}
		ib_remote_close(r);
		ib_config_set(&cfg->remote, arg);
		return 1;
	}
	if (c == CLI_OPT_RUNNER) {
		if (ib_runner_parse(&cfg->runner, arg) < 0) {
			cli_error("--runner: %s", ib_error_last());
			return -1;
		}
		return 1;
	}
	if (c < CLI_OPT_MEMORY || c > CLI_OPT_DISK)
		return 0;
	if (ib_limits_set(&cfg->limits, names[c - CLI_OPT_MEMORY], arg) < 0) {
		cli_error("--%s: %s", names[c - CLI_OPT_MEMORY], ib_error_last());
		return -1;
	}
	return 1;
}

int cli_open_cache(ib_cache **out, const ib_config *cfg)
{
	if (ib_cache_open(out, cfg->cache_dir) < 0) {
		cli_error("%s", ib_error_last());
		return -1;
	}
	return 0;
}

struct resolve {
	const char *prefix;
	size_t len;
	char id[65];
	int matches;
};

static int resolve_cb(const ib_image_info *info, void *arg)
{
	struct resolve *r = arg;

	if (!strncmp(info->id, r->prefix, r->len)) {
		snprintf(r->id, sizeof(r->id), "%s", info->id);
		r->matches++;
	}
	return 0;
}

int cli_resolve_image(ib_cache *cache, const char *arg, char id[65])
{
	struct resolve r = { .prefix = arg, .len = strlen(arg) };

	for (size_t i = 0; i < r.len; i++)
		if (!strchr("0123456789abcdef", arg[i]) || r.len > 64)
			return ib_error_set("'%s' is not an image id", arg), IB_EINVALID;
	if (r.len < 8)
		return ib_error_set("'%s' is not an image id (give at least 8 hex digits)", arg), IB_EINVALID;
	if (ib_cache_images_foreach(cache, resolve_cb, &r) < 0)
		return IB_ERROR;
	if (r.matches == 0)
		return ib_error_set("no image '%s' in the cache", arg), IB_ENOTFOUND;
	if (r.matches > 1)
		return ib_error_set("'%s' names more than one image; give more digits", arg), IB_EINVALID;
	memcpy(id, r.id, 65);
	return 0;
}

static void usage_all(FILE *f)
{
	fputs("usage: imagebuilder <command> [options] [--cache-dir DIR]\n\ncommands:\n", f);
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
		fprintf(f, "  %s\n", commands[i].help);
	fputs("\nenvironment: IMAGEBUILDER_CACHE_DIR, IMAGEBUILDER_APT_MIRROR, IMAGEBUILDER_PIP_INDEX_URL,\n"
	      "             IMAGEBUILDER_PYTHON_MIRROR, IMAGEBUILDER_PYTHON_VERSIONS, SOURCE_DATE_EPOCH,\n"
	      "             IMAGEBUILDER_BOOTSTRAP_IN_MEMORY, IMAGEBUILDER_BASE_IMAGES, IMAGEBUILDER_IDMAP,\n"
	      "             IMAGEBUILDER_REMOTE\n"
	      "             (see the README)\n", f);
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		usage_all(stderr);
		return EXIT_USAGE;
	}
	if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
		usage_all(stdout);
		return EXIT_OK;
	}
	for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
		ib_config cfg;
		int ret;

		if (strcmp(argv[1], commands[i].name))
			continue;
		if (ib_config_init(&cfg, (const char *const *)environ) < 0 || ib_crash_arm(cfg.crash_at) < 0) {
			cli_error("%s", ib_error_last());
			return EXIT_USAGE;
		}
		/* builds mount their disks (--disk) where only this process sees them */
		if ((commands[i].fn == cmd_build || commands[i].fn == cmd_warm || commands[i].fn == cmd_serve) && geteuid() == 0 &&
		    ib_disk_private_mounts() < 0) {
			cli_error("%s", ib_error_last());
			ib_config_clear(&cfg);
			return EXIT_FAIL;
		}
		ret = commands[i].fn(argc - 1, argv + 1, &cfg);
		ib_config_clear(&cfg);
		return ret;
	}
	cli_error("'%s' is not a command; see 'imagebuilder --help'", argv[1]);
	return EXIT_USAGE;
}

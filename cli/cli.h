#ifndef IB_CLI_H
#define IB_CLI_H

#include "builder/config.h"
#include "cache/cache.h"

/* Exit statuses (CONTRACT section 3). */
#define EXIT_OK 0
#define EXIT_FAIL 1
#define EXIT_USAGE 2

/*
 * Each command: cmd_<name>(argc, argv, cfg), argv[0] being the command
 * name, cfg the configuration from the environment, which the command's
 * options (--cache-dir ...) override.
 */
int cmd_build(int argc, char **argv, ib_config *cfg);
int cmd_export(int argc, char **argv, ib_config *cfg);
int cmd_inspect(int argc, char **argv, ib_config *cfg);
int cmd_ls(int argc, char **argv, ib_config *cfg);
int cmd_cache(int argc, char **argv, ib_config *cfg);
int cmd_serve(int argc, char **argv, ib_config *cfg);
int cmd_gc(int argc, char **argv, ib_config *cfg);
int cmd_warm(int argc, char **argv, ib_config *cfg);
int cmd_debug(int argc, char **argv, ib_config *cfg);
int cmd_pull(int argc, char **argv, ib_config *cfg);

/* Report an error once, git-style: "imagebuilder: <msg>". */
void cli_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
int cli_usage(const char *usage);

/*
 * --memory SIZE, --pids N, --cpus N, --disk SIZE, --remote URL and --runner KIND (build,
 * warm, serve): the entries for a getopt_long table, and their handling:
 * 1 handled, 0 not one of them, EXIT_USAGE-worthy -1 (reported).
 */
#define CLI_LIMIT_OPTIONS                                          \
	{ "memory", required_argument, NULL, CLI_OPT_MEMORY },     \
	{ "pids", required_argument, NULL, CLI_OPT_PIDS },         \
	{ "cpus", required_argument, NULL, CLI_OPT_CPUS },         \
	{ "disk", required_argument, NULL, CLI_OPT_DISK },         \
	{ "remote", required_argument, NULL, CLI_OPT_REMOTE },     \
	{ "runner", required_argument, NULL, CLI_OPT_RUNNER }
#define CLI_LIMIT_USAGE "[--memory SIZE] [--pids N] [--cpus N] [--disk SIZE] [--remote URL] [--runner namespace|vm]"
enum { CLI_OPT_MEMORY = 0x1000, CLI_OPT_PIDS, CLI_OPT_CPUS, CLI_OPT_DISK, CLI_OPT_REMOTE, CLI_OPT_RUNNER };
int cli_limit_option(int c, const char *arg, ib_config *cfg);

/* Open cfg's cache dir (reporting failure). */
int cli_open_cache(ib_cache **out, const ib_config *cfg);

/* Find an image by id or unique prefix (at least 8 hex digits); fills id. */
int cli_resolve_image(ib_cache *cache, const char *arg, char id[65]);

#endif

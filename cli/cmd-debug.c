/*
 * imagebuilder debug: what tests need to see of the program.
 *
 *   debug crash-points   every named crash point: NAME ACTION STATE, one a
 *                        line (IMAGEBUILDER_CRASH_AT=NAME arms one)
 */
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "lib/crash.h"

int cmd_debug(int argc, char **argv, ib_config *cfg)
{
	const ib_crash_point *p;
	size_t n;

	(void)cfg;
	if (argc != 2 || strcmp(argv[1], "crash-points"))
		return cli_usage("debug crash-points");
	p = ib_crash_points(&n);
	for (size_t i = 0; i < n; i++)
		printf("%s %s %s\n", p[i].name, p[i].action, p[i].state);
	return EXIT_OK;
}

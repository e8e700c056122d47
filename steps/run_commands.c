/*
 * run_commands: ["echo hi > /hello.txt", "useradd -m app"]
 *
 * Shell lines, each run by /bin/sh -c in order; the first that exits
 * non-zero fails the step.  This is the one kind whose input meets a
 * shell, by design: the lines are the user's program.  Each line is
 * non-empty, at most IB_CMD_MAX bytes, without NUL.
 */
#include "steps/step.h"

#include "lib/limits.h"

static int command_ok(const char *s, size_t len, const char *field)
{
	(void)s;
	(void)len;
	(void)field;
	return 0;
}

static int run_validate(const json_t *arg, const char *field)
{
	return ib_step_check_list(arg, field, "command", IB_CMD_MAX, command_ok);
}

static int run_plan(ib_step_plan *out, const json_t *arg, const ib_step_ctx *ctx)
{
	(void)ctx;
	for (size_t i = 0; i < json_array_size(arg); i++) {
		ib_strv argv = IB_STRV_INIT;

		ib_strv_push(&argv, "/bin/sh");
		ib_strv_push(&argv, "-c");
		ib_strv_push(&argv, json_string_value(json_array_get(arg, i)));
		ib_step_plan_add(out, &argv);
		ib_strv_free(&argv);
	}
	return 0;
}

const ib_step_ops ib_step_run_commands = {
	.name = "run_commands",
	.validate = run_validate,
	.plan = run_plan,
};

/* What the runners share. */
#include "builder/runner.h"

#include <sys/wait.h>

#include "lib/error.h"

const ib_runner_ops *ib_runner_of(ib_runner_kind kind)
{
	return kind == IB_RUNNER_VM ? &ib_runner_vm : &ib_runner_namespace;
}

int ib_runner_failed(const ib_step_plan *plan, int cmd, int wstatus)
{
	const ib_strv *argv;
	ib_buf b = IB_BUF_INIT;

	if (cmd < 0 || (size_t)cmd >= plan->ncmds)
		return ib_error_set("the runner reported a command it was not given (%d)", cmd);
	argv = &plan->cmds[cmd];
	for (size_t i = 0; i < argv->n; i++) {
		if (i)
			ib_buf_puts(&b, " ");
		ib_buf_puts(&b, argv->v[i]);
	}
	if (b.len > 200) {
		b.len = 197;
		ib_buf_puts(&b, "...");
	}
	if (WIFEXITED(wstatus))
		ib_error_set("command '%s' exited with status %d", b.ptr, WEXITSTATUS(wstatus));
	else if (WIFSIGNALED(wstatus))
		ib_error_set("command '%s' was killed by signal %d", b.ptr, WTERMSIG(wstatus));
	else
		ib_error_set("command '%s' ended with wait status %#x", b.ptr, (unsigned)wstatus);
	ib_buf_free(&b);
	return IB_ERROR;
}

#include "builder/proc.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "lib/util.h"

bool ib_proc_available(const char *program)
{
	const char *p = IB_HOST_PATH;

	while (*p) {
		size_t n = strcspn(p, ":");
		char *path = ib_xasprintf("%.*s/%s", (int)n, p, program);
		bool ok = access(path, X_OK) == 0;

		free(path);
		if (ok)
			return true;
		p += n;
		if (*p == ':')
			p++;
	}
	return false;
}

static void __attribute__((noreturn)) exec_child(const char *const *argv, const ib_proc_opts *opts, int out_w)
{
	extern char **environ;
	int devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);

	if (devnull < 0 || dup2(devnull, 0) < 0 || dup2(out_w, 1) < 0 || dup2(out_w, 2) < 0)
		_exit(127);
	signal(SIGPIPE, SIG_DFL);
	if (opts->env)
		environ = (char **)opts->env;
	execvp(argv[0], (char *const *)argv);
	dprintf(2, "imagebuilder: cannot run '%s': %s\n", argv[0], strerror(errno));
	_exit(127);
}

static void __attribute__((noreturn)) isolated_child(const char *const *argv, const ib_proc_opts *opts,
						     int out_w, pid_t builder)
{
	pid_t pid;
	int ws;

	prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (getppid() != builder)
		_exit(126);
	if (unshare(CLONE_NEWNS | CLONE_NEWPID) < 0 || mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0) {
		dprintf(out_w, "imagebuilder: cannot create namespaces for '%s': %s\n", argv[0], strerror(errno));
		_exit(126);
	}
	if (opts->tmpfs) {
		char data[64];
		snprintf(data, sizeof(data), "mode=0755,size=%llu", opts->tmpfs_bytes);
		if (mount("imagebuilder", opts->tmpfs, "tmpfs", 0, data) < 0) {
			dprintf(out_w, "imagebuilder: cannot mount a tmpfs on '%s': %s\n", opts->tmpfs, strerror(errno));
			_exit(126);
		}
	}
	pid = fork();
	if (pid < 0)
		_exit(126);
	if (pid == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		exec_child(argv, opts, out_w);
	}
	close(out_w);
	while (waitpid(pid, &ws, 0) < 0)
		if (errno != EINTR)
			_exit(126);
	if (WIFSIGNALED(ws))
		_exit(128 + WTERMSIG(ws));
	_exit(WEXITSTATUS(ws));
}

int ib_proc_run(const char *const *argv, const ib_proc_opts *opts)
{
	int out[2] = { -1, -1 };
	int err = 0, killed = 0, ws = 0;
	pid_t pid, builder = getpid();
	char buf[65536];

	if (pipe2(out, O_CLOEXEC) < 0)
		return ib_error_set_errno(errno, "cannot create a pipe");
	pid = fork();
	if (pid < 0) {
		err = ib_error_set_errno(errno, "cannot start '%s'", argv[0]);
		close(out[0]);
		close(out[1]);
		return err;
	}
	if (pid == 0) {
		setpgid(0, 0);
		close(out[0]);
		ib_close_fds_except(out[1], -1);
		if (opts->flags & IB_PROC_ISOLATE)
			isolated_child(argv, opts, out[1], builder);
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		exec_child(argv, opts, out[1]);
	}
	setpgid(pid, pid);
	close(out[1]);

	for (;;) {
		struct pollfd p = { .fd = out[0], .events = POLLIN };
		int r = poll(&p, 1, 100);
		ssize_t n;

		if (!killed && ((opts->cancel && *opts->cancel) || (opts->deadline > 0 && ib_now() >= opts->deadline))) {
			killed = (opts->cancel && *opts->cancel) ? IB_ECANCELED : IB_ETIMEOUT;
			kill(-pid, SIGKILL);
			kill(pid, SIGKILL);
		}
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0) {
			if (r < 0) {
				err = ib_error_set_errno(errno, "cannot read the output of '%s'", argv[0]);
				kill(-pid, SIGKILL);
				break;
			}
			continue;
		}
		n = read(out[0], buf, sizeof(buf));
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		if (opts->output)
			opts->output(buf, (size_t)n, opts->output_arg);
	}
	close(out[0]);
	while (waitpid(pid, &ws, 0) < 0 && errno == EINTR)
		;
	if (err)
		return err;
	const char *name = opts->name ? opts->name : argv[0];
	if (killed == IB_ECANCELED)
		return ib_error_set("'%s' cancelled", name), IB_ECANCELED;
	if (killed == IB_ETIMEOUT)
		return ib_error_set("'%s' timed out", name), IB_ETIMEOUT;
	if (WIFSIGNALED(ws))
		return ib_error_set("'%s' was killed by signal %d", name, WTERMSIG(ws));
	if (WEXITSTATUS(ws) == 127)
		return ib_error_set("cannot run '%s' (is it installed?)", name);
	if (WEXITSTATUS(ws))
		return ib_error_set("'%s' exited with status %d", name, WEXITSTATUS(ws));
	return 0;
}

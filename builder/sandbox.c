/*
 * The namespace runner: each step runs as the first process of new mount,
 * PID, UTS and IPC namespaces, chrooted (pivot_root) into an overlayfs whose
 * lower layers are the cached layers and whose upper directory is the new
 * layer.  The host network is shared (apt and pip need it).
 *
 * Process shape:
 *
 *   builder ── A (own process group; unshares the namespaces)
 *                └─ B = PID 1 of the new PID namespace: mounts, pivots,
 *                   runs each command as a child and reaps orphans.
 *
 * Killing A (and its process group) makes B die through PDEATHSIG, and the
 * kernel kills everything else in a PID namespace whose first process has
 * exited, so a timeout or a cancel ends the whole step, daemons included.
 */
#include "builder/runner.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

#include "lib/util.h"

#define SANDBOX_HOSTNAME "imagebuilder"

/* What B reports to the builder through the status pipe (one write). */
struct sandbox_status {
	int setup_failed; /* 1: message says why the sandbox could not start */
	int cmd;          /* index of the failing command, -1 when none */
	int wstatus;      /* its wait status */
	char msg[1024];
};

/* Everything B needs, prepared before fork so the children allocate little. */
struct sandbox {
	const ib_run_req *req;
	char *merged;
	char *work;
	char *lower_dir;  /* directory the lower names are relative to, or NULL */
	char *ovl_opts;   /* legacy mount options, or NULL to use fsconfig */
	int out_w;
	int status_w;
};

static void report_setup(struct sandbox *sb, int errnum, const char *fmt, ...) IB_PRINTF(3, 4);

static void report_setup(struct sandbox *sb, int errnum, const char *fmt, ...)
{
	struct sandbox_status st = { .setup_failed = 1, .cmd = -1 };
	va_list ap;
	size_t len;

	va_start(ap, fmt);
	vsnprintf(st.msg, sizeof(st.msg), fmt, ap);
	va_end(ap);
	len = strlen(st.msg);
	if (errnum)
		snprintf(st.msg + len, sizeof(st.msg) - len, ": %s", strerror(errnum));
	ib_write_all(sb->status_w, &st, sizeof(st));
}

static int mount_overlay_fsconfig(struct sandbox *sb)
{
	const ib_run_req *req = sb->req;
	int fsfd, mfd;

	fsfd = fsopen("overlay", FSOPEN_CLOEXEC);
	if (fsfd < 0) {
		report_setup(sb, errno, "cannot open overlayfs");
		return -1;
	}
	/* lowerdir+ (Linux 6.8) appends one layer at a time, top first. */
	for (size_t i = req->nlowers; i-- > 0;) {
		if (fsconfig(fsfd, FSCONFIG_SET_STRING, "lowerdir+", req->lowers[i], 0) < 0) {
			report_setup(sb, errno, "overlayfs refused lower layer '%s' (more than this kernel's "
				     "mount options can name; Linux 6.8 or later takes any number)", req->lowers[i]);
			close(fsfd);
			return -1;
		}
	}
	if (fsconfig(fsfd, FSCONFIG_SET_STRING, "upperdir", req->upper, 0) < 0 ||
	    fsconfig(fsfd, FSCONFIG_SET_STRING, "workdir", sb->work, 0) < 0 ||
	    fsconfig(fsfd, FSCONFIG_SET_STRING, "index", "off", 0) < 0 ||
	    fsconfig(fsfd, FSCONFIG_SET_STRING, "redirect_dir", "off", 0) < 0 ||
	    fsconfig(fsfd, FSCONFIG_SET_STRING, "metacopy", "off", 0) < 0 ||
	    fsconfig(fsfd, FSCONFIG_CMD_CREATE, NULL, NULL, 0) < 0) {
		report_setup(sb, errno, "cannot set up overlayfs on '%s'", sb->merged);
		close(fsfd);
		return -1;
	}
	mfd = fsmount(fsfd, FSMOUNT_CLOEXEC, 0);
	close(fsfd);
	if (mfd < 0 || move_mount(mfd, "", AT_FDCWD, sb->merged, MOVE_MOUNT_F_EMPTY_PATH) < 0) {
		report_setup(sb, errno, "cannot mount overlayfs on '%s'", sb->merged);
		if (mfd >= 0)
			close(mfd);
		return -1;
	}
	close(mfd);
	return 0;
}

static int mount_overlay(struct sandbox *sb)
{
	if (!sb->ovl_opts)
		return mount_overlay_fsconfig(sb);
	if (sb->lower_dir && chdir(sb->lower_dir) < 0) {
		report_setup(sb, errno, "cannot enter '%s'", sb->lower_dir);
		return -1;
	}
	if (mount("overlay", sb->merged, "overlay", 0, sb->ovl_opts) < 0) {
		report_setup(sb, errno, "cannot mount overlayfs on '%s'", sb->merged);
		return -1;
	}
	return 0;
}

static int mount_at(struct sandbox *sb, const char *src, const char *rel, const char *type,
		    unsigned long flags, const char *data)
{
	char path[4096];

	snprintf(path, sizeof(path), "%s/%s", sb->merged, rel);
	if (mount(src, path, type, flags, data) < 0) {
		report_setup(sb, errno, "cannot mount %s on '/%s' in the sandbox", type ? type : src, rel);
		return -1;
	}
	return 0;
}

static int is_dir_in(struct sandbox *sb, const char *rel)
{
	char path[4096];
	struct stat st;

	snprintf(path, sizeof(path), "%s/%s", sb->merged, rel);
	return lstat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

static int is_file_in(struct sandbox *sb, const char *rel)
{
	char path[4096];
	struct stat st;

	snprintf(path, sizeof(path), "%s/%s", sb->merged, rel);
	return lstat(path, &st) == 0 && S_ISREG(st.st_mode);
}

static int setup_dev(struct sandbox *sb)
{
	static const struct {
		const char *name;
		unsigned maj, min;
	} nodes[] = {
		{ "null", 1, 3 }, { "zero", 1, 5 }, { "full", 1, 7 },
		{ "random", 1, 8 }, { "urandom", 1, 9 }, { "tty", 5, 0 },
	};
	static const struct {
		const char *name, *target;
	} links[] = {
		{ "fd", "/proc/self/fd" }, { "stdin", "/proc/self/fd/0" },
		{ "stdout", "/proc/self/fd/1" }, { "stderr", "/proc/self/fd/2" },
		{ "ptmx", "pts/ptmx" },
	};
	char path[4096];

	if (!is_dir_in(sb, "dev")) {
		report_setup(sb, 0, "the image has no /dev directory");
		return -1;
	}
	if (mount_at(sb, "tmpfs", "dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=65536k") < 0)
		return -1;
	for (size_t i = 0; i < sizeof(nodes) / sizeof(nodes[0]); i++) {
		snprintf(path, sizeof(path), "%s/dev/%s", sb->merged, nodes[i].name);
		if (mknod(path, S_IFCHR | 0666, makedev(nodes[i].maj, nodes[i].min)) < 0) {
			report_setup(sb, errno, "cannot create /dev/%s in the sandbox", nodes[i].name);
			return -1;
		}
	}
	for (size_t i = 0; i < sizeof(links) / sizeof(links[0]); i++) {
		snprintf(path, sizeof(path), "%s/dev/%s", sb->merged, links[i].name);
		if (symlink(links[i].target, path) < 0) {
			report_setup(sb, errno, "cannot create /dev/%s in the sandbox", links[i].name);
			return -1;
		}
	}
	snprintf(path, sizeof(path), "%s/dev/pts", sb->merged);
	mkdir(path, 0755);
	snprintf(path, sizeof(path), "%s/dev/shm", sb->merged);
	mkdir(path, 01777);
	if (mount_at(sb, "devpts", "dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
		     "newinstance,ptmxmode=0666,mode=0620") < 0)
		return -1;
	if (mount_at(sb, "shm", "dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=65536k") < 0)
		return -1;
	return 0;
}

static int setup_mounts(struct sandbox *sb)
{
	const ib_run_req *req = sb->req;

	if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0) {
		report_setup(sb, errno, "cannot make mounts private");
		return -1;
	}
	if (mount_overlay(sb) < 0)
		return -1;
	if (!is_dir_in(sb, "proc") || !is_dir_in(sb, "sys")) {
		report_setup(sb, 0, "the image has no /proc or /sys directory");
		return -1;
	}
	if (mount_at(sb, "proc", "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
		return -1;
	if (mount_at(sb, "sysfs", "sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, NULL) < 0)
		return -1;
	if (setup_dev(sb) < 0)
		return -1;
	if (req->resolv_conf && is_file_in(sb, "etc/resolv.conf") &&
	    mount_at(sb, req->resolv_conf, "etc/resolv.conf", NULL, MS_BIND, NULL) < 0)
		return -1;
	if (req->plan->flags & IB_PLAN_APT_CACHE) {
		if (req->apt_lists && is_dir_in(sb, "var/lib/apt/lists") &&
		    mount_at(sb, req->apt_lists, "var/lib/apt/lists", NULL, MS_BIND, NULL) < 0)
			return -1;
		if (req->apt_cache && is_dir_in(sb, "var/cache/apt") &&
		    mount_at(sb, req->apt_cache, "var/cache/apt", NULL, MS_BIND, NULL) < 0)
			return -1;
	}
	if (chdir(sb->merged) < 0 || syscall(SYS_pivot_root, ".", ".") < 0) {
		report_setup(sb, errno, "cannot pivot into the sandbox root");
		return -1;
	}
	if (umount2(".", MNT_DETACH) < 0 || chdir("/") < 0) {
		report_setup(sb, errno, "cannot detach the host root");
		return -1;
	}
	if (sethostname(SANDBOX_HOSTNAME, strlen(SANDBOX_HOSTNAME)) < 0) {
		report_setup(sb, errno, "cannot set the sandbox hostname");
		return -1;
	}
	return 0;
}

/* B: PID 1 of the step's namespace.  Never returns. */
static void __attribute__((noreturn)) sandbox_init(struct sandbox *sb)
{
	const ib_step_plan *plan = sb->req->plan;
	struct sandbox_status st = { .cmd = -1 };
	int devnull;

	prctl(PR_SET_PDEATHSIG, SIGKILL);
	umask(0);
	if (setup_mounts(sb) < 0)
		_exit(2);
	umask(022);

	devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
	for (size_t i = 0; i < plan->ncmds; i++) {
		char *const *argv = plan->cmds[i].v;
		pid_t pid, w;
		int ws = 0;

		pid = fork();
		if (pid < 0) {
			report_setup(sb, errno, "cannot start '%s'", argv[0]);
			_exit(2);
		}
		if (pid == 0) {
			extern char **environ;
			if (dup2(devnull, 0) < 0 || dup2(sb->out_w, 1) < 0 || dup2(sb->out_w, 2) < 0)
				_exit(127);
			signal(SIGPIPE, SIG_DFL);
			environ = (char **)sb->req->env;
			execvp(argv[0], argv);
			dprintf(2, "imagebuilder: cannot run '%s': %s\n", argv[0], strerror(errno));
			_exit(127);
		}
		/* Reap everything; stop waiting when our command is done. */
		while ((w = waitpid(-1, &ws, 0)) != pid) {
			if (w < 0 && errno != EINTR) {
				report_setup(sb, errno, "cannot wait for '%s'", argv[0]);
				_exit(2);
			}
		}
		if (!WIFEXITED(ws) || WEXITSTATUS(ws) != 0) {
			st.cmd = (int)i;
			st.wstatus = ws;
			ib_write_all(sb->status_w, &st, sizeof(st));
			_exit(1);
		}
	}
	ib_write_all(sb->status_w, &st, sizeof(st));
	_exit(0);
}

/* A: unshares the namespaces, starts B, and exits with its status. */
static void __attribute__((noreturn)) sandbox_outer(struct sandbox *sb, pid_t builder)
{
	pid_t b;
	int ws;

	prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (getppid() != builder)
		_exit(3);
	if (unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWUTS | CLONE_NEWIPC) < 0) {
		report_setup(sb, errno, "cannot create namespaces (imagebuilder needs root)");
		_exit(2);
	}
	b = fork();
	if (b < 0) {
		report_setup(sb, errno, "cannot start the sandbox");
		_exit(2);
	}
	if (b == 0)
		sandbox_init(sb);
	close(sb->out_w);
	close(sb->status_w);
	while (waitpid(b, &ws, 0) < 0) {
		if (errno != EINTR)
			_exit(3);
	}
	_exit(WIFEXITED(ws) ? WEXITSTATUS(ws) : 3);
}

static bool needs_escape(const char *s)
{
	return strpbrk(s, ",:\\") != NULL;
}

/*
 * A lower's name relative to the directory of the first lower (plen bytes
 * of it, with the slash), or to that directory's parent (pplen bytes): a
 * layer still in its scratch dir, being committed beside this step, is
 * "../tmp/b-XXXXXX/upper" from layers/.  NULL when it is neither.
 */
static char *relative_lower(const char *lower, const char *first, size_t plen, size_t pplen)
{
	if (!strncmp(lower, first, plen) && !strchr(lower + plen, '/'))
		return ib_xstrdup(lower + plen);
	if (pplen && !strncmp(lower, first, pplen))
		return ib_xasprintf("../%s", lower + pplen);
	return NULL;
}

static void free_names(char **names, size_t n)
{
	for (size_t i = 0; i < n; i++)
		free(names[i]);
	free(names);
}

/* Legacy overlay options, when they fit one page; NULL means use fsconfig. */
static char *overlay_options(struct sandbox *sb)
{
	const ib_run_req *req = sb->req;
	ib_buf b = IB_BUF_INIT;
	size_t plen = 0, pplen = 0;
	const char *slash;
	char **names = ib_xcalloc(req->nlowers + 1, sizeof(*names));

	/* Lower layers in one directory are named relative to it: shorter. */
	slash = req->nlowers ? strrchr(req->lowers[0], '/') : NULL;
	if (slash && slash > req->lowers[0]) {
		const char *q = slash;
		plen = (size_t)(slash - req->lowers[0]) + 1;
		while (q > req->lowers[0] && q[-1] != '/')
			q--;
		pplen = (size_t)(q - req->lowers[0]);
	}
	for (size_t i = 0; plen && i < req->nlowers; i++)
		if (!(names[i] = relative_lower(req->lowers[i], req->lowers[0], plen, pplen)))
			plen = 0;
	if (plen)
		sb->lower_dir = ib_xstrndup(req->lowers[0], plen);
	ib_buf_puts(&b, "lowerdir=");
	for (size_t i = req->nlowers; i-- > 0;) {
		const char *p = plen ? names[i] : req->lowers[i];
		if (needs_escape(p))
			goto fsconfig;
		ib_buf_puts(&b, p);
		if (i)
			ib_buf_puts(&b, ":");
	}
	if (needs_escape(req->upper) || needs_escape(sb->work))
		goto fsconfig;
	ib_buf_printf(&b, ",upperdir=%s,workdir=%s,index=off,redirect_dir=off,metacopy=off", req->upper, sb->work);
	if (b.len >= 4000)
		goto fsconfig;
	free_names(names, req->nlowers);
	return ib_buf_detach(&b);
fsconfig:
	free_names(names, req->nlowers);
	ib_buf_free(&b);
	free(sb->lower_dir);
	sb->lower_dir = NULL;
	return NULL;
}

static int describe_failure(const ib_run_req *req, const struct sandbox_status *st)
{
	const ib_strv *cmd = &req->plan->cmds[st->cmd];
	ib_buf b = IB_BUF_INIT;

	for (size_t i = 0; i < cmd->n; i++) {
		if (i)
			ib_buf_puts(&b, " ");
		ib_buf_puts(&b, cmd->v[i]);
	}
	if (b.len > 200) {
		b.len = 197;
		ib_buf_puts(&b, "...");
	}
	if (WIFEXITED(st->wstatus))
		ib_error_set("command '%s' exited with status %d", b.ptr, WEXITSTATUS(st->wstatus));
	else
		ib_error_set("command '%s' was killed by signal %d", b.ptr, WTERMSIG(st->wstatus));
	ib_buf_free(&b);
	return IB_ERROR;
}

static int namespace_run(const ib_run_req *req)
{
	struct sandbox sb = { .req = req, .out_w = -1, .status_w = -1 };
	struct sandbox_status st;
	int out[2] = { -1, -1 }, status[2] = { -1, -1 };
	int err = 0, killed = 0, ws = 0;
	pid_t pid = -1, builder = getpid();
	char buf[65536];

	sb.merged = ib_xasprintf("%s/merged", req->scratch);
	sb.work = ib_xasprintf("%s/work", req->scratch);
	if (mkdir(sb.merged, 0755) < 0 || mkdir(sb.work, 0700) < 0) {
		err = ib_error_set_errno(errno, "cannot create sandbox directories in '%s'", req->scratch);
		goto out;
	}
	sb.ovl_opts = overlay_options(&sb);
	if (pipe2(out, O_CLOEXEC) < 0 || pipe2(status, O_CLOEXEC) < 0) {
		err = ib_error_set_errno(errno, "cannot create pipes");
		goto out;
	}
	sb.out_w = out[1];
	sb.status_w = status[1];

	pid = fork();
	if (pid < 0) {
		err = ib_error_set_errno(errno, "cannot start the sandbox");
		goto out;
	}
	if (pid == 0) {
		setpgid(0, 0);
		close(out[0]);
		close(status[0]);
		ib_close_fds_except(sb.out_w, sb.status_w);
		sandbox_outer(&sb, builder);
	}
	setpgid(pid, pid);
	close(out[1]);
	close(status[1]);
	out[1] = status[1] = -1;

	for (;;) {
		struct pollfd p = { .fd = out[0], .events = POLLIN };
		int r = poll(&p, 1, 100);
		ssize_t n;

		if (!killed && ((req->cancel && *req->cancel) || (req->deadline > 0 && ib_now() >= req->deadline))) {
			killed = (req->cancel && *req->cancel) ? IB_ECANCELED : IB_ETIMEOUT;
			kill(-pid, SIGKILL);
			kill(pid, SIGKILL);
		}
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0) {
			err = ib_error_set_errno(errno, "cannot read the step's output");
			kill(-pid, SIGKILL);
			break;
		}
		if (r == 0)
			continue;
		n = read(out[0], buf, sizeof(buf));
		if (n < 0 && (errno == EINTR || errno == EAGAIN))
			continue;
		if (n <= 0)
			break;
		if (req->output)
			req->output(buf, (size_t)n, req->output_arg);
	}
	while (waitpid(pid, &ws, 0) < 0 && errno == EINTR)
		;
	if (err)
		goto out;
	if (killed) {
		err = killed == IB_ECANCELED ? (ib_error_set("step cancelled"), IB_ECANCELED)
					     : (ib_error_set("step timed out"), IB_ETIMEOUT);
		goto out;
	}
	memset(&st, 0, sizeof(st));
	if (read(status[0], &st, sizeof(st)) != (ssize_t)sizeof(st)) {
		err = ib_error_set("the sandbox ended without a status (exit %d)",
				   WIFEXITED(ws) ? WEXITSTATUS(ws) : 128 + WTERMSIG(ws));
		goto out;
	}
	if (st.setup_failed)
		err = ib_error_set("sandbox: %s", st.msg);
	else if (st.cmd >= 0)
		err = describe_failure(req, &st);
out:
	for (int i = 0; i < 2; i++) {
		if (out[i] >= 0)
			close(out[i]);
		if (status[i] >= 0)
			close(status[i]);
	}
	/* The overlay's work dir is the kernel's; nothing in it is ours to keep. */
	ib_rm_rf(sb.work);
	rmdir(sb.merged);
	free(sb.merged);
	free(sb.work);
	free(sb.lower_dir);
	free(sb.ovl_opts);
	return err;
}

const ib_runner_ops ib_runner_namespace = {
	.name = "namespace",
	.run = namespace_run,
};

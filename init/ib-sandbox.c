/*
 * ib-sandbox: PID 1 of a build step's sandbox.  The builder sets up the
 * namespaces and mounts, then execs this program fresh (from a sealed
 * memfd), so none of the builder's memory, environment or descriptors is
 * inside; it is static, so it needs nothing from the image.
 *
 * It makes itself non-dumpable (a step cannot read its memory or its
 * descriptors through /proc/1), reads the plan (builder/sandbox-proto.h),
 * and runs each command in order as a child, each in a session of its
 * own, with only the capabilities the plan keeps, no_new_privs, and the
 * plan's seccomp filter; it reaps every orphan; and at the end it writes
 * one status record to a pipe that no step holds.  It installs no signal
 * handler: as the namespace's init it receives no signal from inside.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include "builder/sandbox-proto.h"

#ifndef PR_CAP_AMBIENT
#define PR_CAP_AMBIENT 47
#define PR_CAP_AMBIENT_CLEAR_ALL 4
#endif

struct plan {
	struct ib_sandbox_plan_hdr hdr;
	struct sock_filter *filter;
	char ***cmds;
	char **env;
};

static void report(int failed, int cmd, int wstatus, const char *fmt, ...) __attribute__((format(printf, 4, 5)));

static void report(int failed, int cmd, int wstatus, const char *fmt, ...)
{
	struct ib_sandbox_status st;
	const char *p = (const char *)&st;
	size_t left = sizeof(st);
	va_list ap;

	memset(&st, 0, sizeof(st));
	st.setup_failed = failed;
	st.cmd = cmd;
	st.wstatus = wstatus;
	if (fmt) {
		va_start(ap, fmt);
		vsnprintf(st.msg, sizeof(st.msg), fmt, ap);
		va_end(ap);
	}
	while (left) {
		ssize_t n = write(IB_SANDBOX_FD_STATUS, p, left);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		p += n;
		left -= (size_t)n;
	}
}

static void __attribute__((noreturn)) die(int errnum, const char *what)
{
	report(1, -1, 0, "%s%s%s", what, errnum ? ": " : "", errnum ? strerror(errnum) : "");
	_exit(2);
}

/* The plan, read whole from its memfd. */
static char *read_all(int fd, size_t *len)
{
	struct stat st;
	char *buf;
	size_t got = 0;

	if (fstat(fd, &st) < 0 || st.st_size <= 0 || (uint64_t)st.st_size > IB_SANDBOX_PLAN_MAX)
		die(errno, "the plan is missing or too large");
	buf = malloc((size_t)st.st_size);
	if (!buf)
		die(ENOMEM, "cannot read the plan");
	while (got < (size_t)st.st_size) {
		ssize_t n = pread(fd, buf + got, (size_t)st.st_size - got, (off_t)got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			die(errno, "cannot read the plan");
		got += (size_t)n;
	}
	*len = got;
	return buf;
}

struct cursor {
	const char *p, *end;
};

static uint32_t take_u32(struct cursor *c)
{
	uint32_t v;

	if ((size_t)(c->end - c->p) < sizeof(v))
		die(0, "the plan is truncated");
	memcpy(&v, c->p, sizeof(v));
	c->p += sizeof(v);
	return v;
}

static char *take_string(struct cursor *c)
{
	uint32_t n = take_u32(c);
	char *s;

	if ((size_t)(c->end - c->p) < n)
		die(0, "the plan is truncated");
	s = malloc((size_t)n + 1);
	if (!s)
		die(ENOMEM, "cannot read the plan");
	memcpy(s, c->p, n);
	s[n] = '\0';
	c->p += n;
	return s;
}

static char **take_strings(struct cursor *c, uint32_t n)
{
	char **v;

	if (n > 1u << 20)
		die(0, "the plan names too many strings");
	v = calloc((size_t)n + 1, sizeof(*v));
	if (!v)
		die(ENOMEM, "cannot read the plan");
	for (uint32_t i = 0; i < n; i++)
		v[i] = take_string(c);
	return v;
}

static void load_plan(struct plan *pl)
{
	size_t len = 0, flen;
	char *buf = read_all(IB_SANDBOX_FD_PLAN, &len);
	struct cursor c = { buf, buf + len };

	close(IB_SANDBOX_FD_PLAN);
	if (len < sizeof(pl->hdr))
		die(0, "the plan is truncated");
	memcpy(&pl->hdr, buf, sizeof(pl->hdr));
	c.p += sizeof(pl->hdr);
	if (memcmp(pl->hdr.magic, IB_SANDBOX_MAGIC, sizeof(IB_SANDBOX_MAGIC)))
		die(0, "the plan is not for this version of ib-sandbox");
	if (pl->hdr.filter_len == 0 || pl->hdr.filter_len > BPF_MAXINSNS)
		die(0, "the plan's seccomp program is empty or too long");
	flen = (size_t)pl->hdr.filter_len * sizeof(struct sock_filter);
	if ((size_t)(c.end - c.p) < flen)
		die(0, "the plan is truncated");
	pl->filter = malloc(flen);
	if (!pl->filter)
		die(ENOMEM, "cannot read the plan");
	memcpy(pl->filter, c.p, flen);
	c.p += flen;
	if (pl->hdr.ncmds > 4096)
		die(0, "the plan names too many commands");
	pl->cmds = calloc((size_t)pl->hdr.ncmds + 1, sizeof(*pl->cmds));
	if (!pl->cmds)
		die(ENOMEM, "cannot read the plan");
	for (uint32_t i = 0; i < pl->hdr.ncmds; i++) {
		pl->cmds[i] = take_strings(&c, take_u32(&c));
		if (!pl->cmds[i][0])
			die(0, "the plan has an empty command");
	}
	pl->env = take_strings(&c, pl->hdr.nenv);
	if (c.p != c.end)
		die(0, "the plan has trailing bytes");
	free(buf);
}

/*
 * Once, in PID 1 before any command: no_new_privs and the seccomp filter,
 * which every command inherits, with a listener for its user
 * notifications (a step's first network socket), sent to the builder over
 * the status socket and closed here.
 */
static void filter_all(const struct plan *pl)
{
	struct sock_fprog prog = { (unsigned short)pl->hdr.filter_len, pl->filter };
	union {
		char buf[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} u;
	char tag = IB_SANDBOX_MSG_LISTENER;
	struct iovec iov = { &tag, 1 };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf, .msg_controllen = sizeof(u.buf) };
	struct cmsghdr *cm;
	int fd;

	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
		die(errno, "cannot set no_new_privs");
	fd = (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER, &prog);
	if (fd < 0)
		die(errno, "cannot load the seccomp filter");
	memset(u.buf, 0, sizeof(u.buf));
	cm = CMSG_FIRSTHDR(&mh);
	cm->cmsg_level = SOL_SOCKET;
	cm->cmsg_type = SCM_RIGHTS;
	cm->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(cm), &fd, sizeof(int));
	while (sendmsg(IB_SANDBOX_FD_STATUS, &mh, MSG_NOSIGNAL) < 0)
		if (errno != EINTR)
			die(errno, "cannot hand the seccomp listener to the builder");
	close(fd);
}

/*
 * In the child, before exec: the capabilities the plan keeps (root keeps
 * its bounding set across exec, so the bounding set is what counts),
 * none ambient or inheritable.  no_new_privs and the filter it has from
 * PID 1.
 */
static int confine(const struct plan *pl)
{
	struct __user_cap_header_struct h = { _LINUX_CAPABILITY_VERSION_3, 0 };
	struct __user_cap_data_struct d[2];
	uint64_t keep = pl->hdr.keep_caps;

	for (int cap = 0; cap <= 63; cap++) {
		if (keep & (1ULL << cap))
			continue;
		if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno != EINVAL)
			return -1;
	}
	prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
	if (syscall(SYS_capget, &h, d) < 0)
		return -1;
	for (int i = 0; i < 2; i++) {
		uint32_t k = (uint32_t)(keep >> (32 * i));
		d[i].effective &= k;
		d[i].permitted &= k;
		d[i].inheritable = 0;
	}
	if (syscall(SYS_capset, &h, d) < 0)
		return -1;
	return 0;
}

int main(void)
{
	struct plan pl;
	extern char **environ;

	/* first of all: nothing in here may be read through /proc/1 */
	if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) < 0)
		die(errno, "cannot make PID 1 non-dumpable");
	if (getpid() != 1)
		die(0, "ib-sandbox runs only as the first process of a PID namespace");
	if (fcntl(IB_SANDBOX_FD_STATUS, F_SETFD, FD_CLOEXEC) < 0)
		die(errno, "no status pipe");
	memset(&pl, 0, sizeof(pl));
	load_plan(&pl);
	umask(022);
	if (chdir("/") < 0)
		die(errno, "cannot enter /");
	filter_all(&pl);

	for (uint32_t i = 0; i < pl.hdr.ncmds; i++) {
		char **argv = pl.cmds[i];
		int ws = 0;
		pid_t pid = fork(), w;

		if (pid < 0)
			die(errno, "cannot start a command");
		if (pid == 0) {
			setsid();
			signal(SIGPIPE, SIG_DFL);
			if (confine(&pl) < 0) {
				dprintf(2, "ib-sandbox: cannot confine '%s': %s\n", argv[0], strerror(errno));
				_exit(126);
			}
			environ = pl.env;
			execvp(argv[0], argv);
			dprintf(2, "imagebuilder: cannot run '%s': %s\n", argv[0], strerror(errno));
			_exit(127);
		}
		/* reap everything; go on when this command is done */
		while ((w = waitpid(-1, &ws, 0)) != pid) {
			if (w < 0 && errno != EINTR)
				die(errno, "cannot wait for a command");
		}
		if (!WIFEXITED(ws) || WEXITSTATUS(ws) != 0) {
			report(0, (int)i, ws, NULL);
			_exit(1);
		}
	}
	report(0, -1, 0, NULL);
	_exit(0);
}

/*
 * The VM runner's guest agent: ib-init as PID 1 of the builder's throwaway
 * VM (ib.agent=1 on the kernel command line, started from the initramfs the
 * builder makes).  It loads the modules the initramfs lists, brings up the
 * network from ip=, finds its control port and disks, and then runs the
 * builder's steps one at a time (builder/vm-proto.h):
 *
 *   agent (PID 1, the initramfs's root)
 *    └─ P  new mount and PID namespaces: the step's lower disk, its
 *          overlayfs (upper on the scratch disk), /proc, /sys, /dev,
 *          resolv.conf, the apt lists
 *        └─ G  PID 1 of the step: chroot into the overlay, then each
 *              command in turn, its output into a pipe the agent forwards
 *
 * When G ends, the kernel ends every process of the step, and when P ends
 * its mounts go with it; the agent then remounts the scratch disk
 * read-only, so the builder reads a clean file system, and reports.  The
 * guest is as untrusted as the step: the builder believes nothing it says
 * beyond what it checks.
 */
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "builder/sandbox-dev.h"
#include "builder/vm-proto.h"
#include "init/ib-init.h"

#define ROOT "/mnt/root"
#define LOWER "/mnt/lower"
#define LISTS "/mnt/lists"
#define SCRATCH "/mnt/scratch"
/* how long devices get to show up, in 50 ms ticks */
#define WAIT_TICKS 400

static int ctl = -1;

static void __attribute__((noreturn)) halt(void)
{
	sync();
	reboot(RB_POWER_OFF);
	for (;;)
		pause();
}

static void tick(void)
{
	const struct timespec t = { 0, 50 * 1000 * 1000 };
	nanosleep(&t, NULL);
}

/* ---- frames ---- */

static int write_all(int fd, const void *buf, size_t len)
{
	const char *p = buf;

	while (len) {
		ssize_t n = write(fd, p, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

static int read_all(int fd, void *buf, size_t len)
{
	char *p = buf;

	while (len) {
		ssize_t n = read(fd, p, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

static void put32(unsigned char *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (unsigned char)(v >> (8 * i));
}

static int send_frame(char type, const void *a, size_t alen, const void *b, size_t blen)
{
	unsigned char hdr[5];

	hdr[0] = (unsigned char)type;
	put32(hdr + 1, (uint32_t)(alen + blen));
	if (write_all(ctl, hdr, 5) < 0 || (alen && write_all(ctl, a, alen) < 0) ||
	    (blen && write_all(ctl, b, blen) < 0)) {
		say(errno, "the builder's port is gone; powering off");
		halt();
	}
	return 0;
}

static void send_status(uint32_t what, int32_t cmd, int32_t wstatus, const char *msg)
{
	unsigned char b[16];
	size_t len = strlen(msg);

	put32(b, what);
	put32(b + 4, (uint32_t)cmd);
	put32(b + 8, (uint32_t)wstatus);
	put32(b + 12, (uint32_t)len);
	send_frame(IB_VM_MSG_STATUS, b, sizeof(b), msg, len);
}

/* A request, taken apart: the cursor's bounds checked at every step. */
struct cursor {
	const unsigned char *p, *end;
	bool bad;
};

static uint32_t take32(struct cursor *c)
{
	uint32_t v = 0;

	if (c->bad || c->end - c->p < 4) {
		c->bad = true;
		return 0;
	}
	for (int i = 0; i < 4; i++)
		v |= (uint32_t)c->p[i] << (8 * i);
	c->p += 4;
	return v;
}

static char *take_str(struct cursor *c)
{
	uint32_t len = take32(c);
	char *s;

	if (c->bad || (size_t)(c->end - c->p) < len) {
		c->bad = true;
		return NULL;
	}
	s = malloc((size_t)len + 1);
	if (!s) {
		c->bad = true;
		return NULL;
	}
	memcpy(s, c->p, len);
	s[len] = '\0';
	c->p += len;
	return s;
}

/* n strings, NULL-terminated; NULL when the request is short */
static char **take_strv(struct cursor *c, uint32_t n)
{
	char **v;

	if (c->bad || n > 1u << 16)
		return c->bad = true, NULL;
	v = calloc((size_t)n + 1, sizeof(*v));
	if (!v)
		return c->bad = true, NULL;
	for (uint32_t i = 0; i < n && !c->bad; i++)
		v[i] = take_str(c);
	return v;
}

/* ---- boot ---- */

static void load_modules(void)
{
	char *list = NULL, *line, *save = NULL, path[512];

	if (read_file(&list, "/modules", 1 << 16) <= 0) {
		free(list);
		return;
	}
	for (line = strtok_r(list, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
		int fd;

		if (!*line || strchr(line, '/'))
			continue;
		snprintf(path, sizeof(path), "/lib/modules/%s", line);
		fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0) {
			say(errno, "cannot open %s", path);
			continue;
		}
		if (syscall(SYS_finit_module, fd, "", 0) < 0 && errno != EEXIST)
			say(errno, "cannot load %s", line);
		close(fd);
	}
	free(list);
}

/* The first line of a sysfs file, without its newline. */
static bool sysfs_line(const char *path, char *out, size_t size)
{
	char *data = NULL;
	ssize_t n = read_file(&data, path, 4096);

	if (n <= 0) {
		free(data);
		return false;
	}
	data[strcspn(data, "\n")] = '\0';
	snprintf(out, size, "%s", data);
	free(data);
	return true;
}

/*
 * /dev/<name> of the entry of class dir (/sys/block, /sys/class/virtio-ports)
 * whose attribute file holds want; waits for it to appear.
 */
static bool find_dev(const char *dir, const char *attr, const char *want, char out[64])
{
	for (int t = 0; t < WAIT_TICKS; t++) {
		DIR *d = opendir(dir);
		struct dirent *e;
		char path[512], line[128];
		bool found = false;

		while (d && (e = readdir(d))) {
			if (e->d_name[0] == '.')
				continue;
			snprintf(path, sizeof(path), "%s/%s/%s", dir, e->d_name, attr);
			if (sysfs_line(path, line, sizeof(line)) && !strcmp(line, want)) {
				snprintf(out, 64, "/dev/%.58s", e->d_name);
				found = true;
				break;
			}
		}
		if (d)
			closedir(d);
		if (found && access(out, F_OK) == 0)
			return true;
		tick();
	}
	return false;
}

/* ---- the package indexes on host loopback ---- */

/* Copy both ways between a and b until both directions end. */
static void __attribute__((noreturn)) splice_pair(int a, int b)
{
	struct pollfd p[2] = { { a, POLLIN, 0 }, { b, POLLIN, 0 } };
	int peer[2] = { b, a };
	char buf[65536];

	while (p[0].fd >= 0 || p[1].fd >= 0) {
		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			break;
		}
		for (int i = 0; i < 2; i++) {
			ssize_t n;

			if (p[i].fd < 0 || !p[i].revents)
				continue;
			n = read(p[i].fd, buf, sizeof(buf));
			if (n <= 0) {
				shutdown(peer[i], SHUT_WR);
				p[i].fd = -1;
				continue;
			}
			if (write_all(peer[i], buf, (size_t)n) < 0)
				_exit(0);
		}
	}
	_exit(0);
}

/*
 * A step reaches a package index at 127.0.0.1:port, as in the namespace
 * runner; here that is the guest's own loopback.  A relay listens there
 * and connects each client to the gateway's port, which the user-mode
 * network takes to the builder's network namespace, where pasta forwards
 * that port (and only the ports named) to the host's loopback.
 */
static void relay(unsigned port)
{
	struct sockaddr_in lo = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
	struct sockaddr_in gw = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
	int one = 1, ls;
	pid_t pid;

	lo.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
	gw.sin_addr.s_addr = htonl(0x0a000202); /* 10.0.2.2 */
	ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (ls < 0 || setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
	    bind(ls, (struct sockaddr *)&lo, sizeof(lo)) < 0 || listen(ls, 64) < 0) {
		say(errno, "cannot listen on 127.0.0.1:%u", port);
		if (ls >= 0)
			close(ls);
		return;
	}
	pid = fork();
	if (pid != 0) {
		close(ls);
		return;
	}
	signal(SIGCHLD, SIG_IGN);
	for (;;) {
		int c = accept4(ls, NULL, NULL, SOCK_CLOEXEC), up;

		if (c < 0)
			continue;
		if (fork() == 0) {
			close(ls);
			up = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
			if (up < 0 || connect(up, (struct sockaddr *)&gw, sizeof(gw)) < 0)
				_exit(0);
			splice_pair(c, up);
		}
		close(c);
	}
}

static void relay_ports(const char *list)
{
	char *copy = list ? strdup(list) : NULL, *tok, *save = NULL;

	for (tok = copy ? strtok_r(copy, ",", &save) : NULL; tok; tok = strtok_r(NULL, ",", &save)) {
		char *end;
		unsigned long port = strtoul(tok, &end, 10);
		if (*end || port == 0 || port > 65535)
			say(0, "ib.ports: bad port '%s'", tok);
		else
			relay((unsigned)port);
	}
	free(copy);
}

/* ---- a step ---- */

struct step {
	uint32_t index, flags;
	uint64_t clock_ns;
	char *resolv;
	uint32_t ncmds;
	char ***cmds;
	char **env;
};

static void step_free(struct step *s)
{
	for (uint32_t i = 0; s->cmds && i < s->ncmds; i++) {
		for (char **a = s->cmds[i]; a && *a; a++)
			free(*a);
		free(s->cmds[i]);
	}
	free(s->cmds);
	for (char **e = s->env; e && *e; e++)
		free(*e);
	free(s->env);
	free(s->resolv);
}

static bool parse_step(struct step *s, const unsigned char *buf, size_t len)
{
	struct cursor c = { buf, buf + len, false };
	uint32_t lo, hi;

	memset(s, 0, sizeof(*s));
	s->index = take32(&c);
	s->flags = take32(&c);
	lo = take32(&c);
	hi = take32(&c);
	s->clock_ns = (uint64_t)hi << 32 | lo;
	s->resolv = take_str(&c);
	s->ncmds = take32(&c);
	if (c.bad || s->ncmds == 0 || s->ncmds > 4096)
		return false;
	s->cmds = calloc(s->ncmds, sizeof(*s->cmds));
	if (!s->cmds)
		return false;
	for (uint32_t i = 0; i < s->ncmds && !c.bad; i++) {
		s->cmds[i] = take_strv(&c, take32(&c));
		if (!c.bad && !s->cmds[i][0])
			c.bad = true;
	}
	s->env = take_strv(&c, take32(&c));
	return !c.bad && c.p == c.end;
}

/* What P and G report to the agent, through a pipe, once. */
struct report {
	uint32_t what;
	int32_t cmd, wstatus;
	char msg[512];
};

static void __attribute__((noreturn, format(printf, 3, 4))) fail_setup(int rfd, int errnum, const char *fmt, ...)
{
	struct report r = { IB_VM_DONE_SETUP, -1, 0, "" };
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(r.msg, sizeof(r.msg), fmt, ap);
	va_end(ap);
	if (errnum && n >= 0 && (size_t)n < sizeof(r.msg))
		snprintf(r.msg + n, sizeof(r.msg) - (size_t)n, ": %s", strerror(errnum));
	if (write(rfd, &r, sizeof(r)) < 0)
		_exit(2);
	_exit(1);
}

/* Is rel (below ROOT) of this type, not following a symlink at its end? */
static bool is_type(const char *rel, mode_t type)
{
	char path[512];
	struct stat st;

	snprintf(path, sizeof(path), ROOT "/%s", rel);
	return lstat(path, &st) == 0 && (st.st_mode & S_IFMT) == type;
}

static void mount_in(int rfd, const char *src, const char *rel, const char *type, unsigned long flags,
		     const char *data)
{
	char path[512];

	snprintf(path, sizeof(path), ROOT "/%s", rel);
	if (mount(src, path, type, flags, data) < 0)
		fail_setup(rfd, errno, "cannot mount /%s in the VM", rel);
}

/* The same /dev the namespace runner gives a step. */
static void setup_dev(int rfd)
{
	char path[128];

	if (!is_type("dev", S_IFDIR))
		fail_setup(rfd, 0, "the image has no /dev directory");
	mount_in(rfd, "tmpfs", "dev", "tmpfs", MS_NOSUID | MS_NOEXEC, IB_DEV_TMPFS_OPTS);
	for (size_t i = 0; i < sizeof(ib_dev_nodes) / sizeof(ib_dev_nodes[0]); i++) {
		snprintf(path, sizeof(path), ROOT "/dev/%s", ib_dev_nodes[i].name);
		if (mknod(path, S_IFCHR | 0666, makedev(ib_dev_nodes[i].maj, ib_dev_nodes[i].min)) < 0 || chmod(path, 0666) < 0)
			fail_setup(rfd, errno, "cannot create /dev/%s in the VM", ib_dev_nodes[i].name);
	}
	for (size_t i = 0; i < sizeof(ib_dev_links) / sizeof(ib_dev_links[0]); i++) {
		snprintf(path, sizeof(path), ROOT "/dev/%s", ib_dev_links[i].name);
		if (symlink(ib_dev_links[i].target, path) < 0)
			fail_setup(rfd, errno, "cannot create /dev/%s in the VM", ib_dev_links[i].name);
	}
	mkdir(ROOT "/dev/pts", 0755);
	mkdir(ROOT "/dev/shm", 01777);
	chmod(ROOT "/dev/shm", 01777);
	mount_in(rfd, "devpts", "dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, IB_DEV_PTS_OPTS);
	mount_in(rfd, "shm", "dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, IB_DEV_SHM_OPTS);
}

/* G: the step's PID 1, in its root; runs the commands, reports, and its end ends the step. */
static void __attribute__((noreturn)) step_init(const struct step *s, int out, int rfd)
{
	struct report r = { IB_VM_DONE_OK, -1, 0, "" };
	int null;

	if (chroot(ROOT) < 0 || chdir("/") < 0)
		fail_setup(rfd, errno, "cannot enter the step's root");
	if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
		fail_setup(rfd, errno, "cannot mount /proc in the VM");
	umask(022);
	null = open("/dev/null", O_RDWR | O_CLOEXEC);
	for (uint32_t i = 0; i < s->ncmds; i++) {
		pid_t pid = fork(), w;
		int ws = 0;

		if (pid < 0)
			fail_setup(rfd, errno, "cannot start a command");
		if (pid == 0) {
			extern char **environ;

			setsid();
			if (null >= 0)
				dup2(null, 0);
			dup2(out, 1);
			dup2(out, 2);
			signal(SIGPIPE, SIG_DFL);
			environ = s->env;
			execvp(s->cmds[i][0], s->cmds[i]);
			dprintf(2, "imagebuilder: cannot run '%s': %s\n", s->cmds[i][0], strerror(errno));
			_exit(127);
		}
		while ((w = waitpid(-1, &ws, 0)) != pid) {
			if (w < 0 && errno != EINTR)
				fail_setup(rfd, errno, "cannot wait for a command");
		}
		if (!WIFEXITED(ws) || WEXITSTATUS(ws) != 0) {
			r.what = IB_VM_DONE_FAILED;
			r.cmd = (int32_t)i;
			r.wstatus = ws;
			break;
		}
	}
	if (write(rfd, &r, sizeof(r)) < 0)
		_exit(2);
	_exit(0);
}

/* P: the step's mounts in a namespace of its own, then G. */
static void __attribute__((noreturn)) step_outer(const struct step *s, const char *lower_dev, const char *lists_dev,
						 int out, int rfd)
{
	char opts[512], resolv_tmp[] = "/run/ib-resolv.conf";
	pid_t g;
	int ws;

	if (unshare(CLONE_NEWNS | CLONE_NEWPID) < 0)
		fail_setup(rfd, errno, "cannot make the step's namespaces");
	if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
		fail_setup(rfd, errno, "cannot make mounts private");
	if (mount(lower_dev, LOWER, "ext4", MS_RDONLY | MS_NOSUID | MS_NODEV, "noload") < 0)
		fail_setup(rfd, errno, "cannot mount the lower layers (%s)", lower_dev);
	snprintf(opts, sizeof(opts),
		 "lowerdir=" LOWER ",upperdir=" SCRATCH "/s%u/upper,workdir=" SCRATCH
		 "/s%u/work,index=off,redirect_dir=off,metacopy=off",
		 s->index, s->index);
	if (mount("overlay", ROOT, "overlay", MS_NOSUID | MS_NODEV, opts) < 0)
		fail_setup(rfd, errno, "cannot mount the step's overlayfs");
	if (!is_type("proc", S_IFDIR) || !is_type("sys", S_IFDIR))
		fail_setup(rfd, 0, "the image has no /proc or /sys directory");
	mount_in(rfd, "sysfs", "sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, NULL);
	setup_dev(rfd);
	if (*s->resolv && is_type("etc/resolv.conf", S_IFREG)) {
		int fd = open(resolv_tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
		if (fd < 0 || write_all(fd, s->resolv, strlen(s->resolv)) < 0 || close(fd) < 0)
			fail_setup(rfd, errno, "cannot write the step's resolv.conf");
		mount_in(rfd, resolv_tmp, "etc/resolv.conf", NULL, MS_BIND, NULL);
		mount_in(rfd, NULL, "etc/resolv.conf", NULL, MS_BIND | MS_REMOUNT | MS_RDONLY, NULL);
	}
	if ((s->flags & IB_VM_RUN_APT_LISTS) && is_type("var/lib/apt/lists", S_IFDIR)) {
		if (mount(lists_dev, LISTS, "ext4", MS_RDONLY | MS_NOSUID | MS_NODEV, "noload") < 0)
			fail_setup(rfd, errno, "cannot mount the apt lists (%s)", lists_dev);
		mount_in(rfd, "overlay", "var/lib/apt/lists", "overlay", MS_NOSUID | MS_NODEV,
			 "lowerdir=" LISTS ",upperdir=" SCRATCH "/ap/upper,workdir=" SCRATCH
			 "/ap/work,index=off,redirect_dir=off,metacopy=off");
	}
	g = fork();
	if (g < 0)
		fail_setup(rfd, errno, "cannot start the step");
	if (g == 0)
		step_init(s, out, rfd);
	close(out);
	while (waitpid(g, &ws, 0) < 0)
		if (errno != EINTR)
			_exit(1);
	_exit(WIFEXITED(ws) ? WEXITSTATUS(ws) : 1);
}

static void mkdirs(const char *path)
{
	if (mkdir(path, 0755) < 0 && errno != EEXIST)
		say(errno, "cannot create %s", path);
}

/* Remount the scratch disk; a release of the step's mounts may still be under way. */
static int remount_scratch(unsigned long flags)
{
	for (int t = 0; t < WAIT_TICKS; t++) {
		if (mount(NULL, SCRATCH, NULL, MS_REMOUNT | MS_NOSUID | MS_NODEV | flags, NULL) == 0)
			return 0;
		if (errno != EBUSY)
			break;
		tick();
	}
	return -1;
}

/* The builder wrote the disk afresh: nothing of its last content may stay cached. */
static int drop_cache(const char *dev)
{
	int fd = open(dev, O_RDONLY | O_CLOEXEC), rc;

	if (fd < 0)
		return -1;
	rc = ioctl(fd, BLKFLSBUF, 0);
	close(fd);
	return rc;
}

static void run_step(const struct step *s, const char *lower_dev, const char *lists_dev)
{
	struct timespec now = { (time_t)(s->clock_ns / 1000000000u), (long)(s->clock_ns % 1000000000u) };
	struct report r = { IB_VM_DONE_SETUP, -1, 0, "the step ended without a word" };
	char dir[64], buf[IB_VM_OUTPUT_CHUNK];
	int out[2], rep[2], ws;
	pid_t p;

	if (s->clock_ns)
		clock_settime(CLOCK_REALTIME, &now);
	if (drop_cache(lower_dev) < 0 || ((s->flags & IB_VM_RUN_APT_LISTS) && drop_cache(lists_dev) < 0)) {
		send_status(IB_VM_DONE_SETUP, -1, 0, "cannot drop a disk's cached blocks");
		return;
	}
	if (remount_scratch(0) < 0) {
		send_status(IB_VM_DONE_SETUP, -1, 0, "cannot make the scratch disk writable");
		return;
	}
	snprintf(dir, sizeof(dir), SCRATCH "/s%u", s->index);
	mkdirs(dir);
	snprintf(dir, sizeof(dir), SCRATCH "/s%u/upper", s->index);
	mkdirs(dir);
	snprintf(dir, sizeof(dir), SCRATCH "/s%u/work", s->index);
	mkdirs(dir);
	if (pipe2(out, O_CLOEXEC) < 0 || pipe2(rep, O_CLOEXEC) < 0) {
		send_status(IB_VM_DONE_SETUP, -1, 0, "cannot make pipes");
		return;
	}
	p = fork();
	if (p == 0) {
		close(out[0]);
		close(rep[0]);
		close(ctl);
		step_outer(s, lower_dev, lists_dev, out[1], rep[1]);
	}
	close(out[1]);
	close(rep[1]);
	if (p < 0) {
		close(out[0]);
		close(rep[0]);
		send_status(IB_VM_DONE_SETUP, -1, 0, "cannot fork");
		return;
	}
	for (;;) {
		ssize_t n = read(out[0], buf, sizeof(buf));
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		send_frame(IB_VM_MSG_OUTPUT, buf, (size_t)n, NULL, 0);
	}
	close(out[0]);
	while (waitpid(p, &ws, 0) < 0 && errno == EINTR)
		;
	if (read_all(rep[0], &r, sizeof(r)) < 0)
		r = (struct report){ IB_VM_DONE_SETUP, -1, 0, "the step ended without a word" };
	close(rep[0]);
	r.msg[sizeof(r.msg) - 1] = '\0';
	/* orphans the kernel handed to PID 1 */
	while (waitpid(-1, NULL, WNOHANG) > 0)
		;
	sync();
	if (remount_scratch(MS_RDONLY) < 0) {
		send_status(IB_VM_DONE_SETUP, -1, 0, "cannot make the scratch disk read-only after the step");
		return;
	}
	send_status(r.what, r.cmd, r.wstatus, r.msg);
}

void agent_main(const char *ip, const char *ports)
{
	char port[64], lower[64], scratch[64], lists[64], hostname[65] = "", address[64] = "";
	struct utsname u;
	unsigned char hdr[5];

	/* the kernel's parameters are no step's business */
	clearenv();
	setenv("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", 1);
	load_modules();
	mkdirs("/etc");
	mkdirs("/run");
	mount_one("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
	if (ip)
		configure_ip(ip, hostname, address);
	if (sethostname(IB_VM_HOSTNAME, strlen(IB_VM_HOSTNAME)) < 0)
		say(errno, "cannot set the hostname");
	relay_ports(ports);
	if (!find_dev("/sys/class/virtio-ports", "name", IB_VM_PORT, port)) {
		say(0, "no virtio port named %s; powering off", IB_VM_PORT);
		halt();
	}
	ctl = open(port, O_RDWR | O_CLOEXEC);
	if (ctl < 0) {
		say(errno, "cannot open %s; powering off", port);
		halt();
	}
	if (!find_dev("/sys/block", "serial", IB_VM_SERIAL_LOWER, lower) ||
	    !find_dev("/sys/block", "serial", IB_VM_SERIAL_SCRATCH, scratch) ||
	    !find_dev("/sys/block", "serial", IB_VM_SERIAL_LISTS, lists)) {
		say(0, "the builder's disks are missing; powering off");
		halt();
	}
	mkdirs("/mnt");
	mkdirs(ROOT);
	mkdirs(LOWER);
	mkdirs(LISTS);
	mkdirs(SCRATCH);
	if (mount(scratch, SCRATCH, "ext4", MS_NOSUID | MS_NODEV, NULL) < 0) {
		say(errno, "cannot mount the scratch disk; powering off");
		halt();
	}
	mkdirs(SCRATCH "/ap");
	mkdirs(SCRATCH "/ap/upper");
	mkdirs(SCRATCH "/ap/work");
	sync();
	if (remount_scratch(MS_RDONLY) < 0)
		say(errno, "cannot make the scratch disk read-only");
	uname(&u);
	{
		unsigned char len[4];
		put32(len, (uint32_t)strlen(u.release));
		send_frame(IB_VM_MSG_HELLO, len, 4, u.release, strlen(u.release));
	}
	for (;;) {
		uint32_t len;
		unsigned char *payload;
		struct step s;

		if (read_all(ctl, hdr, 5) < 0) {
			say(0, "the builder hung up; powering off");
			halt();
		}
		len = (uint32_t)hdr[1] | (uint32_t)hdr[2] << 8 | (uint32_t)hdr[3] << 16 | (uint32_t)hdr[4] << 24;
		if (len > IB_VM_FRAME_MAX || !(payload = malloc(len ? len : 1)) || read_all(ctl, payload, len) < 0) {
			say(0, "a bad frame from the builder; powering off");
			halt();
		}
		if (hdr[0] == IB_VM_MSG_QUIT) {
			free(payload);
			halt();
		}
		if (hdr[0] != IB_VM_MSG_RUN) {
			free(payload);
			say(0, "an unknown frame '%c' from the builder; powering off", hdr[0]);
			halt();
		}
		if (!parse_step(&s, payload, len))
			send_status(IB_VM_DONE_SETUP, -1, 0, "the agent could not read the step");
		else
			run_step(&s, lower, lists);
		step_free(&s);
		free(payload);
	}
}

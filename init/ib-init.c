/*
 * ib-init: the init imagebuilder installs as /sbin/init in images that have
 * none of their own.  Linked statically, so it needs nothing from the image.
 *
 * As PID 1 it mounts /proc, /sys, /dev (devtmpfs), /dev/pts, /dev/shm, /run
 * and /tmp; brings up lo; sets the hostname from /etc/hostname; loads
 * /etc/environment; runs the program named by the kernel command line's
 * ib.exec=PATH (a shell on the console without it); reaps orphans; and when
 * that program exits, syncs and powers the machine off.
 */
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#define CMDLINE_MAX 4096

static void say(const char *fmt, const char *arg, int errnum)
{
	char line[512];
	int n = snprintf(line, sizeof(line), fmt, arg ? arg : "");

	if (n < 0)
		return;
	if ((size_t)n >= sizeof(line))
		n = sizeof(line) - 1;
	if (errnum) {
		int m = snprintf(line + n, sizeof(line) - (size_t)n, ": %s", strerror(errnum));
		if (m > 0)
			n += m;
	}
	if ((size_t)n >= sizeof(line) - 1)
		n = sizeof(line) - 2;
	line[n++] = '\n';
	if (write(2, "ib-init: ", 9) < 0 || write(2, line, (size_t)n) < 0)
		return;
}

static void mount_one(const char *src, const char *dir, const char *type, unsigned long flags, const char *data)
{
	mkdir(dir, 0755);
	if (mount(src, dir, type, flags, data) < 0 && errno != EBUSY)
		say("cannot mount %s", dir, errno);
}

static void setup_console(void)
{
	int fd = open("/dev/console", O_RDWR | O_NOCTTY);

	if (fd < 0)
		return;
	dup2(fd, 0);
	dup2(fd, 1);
	dup2(fd, 2);
	if (fd > 2)
		close(fd);
}

static void loopback_up(void)
{
	struct ifreq ifr;
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);

	if (s < 0)
		return;
	memset(&ifr, 0, sizeof(ifr));
	memcpy(ifr.ifr_name, "lo", 3);
	if (ioctl(s, SIOCGIFFLAGS, &ifr) == 0) {
		ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
		if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0)
			say("cannot bring up %s", "lo", errno);
	}
	close(s);
}

/* Read a small file into buf (NUL-terminated); returns its length or -1. */
static ssize_t slurp(const char *path, char *buf, size_t size)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	ssize_t n, len = 0;

	if (fd < 0)
		return -1;
	while ((size_t)len < size - 1 && (n = read(fd, buf + len, size - 1 - (size_t)len)) > 0)
		len += n;
	close(fd);
	buf[len] = '\0';
	return len;
}

static void set_hostname(void)
{
	char name[256];

	if (slurp("/etc/hostname", name, sizeof(name)) <= 0)
		snprintf(name, sizeof(name), "localhost");
	name[strcspn(name, " \t\r\n")] = '\0';
	if (!name[0])
		snprintf(name, sizeof(name), "localhost");
	if (sethostname(name, strlen(name)) < 0)
		say("cannot set the hostname %s", name, errno);
}

/*
 * /etc/environment: KEY=VALUE lines, VALUE optionally in double quotes with
 * backslash escapes (as imagebuilder writes it) or single quotes.
 */
static void load_environment(void)
{
	static char data[256 * 1024];
	char *line, *next;

	if (slurp("/etc/environment", data, sizeof(data)) <= 0)
		return;
	for (line = data; line && *line; line = next) {
		char *eq, *val, *w;

		next = strchr(line, '\n');
		if (next)
			*next++ = '\0';
		while (*line == ' ' || *line == '\t')
			line++;
		if (!strncmp(line, "export ", 7))
			line += 7;
		if (*line == '#' || !(eq = strchr(line, '=')) || eq == line)
			continue;
		*eq = '\0';
		val = w = eq + 1;
		if (*val == '"') {
			for (char *r = val + 1; *r && *r != '"'; r++) {
				if (*r == '\\' && r[1])
					r++;
				*w++ = *r;
			}
			*w = '\0';
		} else if (*val == '\'') {
			char *end = strchr(val + 1, '\'');
			if (end)
				*end = '\0';
			val++;
		}
		setenv(line, val, 1);
	}
}

/* The value of ib.exec= on the kernel command line, or NULL. */
static char *cmdline_exec(void)
{
	static char cmdline[CMDLINE_MAX];
	char *p;

	if (slurp("/proc/cmdline", cmdline, sizeof(cmdline)) <= 0)
		return NULL;
	/* words are separated by white space */
	for (p = cmdline; *p;) {
		size_t n;

		while (*p == ' ' || *p == '\t' || *p == '\n')
			p++;
		n = strcspn(p, " \t\n");
		if (n > 8 && !strncmp(p, "ib.exec=", 8)) {
			p[n] = '\0';
			return p + 8;
		}
		p += n;
	}
	return NULL;
}

static void __attribute__((noreturn)) power_off(void)
{
	sync();
	reboot(RB_POWER_OFF);
	for (;;)
		pause();
}

int main(int argc, char **argv)
{
	char *exec_path;
	pid_t main_pid;
	int status = 0;

	(void)argc;
	if (getpid() != 1) {
		fprintf(stderr, "%s: the imagebuilder init; run it as PID 1 (the kernel's init=)\n", argv[0]);
		return 2;
	}
	mount_one("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	mount_one("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	mount_one("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
	setup_console();
	mount_one("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666");
	mount_one("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	mount_one("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
	mount_one("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	loopback_up();
	set_hostname();

	clearenv();
	setenv("PATH", DEFAULT_PATH, 1);
	setenv("HOME", "/root", 1);
	setenv("TERM", "linux", 1);
	load_environment();

	exec_path = cmdline_exec();
	main_pid = fork();
	if (main_pid < 0) {
		say("cannot fork%s", NULL, errno);
		power_off();
	}
	if (main_pid == 0) {
		char *sh_argv[] = { (char *)"/bin/sh", NULL };
		char *exec_argv[] = { exec_path, NULL };

		setsid();
		ioctl(0, TIOCSCTTY, 0);
		signal(SIGTERM, SIG_DFL);
		if (exec_path) {
			execv(exec_path, exec_argv);
			say("cannot run %s", exec_path, errno);
		} else {
			execv(sh_argv[0], sh_argv);
			say("cannot run %s", sh_argv[0], errno);
		}
		_exit(127);
	}
	/* PID 1 ignores what it does not handle; reap every orphan. */
	signal(SIGTERM, SIG_IGN);
	signal(SIGINT, SIG_IGN);
	for (;;) {
		pid_t pid = wait(&status);

		if (pid == main_pid)
			break;
		if (pid < 0 && errno == ECHILD)
			break;
	}
	if (WIFEXITED(status))
		fprintf(stderr, "ib-init: %s exited with status %d; powering off\n", exec_path ? exec_path : "/bin/sh",
			WEXITSTATUS(status));
	else if (WIFSIGNALED(status))
		fprintf(stderr, "ib-init: %s killed by signal %d; powering off\n", exec_path ? exec_path : "/bin/sh",
			WTERMSIG(status));
	power_off();
}

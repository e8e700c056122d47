/*
 * ib-init: the init imagebuilder installs as /sbin/init in images that have
 * none of their own.  Linked statically, so it needs nothing from the image.
 *
 * As PID 1 it mounts /proc, /sys, /dev (devtmpfs), /dev/pts, /dev/shm, /run
 * and /tmp; brings up lo; sets the hostname from /etc/hostname; loads
 * /etc/environment; runs the program named by the kernel command line's
 * ib.exec=PATH (a shell on the console without it); reaps orphans; and when
 * that program exits, stops what is left, syncs, remounts / read-only and
 * powers the machine off.
 */
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#define CMDLINE_MAX 4096
/* builder/limits.h allows 256 variables of up to 32 KiB each */
#define ENVIRONMENT_MAX (16 << 20)
/* how long what is left running gets to exit on SIGTERM, in 50 ms ticks */
#define STOP_TICKS 40

static void __attribute__((format(printf, 2, 3))) say(int errnum, const char *fmt, ...)
{
	char line[512];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	if ((size_t)n >= sizeof(line))
		n = sizeof(line) - 1;
	if (errnum)
		n += snprintf(line + n, sizeof(line) - (size_t)n, ": %s", strerror(errnum));
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
		say(errno, "cannot mount %s", dir);
}

static void setup_console(void)
{
	int fd = open("/dev/console", O_RDWR | O_NOCTTY | O_CLOEXEC);

	if (fd < 0)
		return;
	/* dup2 leaves 0, 1 and 2 without close-on-exec */
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
			say(errno, "cannot bring up lo");
	}
	close(s);
}

/*
 * Read up to max bytes of a file into a NUL-terminated buffer the caller
 * frees; returns its length, or -1 (nothing allocated) when it cannot be
 * read.  /proc files report size 0, so the size is only a first guess.
 */
static ssize_t read_file(char **out, const char *path, size_t max)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	struct stat st;
	size_t size, len = 0;
	ssize_t n;
	char *buf;

	if (fd < 0)
		return -1;
	size = fstat(fd, &st) == 0 && st.st_size > 0 && (size_t)st.st_size < max ? (size_t)st.st_size : max;
	buf = malloc(size + 1);
	if (!buf) {
		close(fd);
		return -1;
	}
	while (len < size && (n = read(fd, buf + len, size - len)) > 0)
		len += (size_t)n;
	close(fd);
	buf[len] = '\0';
	*out = buf;
	return (ssize_t)len;
}

static void set_hostname(void)
{
	char *data = NULL;
	const char *name = "localhost";
	size_t len;

	if (read_file(&data, "/etc/hostname", 256) > 0) {
		data[strcspn(data, " \t\r\n")] = '\0';
		if (data[0])
			name = data;
	}
	len = strlen(name);
	if (sethostname(name, len) < 0)
		say(errno, "cannot set the hostname %s", name);
	free(data);
}

/*
 * /etc/environment: NAME=VALUE lines.  imagebuilder writes VALUE in double
 * quotes with a backslash before " \ $ and `; single-quoted and bare values,
 * an "export " prefix and comment lines, as hand-written files have them,
 * are read too.  A quoted value ends at its closing quote only.
 */
static void load_environment(void)
{
	char *data = NULL, *p;

	if (read_file(&data, "/etc/environment", ENVIRONMENT_MAX) <= 0) {
		free(data);
		return;
	}
	for (p = data; *p;) {
		char *name, *val, *w, *next;

		p += strspn(p, " \t\r\n");
		if (!strncmp(p, "export ", 7))
			p += 7;
		name = p;
		p += strcspn(p, "=\n");
		if (*name == '#' || *p != '=' || p == name) {
			p += strcspn(p, "\n");
			continue;
		}
		*p++ = '\0';
		val = w = p;
		if (*p == '"' || *p == '\'') {
			char quote = *p++;

			for (; *p && *p != quote; p++) {
				if (quote == '"' && *p == '\\' && p[1])
					p++;
				*w++ = *p;
			}
			if (*p)
				p++;
		} else {
			while (*p && *p != '\n' && *p != '\r')
				*w++ = *p++;
		}
		/* anything after the value on its line is ignored */
		next = p + strcspn(p, "\n");
		*w = '\0';
		setenv(name, val, 1);
		p = next;
	}
	free(data);
}

/* The value of ib.exec= on the kernel command line (the caller frees it), or NULL. */
static char *cmdline_exec(void)
{
	char *cmdline = NULL, *p, *found = NULL;

	if (read_file(&cmdline, "/proc/cmdline", CMDLINE_MAX) <= 0) {
		free(cmdline);
		return NULL;
	}
	/* words are separated by white space; the last ib.exec= wins, as the kernel's own parameters do */
	for (p = cmdline; *p;) {
		size_t n;

		p += strspn(p, " \t\n");
		n = strcspn(p, " \t\n");
		if (n > 8 && !strncmp(p, "ib.exec=", 8)) {
			free(found);
			found = strndup(p + 8, n - 8);
		}
		p += n;
	}
	free(cmdline);
	return found;
}

/* Reap every child that has exited; 1 when none is left. */
static int reap(void)
{
	pid_t pid;

	while ((pid = waitpid(-1, NULL, WNOHANG)) > 0)
		;
	return pid < 0 && errno == ECHILD;
}

/*
 * Stop what the program left running (daemons it started, orphans): SIGTERM,
 * a grace period, then SIGKILL.  Bounded, so a process stuck in the kernel
 * cannot keep the machine up.
 */
static void stop_all(void)
{
	const struct timespec tick = { 0, 50 * 1000 * 1000 };
	int sig[] = { SIGTERM, SIGKILL };

	for (size_t i = 0; i < sizeof(sig) / sizeof(sig[0]); i++) {
		if (kill(-1, sig[i]) < 0)
			return; /* ESRCH: nothing left */
		for (int t = 0; t < STOP_TICKS && !reap(); t++)
			nanosleep(&tick, NULL);
	}
}

static void __attribute__((noreturn)) power_off(void)
{
	stop_all();
	sync();
	/* a clean file system: the next mount needs no journal recovery */
	if (mount(NULL, "/", NULL, MS_REMOUNT | MS_RDONLY, NULL) < 0)
		say(errno, "cannot remount / read-only");
	reboot(RB_POWER_OFF);
	say(errno, "cannot power off");
	for (;;)
		pause();
}

int main(int argc, char **argv)
{
	char *exec_path, *const *child_argv;
	char *sh_argv[] = { (char *)"/bin/sh", NULL };
	char *exec_argv[] = { NULL, NULL };
	pid_t main_pid, pid;
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

	/* the kernel's leftovers (unknown name=value parameters) are dropped */
	clearenv();
	setenv("PATH", DEFAULT_PATH, 1);
	setenv("HOME", "/root", 1);
	setenv("TERM", "linux", 1);
	load_environment();

	exec_path = cmdline_exec();
	exec_argv[0] = exec_path;
	child_argv = exec_path ? exec_argv : sh_argv;
	main_pid = fork();
	if (main_pid < 0) {
		say(errno, "cannot fork");
		power_off();
	}
	if (main_pid == 0) {
		/* its own session, the console its controlling terminal: ^C reaches it */
		setsid();
		ioctl(0, TIOCSCTTY, 0);
		execv(child_argv[0], child_argv);
		say(errno, "cannot run %s", child_argv[0]);
		_exit(127);
	}
	/*
	 * Signals PID 1 has no handler for never reach it (the kernel drops
	 * them), so there is nothing to ignore; wait for the program and reap
	 * every orphan the kernel hands over meanwhile.
	 */
	while ((pid = wait(&status)) != main_pid) {
		if (pid < 0 && errno != EINTR) {
			say(errno, "cannot wait for %s; powering off", child_argv[0]);
			power_off();
		}
	}
	if (WIFEXITED(status))
		say(0, "%s exited with status %d; powering off", child_argv[0], WEXITSTATUS(status));
	else if (WIFSIGNALED(status))
		say(0, "%s killed by signal %d; powering off", child_argv[0], WTERMSIG(status));
	free(exec_path);
	power_off();
}

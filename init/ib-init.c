/*
 * ib-init: the init imagebuilder installs as /sbin/init in images that have
 * none of their own.  Linked statically, so it needs nothing from the image.
 *
 * As PID 1 it mounts /proc, /sys, /dev (devtmpfs), /dev/pts, /dev/shm, /run
 * and /tmp; brings up lo; gives the machine its identity (a random
 * /etc/machine-id when the image has none, SSH host keys when ssh-keygen is
 * there and keys are missing); configures the network from the kernel
 * command line's ip= (nfsroot syntax, over rtnetlink: address, link, default
 * route, /etc/resolv.conf, an /etc/hosts line); sets the hostname (ib.hostname=,
 * else ip='s, else /etc/hostname); loads /etc/environment; runs the program
 * named by ib.exec=PATH (a shell on the console without it); reaps orphans;
 * and when that program exits, stops what is left, syncs, remounts /
 * read-only and powers the machine off.
 */
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <net/if.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/random.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "init/ib-init.h"
#include "lib/rtnl.h"

#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#define CMDLINE_MAX 4096
/* builder/limits.h allows 256 variables of up to 32 KiB each */
#define ENVIRONMENT_MAX (16 << 20)
/* how long what is left running gets to exit on SIGTERM, in 50 ms ticks */
#define STOP_TICKS 40

void say(int errnum, const char *fmt, ...)
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

void mount_one(const char *src, const char *dir, const char *type, unsigned long flags, const char *data)
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

void loopback_up(void)
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
ssize_t read_file(char **out, const char *path, size_t max)
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

/* What the kernel command line asks of the init. */
struct cmdline {
	char *exec;     /* ib.exec= */
	char *hostname; /* ib.hostname= */
	char *ip;       /* ip= */
	char *agent;    /* ib.agent=: "1" makes this the VM runner's guest agent */
	char *ports;    /* ib.ports=: the agent's relays to the package indexes */
};

/* Words are separated by white space; the last of a name wins, as the kernel's own parameters do. */
static void read_cmdline(struct cmdline *c)
{
	static const struct {
		const char *prefix;
		size_t off;
	} keys[] = {
		{ "ib.exec=", offsetof(struct cmdline, exec) },
		{ "ib.hostname=", offsetof(struct cmdline, hostname) },
		{ "ip=", offsetof(struct cmdline, ip) },
		{ "ib.agent=", offsetof(struct cmdline, agent) },
		{ "ib.ports=", offsetof(struct cmdline, ports) },
	};
	char *cmdline = NULL, *p;

	memset(c, 0, sizeof(*c));
	if (read_file(&cmdline, "/proc/cmdline", CMDLINE_MAX) <= 0) {
		free(cmdline);
		return;
	}
	for (p = cmdline; *p;) {
		size_t n;

		p += strspn(p, " \t\n");
		n = strcspn(p, " \t\n");
		for (size_t k = 0; k < sizeof(keys) / sizeof(keys[0]); k++) {
			size_t len = strlen(keys[k].prefix);
			char **slot = (char **)((char *)c + keys[k].off);

			if (n > len && !strncmp(p, keys[k].prefix, len)) {
				free(*slot);
				*slot = strndup(p + len, n - len);
			}
		}
		p += n;
	}
	free(cmdline);
}

/* Write a whole file: beside it, then renamed over it. */
static int write_file(const char *path, const char *data, size_t len, mode_t mode)
{
	char tmp[256];
	int fd;

	snprintf(tmp, sizeof(tmp), "%s.ib-init", path);
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
	if (fd < 0)
		return -1;
	if (write(fd, data, len) != (ssize_t)len || fchmod(fd, mode) < 0 || fsync(fd) < 0 || close(fd) < 0) {
		unlink(tmp);
		return -1;
	}
	if (rename(tmp, path) < 0) {
		unlink(tmp);
		return -1;
	}
	return 0;
}

/*
 * A machine of its own (machine-id(5)): an image ships an empty
 * /etc/machine-id, and its first boot writes a random one, lowercase hex,
 * formatted as a version 4 UUID without dashes.
 */
static void machine_id(void)
{
	char *data = NULL, hex[34];
	unsigned char r[16];
	size_t got = 0;

	if (read_file(&data, "/etc/machine-id", 64) >= 32 && strspn(data, "0123456789abcdef") >= 32) {
		free(data);
		return;
	}
	free(data);
	while (got < sizeof(r)) {
		ssize_t n = getrandom(r + got, sizeof(r) - got, 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			say(errno, "cannot make a machine-id");
			return;
		}
		got += (size_t)n;
	}
	r[6] = (unsigned char)((r[6] & 0x0f) | 0x40);
	r[8] = (unsigned char)((r[8] & 0x3f) | 0x80);
	for (size_t i = 0; i < sizeof(r); i++)
		snprintf(hex + 2 * i, 3, "%02x", r[i]);
	hex[32] = '\n';
	hex[33] = '\0';
	if (write_file("/etc/machine-id", hex, 33, 0444) < 0)
		say(errno, "cannot write /etc/machine-id");
}

/* Run a program to its end (its output on the console); its exit status, or -1. */
static int run(char *const argv[])
{
	pid_t pid = fork();
	int status;

	if (pid < 0)
		return -1;
	if (pid == 0) {
		execv(argv[0], argv);
		_exit(127);
	}
	while (waitpid(pid, &status, 0) < 0)
		if (errno != EINTR)
			return -1;
	return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* Images ship no SSH host keys: each machine makes the ones it lacks. */
static void ssh_host_keys(void)
{
	static const char *const keys[] = { "/etc/ssh/ssh_host_rsa_key", "/etc/ssh/ssh_host_ecdsa_key",
					    "/etc/ssh/ssh_host_ed25519_key" };
	char *argv[] = { (char *)"/usr/bin/ssh-keygen", (char *)"-A", NULL };
	bool missing = false;

	if (access(argv[0], X_OK) < 0 || access("/etc/ssh", F_OK) < 0)
		return;
	for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++)
		missing |= access(keys[i], F_OK) < 0;
	if (missing && run(argv) != 0)
		say(0, "ssh-keygen -A failed: no SSH host keys made");
}

/* ---- ip= ---- */

struct nlreq {
	struct nlmsghdr nh;
	union {
		struct ifaddrmsg ifa;
		struct ifinfomsg ifi;
		struct rtmsg rt;
	} u;
	char attrs[128];
};

/* The first network interface but lo, by name; "" when none. */
static void first_interface(char out[IF_NAMESIZE])
{
	DIR *d = opendir("/sys/class/net");
	struct dirent *de;

	out[0] = '\0';
	while (d && (de = readdir(d))) {
		size_t len = strlen(de->d_name);

		if (de->d_name[0] != '.' && strcmp(de->d_name, "lo") && len < IF_NAMESIZE &&
		    (!out[0] || strcmp(de->d_name, out) < 0))
			memcpy(out, de->d_name, len + 1);
	}
	if (d)
		closedir(d);
}

static int prefix_of(const char *netmask)
{
	struct in_addr m;
	uint32_t v;
	int n = 0;

	if (!*netmask || inet_pton(AF_INET, netmask, &m) != 1)
		return 24;
	for (v = ntohl(m.s_addr); v & 0x80000000u; v <<= 1)
		n++;
	return n;
}

/* The n-th ':'-separated field of s (fields may be empty), copied into out. */
static void field(char *out, size_t size, const char *s, int n)
{
	size_t len;

	for (; n > 0 && s; n--)
		s = strchr(s, ':') ? strchr(s, ':') + 1 : NULL;
	len = s ? strcspn(s, ":") : 0;
	if (len >= size)
		len = size - 1;
	if (len)
		memcpy(out, s, len);
	out[len] = '\0';
}

/*
 * ip=<client-ip>:<server-ip>:<gw-ip>:<netmask>:<hostname>:<device>:<autoconf>:<dns0>:<dns1>
 * (the kernel's nfsroot syntax, which Debian's kernels without IP_PNP
 * ignore): a static address, the link up, a default route through the
 * gateway, /etc/resolv.conf from the DNS fields.  hostname receives the
 * hostname field, address the address once it is configured.  DHCP is not
 * done here.
 */
void configure_ip(const char *ip, char hostname[65], char address[64])
{
	char client[64], gw[64], mask[64], dev[IF_NAMESIZE + 1], autoconf[16], dns[2][64];
	struct in_addr addr, gateway;
	struct nlreq r;
	unsigned idx;
	int fd, e;

	field(client, sizeof(client), ip, 0);
	field(gw, sizeof(gw), ip, 2);
	field(mask, sizeof(mask), ip, 3);
	field(hostname, 65, ip, 4);
	field(dev, sizeof(dev), ip, 5);
	field(autoconf, sizeof(autoconf), ip, 6);
	field(dns[0], sizeof(dns[0]), ip, 7);
	field(dns[1], sizeof(dns[1]), ip, 8);
	if (!strchr(ip, ':') || (*autoconf && strcmp(autoconf, "off") && strcmp(autoconf, "none") &&
				 strcmp(autoconf, "static"))) {
		say(0, "ip=%s: only static addresses (ip=ADDR::GW:MASK:HOST:DEV:off:DNS0:DNS1) are configured here", ip);
		return;
	}
	if (inet_pton(AF_INET, client, &addr) != 1) {
		say(0, "ip=%s: '%s' is not an IPv4 address", ip, client);
		return;
	}
	if (!*dev)
		first_interface(dev);
	if (!*dev || !(idx = if_nametoindex(dev))) {
		say(0, "ip=%s: no network interface '%s'", ip, dev);
		return;
	}
	fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
	if (fd < 0) {
		say(errno, "ip=: no rtnetlink");
		return;
	}
	memset(&r, 0, sizeof(r));
	r.nh.nlmsg_len = NLMSG_LENGTH(sizeof(struct ifaddrmsg));
	r.nh.nlmsg_type = RTM_NEWADDR;
	r.nh.nlmsg_flags = NLM_F_CREATE | NLM_F_REPLACE;
	r.u.ifa.ifa_family = AF_INET;
	r.u.ifa.ifa_prefixlen = (unsigned char)prefix_of(mask);
	r.u.ifa.ifa_index = idx;
	ib_rtnl_add_attr(&r.nh, IFA_LOCAL, &addr, sizeof(addr));
	ib_rtnl_add_attr(&r.nh, IFA_ADDRESS, &addr, sizeof(addr));
	if ((e = ib_rtnl_talk(fd, &r.nh)))
		say(e, "ip=: cannot give %s the address %s", dev, client);

	memset(&r, 0, sizeof(r));
	r.nh.nlmsg_len = NLMSG_LENGTH(sizeof(struct ifinfomsg));
	r.nh.nlmsg_type = RTM_NEWLINK;
	r.u.ifi.ifi_family = AF_UNSPEC;
	r.u.ifi.ifi_index = (int)idx;
	r.u.ifi.ifi_flags = IFF_UP;
	r.u.ifi.ifi_change = IFF_UP;
	if ((e = ib_rtnl_talk(fd, &r.nh)))
		say(e, "ip=: cannot bring %s up", dev);

	if (inet_pton(AF_INET, gw, &gateway) == 1) {
		memset(&r, 0, sizeof(r));
		r.nh.nlmsg_len = NLMSG_LENGTH(sizeof(struct rtmsg));
		r.nh.nlmsg_type = RTM_NEWROUTE;
		r.nh.nlmsg_flags = NLM_F_CREATE | NLM_F_REPLACE;
		r.u.rt.rtm_family = AF_INET;
		r.u.rt.rtm_table = RT_TABLE_MAIN;
		r.u.rt.rtm_protocol = RTPROT_BOOT;
		r.u.rt.rtm_scope = RT_SCOPE_UNIVERSE;
		r.u.rt.rtm_type = RTN_UNICAST;
		ib_rtnl_add_attr(&r.nh, RTA_GATEWAY, &gateway, sizeof(gateway));
		ib_rtnl_add_attr(&r.nh, RTA_OIF, &idx, sizeof(idx));
		if ((e = ib_rtnl_talk(fd, &r.nh)))
			say(e, "ip=: cannot route through %s", gw);
	}
	close(fd);

	if (*dns[0] || *dns[1]) {
		char conf[256];
		int n = snprintf(conf, sizeof(conf), "# written by ib-init from ip=\n%s%s%s%s%s%s", *dns[0] ? "nameserver " : "",
				 dns[0], *dns[0] ? "\n" : "", *dns[1] ? "nameserver " : "", dns[1], *dns[1] ? "\n" : "");
		/* a link (to a resolver's file) is replaced by the file itself */
		unlink("/etc/resolv.conf");
		if (write_file("/etc/resolv.conf", conf, (size_t)n, 0644) < 0)
			say(errno, "cannot write /etc/resolv.conf");
	}
	snprintf(address, 64, "%s", client);
}

/* /etc/hosts names the host: "ADDR NAME" (127.0.1.1 without an address, as Debian does). */
static void hosts_line(const char *address, const char *name)
{
	char *hosts = NULL, line[160];
	int n = snprintf(line, sizeof(line), "%s\t%s\n", *address ? address : "127.0.1.1", name);
	ssize_t len = read_file(&hosts, "/etc/hosts", 1 << 20);

	if (len < 0 || !strstr(hosts, line)) {
		int fd = open("/etc/hosts", O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
		if (fd < 0 || write(fd, line, (size_t)n) != n)
			say(errno, "cannot add %s to /etc/hosts", name);
		if (fd >= 0)
			close(fd);
	}
	free(hosts);
}

/* ib.hostname=, else ip='s, else /etc/hostname, else localhost; /etc/hosts names it. */
static void set_hostname(const char *from_cmdline, const char *from_ip, const char *address)
{
	char *data = NULL;
	const char *name = "localhost";

	if (from_cmdline && *from_cmdline)
		name = from_cmdline;
	else if (from_ip && *from_ip)
		name = from_ip;
	else if (read_file(&data, "/etc/hostname", 256) > 0) {
		data[strcspn(data, " \t\r\n")] = '\0';
		if (data[0])
			name = data;
	}
	if (sethostname(name, strlen(name)) < 0)
		say(errno, "cannot set the hostname %s", name);
	if (strcmp(name, "localhost"))
		hosts_line(address, name);
	free(data);
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
	struct cmdline cmd;
	char *exec_path, *const *child_argv, ip_hostname[65] = "", ip_address[64] = "";
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
	read_cmdline(&cmd);
	if (cmd.agent && !strcmp(cmd.agent, "1"))
		agent_main(cmd.ip, cmd.ports);
	machine_id();
	ssh_host_keys();
	if (cmd.ip)
		configure_ip(cmd.ip, ip_hostname, ip_address);
	set_hostname(cmd.hostname, ip_hostname, ip_address);

	/* the kernel's leftovers (unknown name=value parameters) are dropped */
	clearenv();
	setenv("PATH", DEFAULT_PATH, 1);
	setenv("HOME", "/root", 1);
	setenv("TERM", "linux", 1);
	load_environment();

	exec_path = cmd.exec;
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

#include "builder/netns.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/fib_rules.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <net/if.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "lib/rtnl.h"

int ib_netns_lo_up(void)
{
	struct ifreq ifr;
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0), err = 0;

	if (fd < 0)
		return ib_error_set_errno(errno, "cannot open a socket in the step's network namespace");
	memset(&ifr, 0, sizeof(ifr));
	snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "lo");
	if (ioctl(fd, SIOCGIFFLAGS, &ifr) < 0)
		err = ib_error_set_errno(errno, "cannot read the flags of lo");
	else {
		ifr.ifr_flags = (short)(ifr.ifr_flags | IFF_UP);
		if (ioctl(fd, SIOCSIFFLAGS, &ifr) < 0)
			err = ib_error_set_errno(errno, "cannot bring lo up");
	}
	close(fd);
	return err;
}

/* ---- routes over rtnetlink ---- */

struct rulereq {
	struct nlmsghdr nh;
	struct fib_rule_hdr frh;
	char attrs[64];
};

/* A policy rule: to dst/prefix, action (FR_ACT_TO_TBL main, FR_ACT_UNREACHABLE), at priority. */
static int rule(int fd, const struct in_addr *dst, unsigned char prefix, unsigned char action, uint32_t priority)
{
	struct rulereq r;

	memset(&r, 0, sizeof(r));
	r.nh.nlmsg_len = NLMSG_LENGTH(sizeof(struct fib_rule_hdr));
	r.nh.nlmsg_type = RTM_NEWRULE;
	r.nh.nlmsg_flags = NLM_F_CREATE | NLM_F_EXCL;
	r.frh.family = AF_INET;
	r.frh.dst_len = prefix;
	r.frh.action = action;
	r.frh.table = action == FR_ACT_TO_TBL ? RT_TABLE_MAIN : RT_TABLE_UNSPEC;
	ib_rtnl_add_attr(&r.nh, FRA_DST, dst, sizeof(*dst));
	ib_rtnl_add_attr(&r.nh, FRA_PRIORITY, &priority, sizeof(priority));
	return ib_rtnl_talk(fd, &r.nh);
}

int ib_netns_close_link_local(const char *dns)
{
	struct in_addr ll, dnsaddr;
	int fd, e, err = 0;

	if (inet_pton(AF_INET, "169.254.0.0", &ll) != 1 || inet_pton(AF_INET, dns, &dnsaddr) != 1)
		return ib_error_set("bad address '%s'", dns);
	fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
	if (fd < 0)
		return ib_error_set_errno(errno, "no rtnetlink in the step's network namespace");
	/*
	 * Rules, looked at before any routing table: whatever routes pasta
	 * sets up later (a host's more specific 169.254.169.254/32 among
	 * them), link-local stays unreachable but for the resolver.
	 */
	if ((e = rule(fd, &dnsaddr, 32, FR_ACT_TO_TBL, 100)))
		err = ib_error_set_errno(e, "cannot route %s", dns);
	else if ((e = rule(fd, &ll, 16, FR_ACT_UNREACHABLE, 101)))
		err = ib_error_set_errno(e, "cannot make 169.254.0.0/16 unreachable");
	close(fd);
	return err;
}

/* ---- pasta ---- */

#define NSFD 3 /* where pasta finds the namespace */

void ib_pasta_init(ib_pasta *p)
{
	*p = (ib_pasta){ .pid = -1 };
}

static char *log_tail(const char *path)
{
	char *text = NULL;
	size_t len = 0;

	if (ib_read_file(&text, &len, path, 1 << 20) < 0) {
		ib_error_clear();
		return ib_xstrdup("");
	}
	while (len && (text[len - 1] == '\n' || text[len - 1] == ' '))
		text[--len] = '\0';
	if (len > 400)
		memmove(text, text + len - 400, 401);
	for (char *c = text; *c; c++)
		if (*c == '\n')
			*c = ' ';
	return text;
}

int ib_pasta_start(ib_pasta *p, const char *pasta, int netns_fd, const char *scratch, const uint16_t *ports,
		   size_t nports, const char *dns)
{
	ib_strv argv = IB_STRV_INIT;
	ib_buf spec = IB_BUF_INIT;
	char *pidtext = NULL;
	size_t len = 0;
	int ws = 0, err = 0, logfd, nsfd = -1;
	pid_t pid;

	p->pidfile = ib_xasprintf("%s/pasta.pid", scratch);
	p->log = ib_xasprintf("%s/pasta.log", scratch);
	for (size_t i = 0; i < nports; i++)
		ib_buf_printf(&spec, "%s%u", i ? "," : "", (unsigned)ports[i]);
	if (!nports)
		ib_buf_puts(&spec, "none");
	ib_strv_push(&argv, pasta ? pasta : "pasta");
	ib_strv_push(&argv, "--config-net");
	ib_strv_push(&argv, "--quiet");
	ib_strv_push(&argv, "--ipv4-only");
	/* the gateway is not the host's loopback; no port into the namespace; loopback ports out: only these */
	ib_strv_push(&argv, "--no-map-gw");
	ib_strv_pushf(&argv, "--tcp-ports=none");
	ib_strv_pushf(&argv, "--udp-ports=none");
	ib_strv_pushf(&argv, "--tcp-ns=%s", spec.ptr);
	ib_strv_pushf(&argv, "--udp-ns=none");
	ib_strv_pushf(&argv, "--dns-forward=%s", dns);
	ib_strv_push(&argv, "--no-dhcp");
	ib_strv_push(&argv, "--no-ndp");
	ib_strv_push(&argv, "--no-dhcpv6");
	ib_strv_push(&argv, "--no-ra");
	/* as root, pasta would drop to nobody, who cannot enter the namespace */
	ib_strv_push(&argv, "--runas=0:0");
	ib_strv_pushf(&argv, "--pid=%s", p->pidfile);
	/*
	 * The namespace as an fd it inherits: pasta drops capabilities before
	 * it opens the path, and may then not look into the target's /proc.
	 */
	nsfd = fcntl(netns_fd, F_DUPFD_CLOEXEC, 0);
	if (nsfd < 0) {
		err = ib_error_set_errno(errno, "cannot open the step's network namespace");
		goto out;
	}
	ib_strv_pushf(&argv, "--netns=/proc/self/fd/%d", NSFD);
	ib_strv_push(&argv, "--no-netns-quit");
	ib_buf_free(&spec);

	logfd = open(p->log, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	if (logfd < 0) {
		err = ib_error_set_errno(errno, "cannot create '%s'", p->log);
		goto out;
	}
	pid = fork();
	if (pid < 0) {
		err = ib_error_set_errno(errno, "cannot start pasta");
		close(logfd);
		goto out;
	}
	if (pid == 0) {
		int null = open("/dev/null", O_RDONLY | O_CLOEXEC);
		if (null < 0 || dup2(null, 0) < 0 || dup2(logfd, 1) < 0 || dup2(logfd, 2) < 0 ||
		    dup2(nsfd, NSFD) < 0)
			_exit(127);
		ib_close_fds_except(NSFD, -1);
		setsid();
		execvp(argv.v[0], argv.v);
		dprintf(2, "cannot run %s: %s\n", argv.v[0], strerror(errno));
		_exit(127);
	}
	close(logfd);
	/* it forks into the background once the namespace is configured */
	while (waitpid(pid, &ws, 0) < 0 && errno == EINTR)
		;
	if (!WIFEXITED(ws) || WEXITSTATUS(ws) != 0) {
		char *tail = log_tail(p->log);
		err = ib_error_set("the step's network: pasta (Debian package passt) failed (%s %d): %s",
				   WIFEXITED(ws) ? "exit" : "signal", WIFEXITED(ws) ? WEXITSTATUS(ws) : WTERMSIG(ws),
				   *tail ? tail : "no message");
		free(tail);
		goto out;
	}
	if (ib_read_file(&pidtext, &len, p->pidfile, 64) < 0 || (p->pid = (pid_t)strtol(pidtext, NULL, 10)) <= 0) {
		err = ib_error_set("the step's network: pasta wrote no pid to '%s'", p->pidfile);
		p->pid = -1;
	}
out:
	if (nsfd >= 0)
		close(nsfd);
	ib_buf_free(&spec);
	free(pidtext);
	ib_strv_free(&argv);
	return err;
}

void ib_pasta_stop(ib_pasta *p)
{
	if (p->pid > 0)
		kill(p->pid, SIGKILL);
	if (p->pidfile)
		unlink(p->pidfile);
	if (p->log)
		unlink(p->log);
	free(p->pidfile);
	free(p->log);
	ib_pasta_init(p);
}

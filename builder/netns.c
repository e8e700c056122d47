#include "builder/netns.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
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

struct rtreq {
	struct nlmsghdr nh;
	struct rtmsg rt;
	char attrs[64];
};

static void add_attr(struct rtreq *r, unsigned short type, const void *data, size_t len)
{
	struct rtattr *a = (struct rtattr *)((char *)r + NLMSG_ALIGN(r->nh.nlmsg_len));

	a->rta_type = type;
	a->rta_len = (unsigned short)RTA_LENGTH(len);
	memcpy(RTA_DATA(a), data, len);
	r->nh.nlmsg_len = NLMSG_ALIGN(r->nh.nlmsg_len) + RTA_ALIGN(a->rta_len);
}

/* Send one request, read its acknowledgement: 0, or an errno. */
static int talk(int fd, struct rtreq *r)
{
	struct sockaddr_nl kernel = { .nl_family = AF_NETLINK };
	char buf[1024];
	ssize_t n;

	r->nh.nlmsg_flags |= NLM_F_REQUEST | NLM_F_ACK;
	if (sendto(fd, r, r->nh.nlmsg_len, 0, (struct sockaddr *)&kernel, sizeof(kernel)) < 0)
		return errno;
	while ((n = recv(fd, buf, sizeof(buf), 0)) < 0)
		if (errno != EINTR)
			return errno;
	for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, (unsigned)n); h = NLMSG_NEXT(h, n))
		if (h->nlmsg_type == NLMSG_ERROR)
			return -((struct nlmsgerr *)NLMSG_DATA(h))->error;
	return 0;
}

static void route_req(struct rtreq *r, unsigned char type, const struct in_addr *dst, unsigned char prefix)
{
	memset(r, 0, sizeof(*r));
	r->nh.nlmsg_len = NLMSG_LENGTH(sizeof(struct rtmsg));
	r->nh.nlmsg_type = RTM_NEWROUTE;
	r->nh.nlmsg_flags = NLM_F_CREATE | NLM_F_REPLACE;
	r->rt.rtm_family = AF_INET;
	r->rt.rtm_table = RT_TABLE_MAIN;
	r->rt.rtm_protocol = RTPROT_STATIC;
	r->rt.rtm_scope = type == RTN_UNICAST ? RT_SCOPE_UNIVERSE : RT_SCOPE_NOWHERE;
	r->rt.rtm_type = type;
	r->rt.rtm_dst_len = prefix;
	add_attr(r, RTA_DST, dst, sizeof(*dst));
}

/* The default route's gateway and interface, from /proc/net/route (this namespace's). */
static int default_route(struct in_addr *gw, unsigned *ifindex)
{
	FILE *f = fopen("/proc/net/route", "re");
	char line[256], name[IF_NAMESIZE + 1];
	unsigned dst, gateway, flags;
	int found = 0;

	if (!f)
		return ib_error_set_errno(errno, "cannot read the step's routes");
	while (!found && fgets(line, sizeof(line), f))
		if (sscanf(line, "%16s %x %x %x", name, &dst, &gateway, &flags) == 4 && dst == 0 && gateway)
			found = 1;
	fclose(f);
	if (!found)
		return ib_error_set("the step's network has no default route (pasta did not configure it)");
	gw->s_addr = gateway;
	if (!(*ifindex = if_nametoindex(name)))
		return ib_error_set_errno(errno, "no interface '%s' in the step's network", name);
	return 0;
}

int ib_netns_close_link_local(const char *dns)
{
	struct in_addr ll, dnsaddr, gw = { 0 };
	struct rtreq r;
	unsigned ifindex = 0;
	int fd, e, err;

	if (inet_pton(AF_INET, "169.254.0.0", &ll) != 1 || inet_pton(AF_INET, dns, &dnsaddr) != 1)
		return ib_error_set("bad address '%s'", dns);
	if ((err = default_route(&gw, &ifindex)) < 0)
		return err;
	fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
	if (fd < 0)
		return ib_error_set_errno(errno, "no rtnetlink in the step's network namespace");
	route_req(&r, RTN_UNREACHABLE, &ll, 16);
	if ((e = talk(fd, &r)))
		err = ib_error_set_errno(e, "cannot make 169.254.0.0/16 unreachable");
	if (!err) {
		route_req(&r, RTN_UNICAST, &dnsaddr, 32);
		add_attr(&r, RTA_GATEWAY, &gw, sizeof(gw));
		add_attr(&r, RTA_OIF, &ifindex, sizeof(ifindex));
		if ((e = talk(fd, &r)))
			err = ib_error_set_errno(e, "cannot route %s", dns);
	}
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

int ib_pasta_start(ib_pasta *p, const char *pasta, pid_t target, const char *scratch, const uint16_t *ports,
		   size_t nports, const char *dns)
{
	ib_strv argv = IB_STRV_INIT;
	ib_buf spec = IB_BUF_INIT;
	char *pidtext = NULL, nspath[64];
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
	snprintf(nspath, sizeof(nspath), "/proc/%d/ns/net", (int)target);
	nsfd = open(nspath, O_RDONLY | O_CLOEXEC);
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

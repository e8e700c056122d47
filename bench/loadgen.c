/*
 * loadgen: a small closed-loop HTTP/1.1 load generator for the BuildImage
 * service.  N keep-alive connections, each sending the same request again
 * as soon as the previous answer is complete; one thread, one epoll set,
 * so the generator stays light beside the server on a small machine.
 *
 *   loadgen [-c CONNS] [-d SECONDS] [-w WARMUP] [-X METHOD] [-H HEADER]...
 *           [-b BODYFILE] [-e SUBSTRING] URL
 *
 * Latency is from the request's first byte written to the response's last
 * byte read.  Prints one line of key=value pairs:
 *   conns=64 requests=123456 errors=0 seconds=5.00 rps=24691 p50_ms=... p90_ms=...
 *   p99_ms=... p999_ms=... max_ms=...
 * A response that is not 200 (or lacks SUBSTRING) counts as an error.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_HEADERS 16
#define RECV_MAX (1 << 20)

struct conn {
	int fd;
	size_t sent;          /* bytes of the request written */
	char *buf;            /* the response so far */
	size_t len, cap;
	double t0;
};

static struct {
	struct sockaddr_in addr;
	char *request;
	size_t request_len;
	const char *expect;
	double *lat;          /* milliseconds, after warm-up */
	size_t nlat, caplat;
	unsigned long errors;
	int epfd;
} g;

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
	fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void *xrealloc(void *p, size_t n)
{
	p = realloc(p, n);
	if (!p) {
		fputs("loadgen: out of memory\n", stderr);
		exit(1);
	}
	return p;
}

static void conn_open(struct conn *c)
{
	struct epoll_event ev = { .events = EPOLLIN | EPOLLOUT, .data.ptr = c };
	int one = 1;

	c->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (c->fd < 0)
		die("socket");
	if (connect(c->fd, (struct sockaddr *)&g.addr, sizeof(g.addr)) < 0)
		die("connect");
	setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (fcntl(c->fd, F_SETFL, O_NONBLOCK) < 0)
		die("fcntl");
	if (epoll_ctl(g.epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0)
		die("epoll_ctl");
	c->sent = 0;
	c->len = 0;
}

static void conn_reopen(struct conn *c)
{
	epoll_ctl(g.epfd, EPOLL_CTL_DEL, c->fd, NULL);
	close(c->fd);
	conn_open(c);
}

static void want(struct conn *c, uint32_t events)
{
	struct epoll_event ev = { .events = events, .data.ptr = c };

	epoll_ctl(g.epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

static void start_request(struct conn *c);

/* Write what is left of the request; switch to reading once it is all out. */
static void conn_send(struct conn *c)
{
	while (c->sent < g.request_len) {
		ssize_t n = write(c->fd, g.request + c->sent, g.request_len - c->sent);
		if (n < 0 && errno == EAGAIN) {
			want(c, EPOLLOUT);
			return;
		}
		if (n <= 0) {
			g.errors++;
			conn_reopen(c);
			start_request(c);
			return;
		}
		c->sent += (size_t)n;
	}
	want(c, EPOLLIN);
}

static void start_request(struct conn *c)
{
	c->t0 = now();
	c->sent = 0;
	c->len = 0;
	conn_send(c);
}

/* A complete response in c->buf?  Returns its length, 0 when more is needed, -1 when malformed. */
static long response_length(struct conn *c, int *status, int *close_after)
{
	char *end = memmem(c->buf, c->len, "\r\n\r\n", 4), *p;
	long clen = 0;

	if (!end)
		return 0;
	*end = '\0';
	if (strncmp(c->buf, "HTTP/1.1 ", 9))
		return -1;
	*status = (int)strtol(c->buf + 9, NULL, 10);
	*close_after = strcasestr(c->buf, "\r\nConnection: close") != NULL;
	if ((p = strcasestr(c->buf, "\r\nContent-Length:")))
		clen = strtol(p + 17, NULL, 10);
	*end = '\r';
	if ((size_t)(end + 4 - c->buf) + (size_t)clen > c->len)
		return 0;
	return (long)(end + 4 - c->buf) + clen;
}

static void conn_read(struct conn *c, double warm_until, double stop_at, int *active)
{
	for (;;) {
		ssize_t n;
		long total;
		int status = 0, close_after = 0;

		if (c->cap - c->len < 65536 + 1) {
			if (c->len + 65536 > RECV_MAX) { /* not an answer we expect */
				g.errors++;
				conn_reopen(c);
				start_request(c);
				return;
			}
			c->cap = c->len + 65536 + 1;
			c->buf = xrealloc(c->buf, c->cap);
		}
		n = read(c->fd, c->buf + c->len, 65536);
		if (n < 0 && errno == EAGAIN)
			return;
		if (n <= 0) {
			g.errors++;
			conn_reopen(c);
			start_request(c);
			return;
		}
		c->len += (size_t)n;
		c->buf[c->len] = '\0';
		total = response_length(c, &status, &close_after);
		if (total == 0)
			continue;
		double t = now();
		if (total < 0 || status != 200 || (g.expect && !memmem(c->buf, (size_t)total, g.expect, strlen(g.expect))))
			g.errors++;
		if (c->t0 >= warm_until) {
			if (g.nlat == g.caplat) {
				g.caplat = g.caplat ? 2 * g.caplat : 65536;
				g.lat = xrealloc(g.lat, g.caplat * sizeof(*g.lat));
			}
			g.lat[g.nlat++] = (t - c->t0) * 1e3;
		}
		if (close_after || total < 0)
			conn_reopen(c);
		if (t >= stop_at) {
			epoll_ctl(g.epfd, EPOLL_CTL_DEL, c->fd, NULL);
			(*active)--;
			return;
		}
		start_request(c);
		return;
	}
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

static double pct(double p)
{
	size_t i;

	if (!g.nlat)
		return 0;
	i = (size_t)(p * (double)(g.nlat - 1) + 0.5);
	return g.lat[i];
}

static char *read_file(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rbe");
	char *data = NULL;
	size_t n = 0, cap = 0, r;

	if (!f)
		die(path);
	do {
		if (n == cap)
			data = xrealloc(data, cap = cap ? 2 * cap : 4096);
		r = fread(data + n, 1, cap - n, f);
		n += r;
	} while (r > 0);
	fclose(f);
	*len = n;
	return data;
}

static void usage(void)
{
	fputs("usage: loadgen [-c CONNS] [-d SECONDS] [-w WARMUP] [-X METHOD] [-H HEADER]... [-b BODYFILE]\n"
	      "               [-e SUBSTRING] http://127.0.0.1:PORT/PATH\n",
	      stderr);
	exit(2);
}

int main(int argc, char **argv)
{
	const char *method = NULL, *headers[MAX_HEADERS], *url, *body_file = NULL;
	char *body = NULL, host[64], *path;
	size_t nheaders = 0, body_len = 0, hlen;
	double duration = 5, warmup = 1, t_start, warm_until, stop_at;
	int conns = 1, opt, active, port;
	struct conn *cs;

	while ((opt = getopt(argc, argv, "c:d:w:X:H:b:e:")) != -1) {
		switch (opt) {
		case 'c': conns = (int)strtol(optarg, NULL, 10); break;
		case 'd': duration = strtod(optarg, NULL); break;
		case 'w': warmup = strtod(optarg, NULL); break;
		case 'X': method = optarg; break;
		case 'H':
			if (nheaders == MAX_HEADERS)
				usage();
			headers[nheaders++] = optarg;
			break;
		case 'b': body_file = optarg; break;
		case 'e': g.expect = optarg; break;
		default: usage();
		}
	}
	if (optind != argc - 1 || conns < 1 || duration <= 0)
		usage();
	url = argv[optind];
	if (strncmp(url, "http://", 7) || !(path = strchr(url + 7, '/')) || (size_t)(path - url - 7) >= sizeof(host))
		usage();
	memcpy(host, url + 7, (size_t)(path - url - 7));
	host[path - url - 7] = '\0';
	{
		char *colon = strchr(host, ':');
		port = colon ? (int)strtol(colon + 1, NULL, 10) : 80;
		if (colon)
			*colon = '\0';
	}
	g.addr.sin_family = AF_INET;
	g.addr.sin_port = htons((uint16_t)port);
	if (inet_pton(AF_INET, host, &g.addr.sin_addr) != 1)
		usage();
	if (body_file)
		body = read_file(body_file, &body_len);
	if (!method)
		method = body ? "POST" : "GET";

	/* The request, built once. */
	hlen = strlen(method) + strlen(path) + strlen(host) + 128;
	for (size_t i = 0; i < nheaders; i++)
		hlen += strlen(headers[i]) + 2;
	g.request = xrealloc(NULL, hlen + body_len);
	g.request_len = (size_t)snprintf(g.request, hlen, "%s %s HTTP/1.1\r\nHost: %s:%d\r\n", method, path, host, port);
	for (size_t i = 0; i < nheaders; i++)
		g.request_len += (size_t)snprintf(g.request + g.request_len, hlen - g.request_len, "%s\r\n", headers[i]);
	if (body)
		g.request_len += (size_t)snprintf(g.request + g.request_len, hlen - g.request_len,
						  "Content-Length: %zu\r\n", body_len);
	g.request_len += (size_t)snprintf(g.request + g.request_len, hlen - g.request_len, "\r\n");
	if (body)
		memcpy(g.request + g.request_len, body, body_len);
	g.request_len += body_len;

	g.epfd = epoll_create1(EPOLL_CLOEXEC);
	if (g.epfd < 0)
		die("epoll_create1");
	cs = calloc((size_t)conns, sizeof(*cs));
	if (!cs)
		die("calloc");
	for (int i = 0; i < conns; i++)
		conn_open(&cs[i]);

	t_start = now();
	warm_until = t_start + warmup;
	stop_at = warm_until + duration;
	active = conns;
	for (int i = 0; i < conns; i++)
		start_request(&cs[i]);
	while (active > 0) {
		struct epoll_event evs[256];
		int n = epoll_wait(g.epfd, evs, 256, 1000);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			die("epoll_wait");
		for (int i = 0; i < n; i++) {
			struct conn *c = evs[i].data.ptr;
			if (evs[i].events & EPOLLOUT)
				conn_send(c);
			else
				conn_read(c, warm_until, stop_at, &active);
		}
		if (now() > stop_at + 10) /* a stuck server: give up */
			break;
	}
	qsort(g.lat, g.nlat, sizeof(*g.lat), cmp_double);
	printf("conns=%d requests=%zu errors=%lu seconds=%.2f rps=%.0f p50_ms=%.3f p90_ms=%.3f p99_ms=%.3f "
	       "p999_ms=%.3f max_ms=%.3f\n",
	       conns, g.nlat, g.errors, duration, (double)g.nlat / duration, pct(0.50), pct(0.90), pct(0.99),
	       pct(0.999), g.nlat ? g.lat[g.nlat - 1] : 0.0);
	for (int i = 0; i < conns; i++) {
		close(cs[i].fd);
		free(cs[i].buf);
	}
	free(cs);
	free(g.lat);
	free(g.request);
	free(body);
	return g.errors ? 1 : 0;
}

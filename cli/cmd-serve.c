/*
 * imagebuilder serve: the BuildImage service in the foreground.
 *
 * Logs one JSON object a line on stderr.  SIGTERM or SIGINT: stop
 * accepting, let running builds finish (or cancel them with
 * --cancel-on-shutdown), exit 0; a second signal cancels whatever still
 * runs.  Under systemd (Type=notify) it reports READY=1 and STOPPING=1.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "lib/limits.h"
#include "server/server.h"
#include "lib/util.h"
#include "cli/cli.h"

static const char serve_usage[] =
	"serve [--listen HOST:PORT] [--token-file F] [--jobs N] [--cancel-on-shutdown]\n"
	"                          [--http-threads N] [--http-mode epoll|poll] [--public-url URL] [--port-file F]\n"
	"                          " CLI_LIMIT_USAGE;

#define DEFAULT_LISTEN "127.0.0.1:8470"

static int signal_pipe[2] = { -1, -1 };
static pid_t serve_pid;

static void on_signal(int sig)
{
	unsigned char b = (unsigned char)sig;
	int saved = errno;

	/*
	 * Sandbox processes are forked from builder threads and keep this
	 * handler until they exec; a signal sent to one of them is not ours.
	 */
	if (getpid() == serve_pid && write(signal_pipe[1], &b, 1) < 0) {
		/* the pipe is full: a signal is pending already */
	}
	errno = saved;
}

static void on_sigpipe(int sig)
{
	/* A closed stderr must not kill the daemon; the write fails instead. */
	(void)sig;
}

/* sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET. */
static void notify_systemd(const char *state)
{
	const char *path = getenv("NOTIFY_SOCKET");
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	size_t len;
	int fd;

	if (!path || (path[0] != '/' && path[0] != '@') || (len = strlen(path)) >= sizeof(sa.sun_path))
		return;
	memcpy(sa.sun_path, path, len);
	if (sa.sun_path[0] == '@')
		sa.sun_path[0] = '\0';
	fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return;
	if (sendto(fd, state, strlen(state), MSG_NOSIGNAL, (struct sockaddr *)&sa,
		   (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len)) < 0) {
		/* systemd went away or never listened: nothing to tell */
	}
	close(fd);
}

/* The token: the file's content without surrounding white space; printable ASCII only. */
static int read_token(char **out, const char *path)
{
	char *data = NULL;
	size_t len = 0, start = 0;
	struct stat st;

	if (ib_read_file(&data, &len, path, IB_SERVE_TOKEN_MAX) < 0) {
		cli_error("--token-file: %s", ib_error_last());
		return -1;
	}
	while (len && strchr(" \t\r\n", data[len - 1]))
		data[--len] = '\0';
	while (start < len && strchr(" \t\r\n", data[start]))
		start++;
	if (start == len) {
		cli_error("--token-file: '%s' is empty", path);
		free(data);
		return -1;
	}
	for (size_t i = start; i < len; i++)
		if (data[i] <= ' ' || data[i] > '~') {
			cli_error("--token-file: '%s' holds white space or non-ASCII bytes inside the token", path);
			free(data);
			return -1;
		}
	if (stat(path, &st) == 0 && (st.st_mode & 0077))
		fprintf(stderr, "imagebuilder: warning: token file '%s' is readable by other users (chmod 600)\n",
			path);
	memmove(data, data + start, len - start + 1);
	*out = data;
	return 0;
}

/* Many keep-alive clients need many descriptors: raise the soft limit to the hard one. */
static void raise_fd_limit(void)
{
	struct rlimit rl;

	if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
		rl.rlim_cur = rl.rlim_max;
		setrlimit(RLIMIT_NOFILE, &rl);
	}
}

static int parse_count(unsigned *out, const char *opt, const char *arg, unsigned max)
{
	uint64_t v;

	if (ib_parse_u64(&v, arg, max) < 0 || v == 0) {
		cli_error("%s: must be a number from 1 to %u", opt, max);
		return -1;
	}
	*out = (unsigned)v;
	return 0;
}

/* Wait for a signal byte; timeout in ms (-1: forever).  Returns the signal, 0 on timeout. */
static int wait_signal(int timeout)
{
	struct pollfd p = { .fd = signal_pipe[0], .events = POLLIN };
	unsigned char b;

	for (;;) {
		int r = poll(&p, 1, timeout);
		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return 0;
		if (read(signal_pipe[0], &b, 1) == 1)
			return b;
		return 0;
	}
}

int cmd_serve(int argc, char **argv, ib_config *cfg)
{
	static const struct option longopts[] = {
		{ "listen", required_argument, NULL, 'l' },
		{ "token-file", required_argument, NULL, 't' },
		{ "jobs", required_argument, NULL, 'j' },
		{ "http-threads", required_argument, NULL, 'T' },
		{ "http-mode", required_argument, NULL, 'm' },
		{ "cancel-on-shutdown", no_argument, NULL, 'x' },
		{ "public-url", required_argument, NULL, 'u' },
		{ "port-file", required_argument, NULL, 'p' },
		{ "cache-dir", required_argument, NULL, 'C' },
		CLI_LIMIT_OPTIONS,
		{ NULL, 0, NULL, 0 },
	};
	ib_server_opts opts = { .listen = DEFAULT_LISTEN, .log_fd = STDERR_FILENO };
	const char *token_file = NULL, *port_file = NULL;
	struct sigaction sa = { .sa_handler = on_signal }, sp = { .sa_handler = on_sigpipe };
	ib_server *srv = NULL;
	ib_cache *cache = NULL;
	char *token = NULL;
	long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
	int c, err, ret = EXIT_FAIL;

	opts.jobs = ncpu > 3 ? (unsigned)(ncpu / 2) : 2;
	optind = 1;
	while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
		switch (c) {
		case 'l': opts.listen = optarg; break;
		case 't': token_file = optarg; break;
		case 'j':
			if (parse_count(&opts.jobs, "--jobs", optarg, IB_SERVE_JOBS_MAX) < 0)
				return EXIT_USAGE;
			break;
		case 'T':
			if (parse_count(&opts.http_threads, "--http-threads", optarg, IB_SERVE_HTTP_THREADS_MAX) < 0)
				return EXIT_USAGE;
			break;
		case 'm':
			if (!strcmp(optarg, "epoll"))
				opts.http_mode = IB_HTTP_EPOLL;
			else if (!strcmp(optarg, "poll"))
				opts.http_mode = IB_HTTP_POLL;
			else {
				cli_error("--http-mode: '%s' is not epoll or poll", optarg);
				return EXIT_USAGE;
			}
			break;
		case 'x': opts.cancel_on_shutdown = true; break;
		case 'u':
			if (strncmp(optarg, "http://", 7) && strncmp(optarg, "https://", 8)) {
				cli_error("--public-url: '%s' is not an http:// or https:// URL", optarg);
				return EXIT_USAGE;
			}
			if (strlen(optarg) >= IB_SERVE_URL_MAX) {
				cli_error("--public-url: longer than %d bytes", IB_SERVE_URL_MAX - 1);
				return EXIT_USAGE;
			}
			opts.public_url = optarg;
			break;
		case 'p': port_file = optarg; break;
		case 'C': ib_config_set(&cfg->cache_dir, optarg); break;
		default:
			if (cli_limit_option(c, optarg, cfg) > 0)
				break;
			return c >= CLI_OPT_MEMORY && c <= CLI_OPT_RUNNER ? EXIT_USAGE : cli_usage(serve_usage);
		}
	}
	if (optind != argc)
		return cli_usage(serve_usage);
	if (token_file) {
		if (read_token(&token, token_file) < 0)
			return EXIT_USAGE;
		opts.token = token;
	}
	opts.cfg = cfg;

	serve_pid = getpid();
	if (pipe2(signal_pipe, O_CLOEXEC | O_NONBLOCK) < 0) {
		cli_error("cannot create a pipe: %s", strerror(errno));
		goto out;
	}
	sigemptyset(&sa.sa_mask);
	sa.sa_flags = SA_RESTART;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	sigemptyset(&sp.sa_mask);
	sp.sa_flags = SA_RESTART;
	sigaction(SIGPIPE, &sp, NULL);
	raise_fd_limit();

	if (cli_open_cache(&cache, cfg) < 0)
		goto out;
	if ((err = ib_server_start(&srv, cache, &opts)) < 0) {
		cli_error("serve: %s", ib_error_last());
		ret = err == IB_EINVALID ? EXIT_USAGE : EXIT_FAIL;
		goto out;
	}
	if (port_file) {
		char buf[16];
		int n = snprintf(buf, sizeof(buf), "%u\n", ib_server_port(srv));
		if (ib_write_file_atomic(port_file, buf, (size_t)n, 0644) < 0) {
			cli_error("--port-file: %s", ib_error_last());
			goto out;
		}
	}
	notify_systemd("READY=1");

	wait_signal(-1);
	notify_systemd("STOPPING=1");
	ib_server_stop_accepting(srv);
	while (!ib_server_wait_idle(srv, 0.5)) {
		if (wait_signal(0) != 0)
			ib_server_cancel_running(srv);
	}
	ret = EXIT_OK;
out:
	ib_server_free(srv);
	ib_cache_close(cache);
	free(token);
	if (signal_pipe[0] >= 0) {
		close(signal_pipe[0]);
		close(signal_pipe[1]);
	}
	return ret;
}

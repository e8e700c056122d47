/*
 * The service's lifecycle: the daemon lock, recovery after a crash, the
 * listening socket, the threads; and shutting down in steps.
 */
#include "server/server-internal.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int take_daemon_lock(ib_server *srv)
{
	char *path = ib_xasprintf("%s/serve.lock", ib_cache_dir(srv->cache));
	char pid[32];
	int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644), err = 0;

	if (fd < 0) {
		err = ib_error_set_errno(errno, "cannot open '%s'", path);
		goto out;
	}
	if (flock(fd, LOCK_EX | LOCK_NB) < 0) {
		err = errno == EWOULDBLOCK
			      ? (ib_error_set("another 'imagebuilder serve' is using the cache dir '%s'",
					      ib_cache_dir(srv->cache)), IB_EEXISTS)
			      : ib_error_set_errno(errno, "cannot lock '%s'", path);
		close(fd);
		goto out;
	}
	snprintf(pid, sizeof(pid), "%ld\n", (long)getpid());
	if (ftruncate(fd, 0) == 0)
		ib_write_all(fd, pid, strlen(pid));
	srv->lock_fd = fd;
out:
	free(path);
	return err;
}

static char *recover_cb(const ib_build_record *rec, void *arg)
{
	ib_server *srv = arg;
	char *tail = srv_log_tail_of(srv, rec->id);

	srv_build_log(srv, rec->id, -1, "build FAILED: %s", INTERRUPTED_MESSAGE);
	srv_event(srv, json_pack("{s:s, s:s, s:s, s:s, s:s, s:s}", "event", "build", "build_id", rec->id, "image_id",
			     rec->image_id, "status", "FAILED", "was", rec->status, "error", INTERRUPTED_MESSAGE));
	return tail;
}

static int open_listener(ib_server *srv)
{
	struct sockaddr_storage ss;
	socklen_t len;
	int fd, one = 1, err;

	if ((err = ib_http_parse_listen(&ss, &len, srv->listen)) < 0)
		return err;
	fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
	if (fd < 0)
		return ib_error_set_errno(errno, "cannot create a socket");
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (ss.ss_family == AF_INET6)
		setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one));
	if (bind(fd, (struct sockaddr *)&ss, len) < 0 || listen(fd, 1024) < 0) {
		err = ib_error_set_errno(errno, "cannot listen on '%s'", srv->listen);
		close(fd);
		return err;
	}
	len = sizeof(ss);
	if (getsockname(fd, (struct sockaddr *)&ss, &len) == 0)
		srv->port = ntohs(ss.ss_family == AF_INET ? ((struct sockaddr_in *)&ss)->sin_port
							  : ((struct sockaddr_in6 *)&ss)->sin6_port);
	srv->listen_fd = fd;
	return 0;
}

static unsigned cpu_count(void)
{
	long n = sysconf(_SC_NPROCESSORS_ONLN);

	return n > 0 ? (unsigned)n : 1;
}

int ib_server_start(ib_server **out, ib_cache *cache, const ib_server_opts *opts)
{
	ib_server *srv = ib_xcalloc(1, sizeof(*srv));
	pthread_condattr_t ca;
	unsigned recovered = 0;
	ib_orphans orphans = { 0 };
	int err = 0;

	srv->cache = cache;
	srv->lock_fd = srv->listen_fd = srv->accept_wake = -1;
	srv->log_fd = opts->log_fd;
	srv->listen = ib_xstrdup(opts->listen ? opts->listen : "127.0.0.1:8470");
	srv->public_url = opts->public_url ? ib_xstrdup(opts->public_url) : NULL;
	if (srv->public_url) /* no trailing slash: paths are appended */
		for (size_t n = strlen(srv->public_url); n && srv->public_url[n - 1] == '/'; n--)
			srv->public_url[n - 1] = '\0';
	srv->cfg = opts->cfg;
	srv->jobs = opts->jobs ? opts->jobs : 1;
	srv->http_threads = opts->http_threads ? opts->http_threads : cpu_count();
	srv->http_mode = opts->http_mode;
	srv->cancel_on_shutdown = opts->cancel_on_shutdown;
	if (opts->token) {
		srv->auth = true;
		ib_http_token_init(&srv->token, opts->token, strlen(opts->token));
	}
	srv->metrics = ib_metrics_new();
	srv->t_start = ib_now();
	pthread_mutex_init(&srv->mu, NULL);
	pthread_mutex_init(&srv->adopt_mu, NULL);
	pthread_mutex_init(&srv->touch_mu, NULL);
	pthread_mutex_init(&srv->answer_mu, NULL);
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&srv->work_cv, NULL);
	pthread_cond_init(&srv->done_cv, &ca);
	pthread_cond_init(&srv->timer_cv, &ca);
	pthread_condattr_destroy(&ca);

	if (srv->jobs > IB_SERVE_JOBS_MAX || srv->http_threads > IB_SERVE_HTTP_THREADS_MAX) {
		err = ib_error_set("at most %d builders and %d http threads", IB_SERVE_JOBS_MAX,
				   IB_SERVE_HTTP_THREADS_MAX);
		err = IB_EINVALID;
		goto out;
	}
	if ((err = take_daemon_lock(srv)) < 0)
		goto out;
	if ((err = ib_builds_open(&srv->builds, cache)) < 0)
		goto out;
	/*
	 * What a killed daemon (or builder) left: orphans (scratch dirs, what
	 * no row names), and builds that will never finish.
	 */
	if ((err = ib_cache_orphans(cache, true, NULL, NULL, &orphans)) < 0)
		goto out;
	if ((err = ib_builds_recover(srv->builds, INTERRUPTED_MESSAGE, recover_cb, srv, &recovered)) < 0)
		goto out;
	if ((err = open_listener(srv)) < 0)
		goto out;

	if ((err = srv_threads_start(srv)) < 0)
		goto out;

	if ((err = srv_http_start(srv)) < 0)
		goto out;
	srv_event(srv, json_pack("{s:s, s:s, s:i, s:i, s:i, s:s, s:b, s:s, s:i}", "event", "start", "listen", srv->listen,
			     "port", (int)srv->port, "jobs", (int)srv->jobs, "http_threads", (int)srv->http_threads,
			     "http_mode", srv->http_mode == IB_HTTP_POLL ? "poll" : "epoll", "auth", srv->auth,
			     "cache_dir", ib_cache_dir(cache), "recovered_builds", (int)recovered));
	if (orphans.count)
		srv_event(srv, json_pack("{s:s, s:i, s:I}", "event", "orphans_removed", "count", (int)orphans.count,
					 "bytes", (json_int_t)orphans.bytes));
out:
	if (err) {
		ib_server_free(srv);
		return err;
	}
	*out = srv;
	return 0;
}

unsigned ib_server_port(const ib_server *srv)
{
	return srv->port;
}

void ib_server_stop_accepting(ib_server *srv)
{
	job *cancelled = NULL;
	bool first;

	pthread_mutex_lock(&srv->mu);
	first = !srv->draining;
	srv->draining = true;
	/* Queued builds will not start: they end CANCELLED, with the reason. */
	while (srv->queue_head) {
		job *j = srv->queue_head;
		srv_queue_remove(srv, j);
		j->cancel = 1;
		j->shutdown_cancel = true;
		j->status = ST_CANCELLED;
		j->error = ib_xstrdup(SHUTDOWN_MESSAGE " before the build started");
		j->finished = ib_http_wallclock();
		srv_job_ref(j);
		j->qnext = cancelled;
		cancelled = j;
		srv_job_finished_locked(srv, j);
	}
	for (job *j = srv->jobs_head; j; j = j->next)
		if (j->inserting) {
			j->cancel = 1;
			j->shutdown_cancel = true;
		}
	pthread_mutex_unlock(&srv->mu);
	while (cancelled) {
		job *next = cancelled->qnext;
		cancelled->qnext = NULL;
		srv_finish_unrun(srv, cancelled);
		srv_job_unref(srv, cancelled);
		cancelled = next;
	}
	if (first && srv->mhd) {
		/*
		 * New connections fail at once instead of waiting in the backlog;
		 * the socket is closed when the server is freed.
		 */
		srv_accept_stop(srv);
		shutdown(srv->listen_fd, SHUT_RDWR);
		srv_event(srv, json_pack("{s:s, s:b}", "event", "draining", "cancel_running", srv->cancel_on_shutdown));
	}
	if (srv->cancel_on_shutdown)
		ib_server_cancel_running(srv);
}

void ib_server_cancel_running(ib_server *srv)
{
	int n = 0;

	pthread_mutex_lock(&srv->mu);
	for (job *j = srv->jobs_head; j; j = j->next)
		if (!IS_FINAL(j->status) && !j->cancel) {
			j->shutdown_cancel = true;
			j->cancel = 1;
			n++;
		}
	pthread_mutex_unlock(&srv->mu);
	if (n)
		srv_event(srv, json_pack("{s:s, s:i}", "event", "cancel_running", "builds", n));
}

bool ib_server_wait_idle(ib_server *srv, double timeout)
{
	double deadline = ib_now() + timeout;
	struct timespec ts;
	bool idle;

	ts.tv_sec = (time_t)deadline;
	ts.tv_nsec = (long)((deadline - (double)ts.tv_sec) * 1e9);
	pthread_mutex_lock(&srv->mu);
	while (srv->nbuilding + srv->ninserting + srv->nqueued > 0 &&
	       pthread_cond_timedwait(&srv->done_cv, &srv->mu, &ts) == 0)
		;
	idle = srv->nbuilding + srv->ninserting + srv->nqueued == 0;
	pthread_mutex_unlock(&srv->mu);
	return idle;
}

void ib_server_free(ib_server *srv)
{
	if (!srv)
		return;
	if (srv->mhd || srv->nworkers) {
		ib_server_stop_accepting(srv);
		ib_server_cancel_running(srv);
	}
	srv_threads_stop(srv);
	srv_accept_stop(srv);
	srv_h2_stop(srv);
	/* no connection is suspended now: the timer resumed every waiter */
	if (srv->mhd) {
		MHD_stop_daemon(srv->mhd);
		srv_event(srv, json_pack("{s:s}", "event", "stop"));
	}
	if (srv->listen_fd >= 0)
		close(srv->listen_fd);
	while (srv->jobs_head) {
		job *j = srv->jobs_head;
		srv_list_remove(srv, j);
		srv_job_unref_locked(j);
	}
	ib_builds_close(srv->builds);
	ib_metrics_free(srv->metrics);
	if (srv->lock_fd >= 0)
		close(srv->lock_fd);
	pthread_mutex_destroy(&srv->mu);
	pthread_mutex_destroy(&srv->adopt_mu);
	pthread_mutex_destroy(&srv->touch_mu);
	pthread_mutex_destroy(&srv->answer_mu);
	for (size_t i = 0; i < ANSWER_SLOTS; i++)
		free(srv->answers[i].file);
	pthread_cond_destroy(&srv->work_cv);
	pthread_cond_destroy(&srv->done_cv);
	pthread_cond_destroy(&srv->timer_cv);
	free(srv->listen);
	free(srv->public_url);
	free(srv);
}

/*
 * Building an image: each missing layer of the plan, in order, then the
 * export.  See build.h; the README's "How it works" has the picture.
 */
#include "builder/build.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <unistd.h>

#include "builder/apt.h"
#include "builder/base.h"
#include "builder/binfmt.h"
#include "builder/cgroup.h"
#include "builder/disk.h"
#include "builder/export.h"
#include "builder/junk.h"
#include "builder/python.h"
#include "builder/share.h"
#include "layer/copy.h"
#include "layer/tree.h"
#include "lib/limits.h"
#include "lib/util.h"
#include "steps/step.h"

#define STEP_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

struct ib_build {
	/*
	 * Guards everything below the plan (layer states and seconds,
	 * cached, ext4_*, failed_layer, error, log_tail) for readers on other
	 * threads; the plan never changes.
	 */
	pthread_mutex_t mu;
	const ib_config *cfg;
	ib_plan *plan;
	ib_build_layer_status *layers;
	bool cached;
	char ext4_sha256[IB_SHA256_HEX];
	uint64_t ext4_bytes;
	int failed_layer;
	char *error;
	char *log_tail;
};

const char *ib_layer_state_name(ib_layer_state s)
{
	switch (s) {
	case IB_LAYER_PENDING: return "pending";
	case IB_LAYER_RUNNING: return "running";
	case IB_LAYER_CACHED: return "cached";
	case IB_LAYER_DONE: return "done";
	case IB_LAYER_FAILED: return "failed";
	}
	return "unknown";
}

const char *ib_layer_source_name(ib_layer_source s)
{
	switch (s) {
	case IB_SOURCE_BUILT: return "built";
	case IB_SOURCE_CACHE: return "cache";
	case IB_SOURCE_REMOTE: return "remote";
	case IB_SOURCE_NONE: break;
	}
	return NULL;
}

static void set_source(ib_build *b, size_t index, ib_layer_source source)
{
	pthread_mutex_lock(&b->mu);
	b->layers[index].source = source;
	pthread_mutex_unlock(&b->mu);
}

/* State changes go through here: a server thread may be reading them. */
static void set_layer(ib_build *b, size_t index, ib_layer_state state, double seconds)
{
	ib_build_layer_status *l = &b->layers[index];

	pthread_mutex_lock(&b->mu);
	l->state = state;
	if (state == IB_LAYER_CACHED)
		l->cached = true;
	if (state == IB_LAYER_CACHED && !l->source)
		l->source = IB_SOURCE_CACHE;
	if (state == IB_LAYER_DONE)
		l->source = IB_SOURCE_BUILT;
	if (seconds >= 0)
		l->seconds = seconds;
	if (state == IB_LAYER_FAILED)
		b->failed_layer = (int)index;
	pthread_mutex_unlock(&b->mu);
}

int ib_build_new(ib_build **out, const ib_spec *spec, const ib_config *cfg)
{
	ib_basedef *base = NULL;
	ib_python_pin pin = { 0 };
	ib_plan *plan = NULL;
	ib_build *b;
	int err;

	if ((err = ib_base_load(&base, cfg, spec->base)) < 0)
		goto out;
	if (spec->python_version && (err = ib_python_resolve(&pin, cfg, spec->python_version, base->machine)) < 0)
		goto out;
	if ((err = ib_plan_make(&plan, spec, base, spec->python_version ? &pin : NULL, cfg->epoch)) < 0)
		goto out;
	b = ib_xcalloc(1, sizeof(*b));
	pthread_mutex_init(&b->mu, NULL);
	b->cfg = cfg;
	b->plan = plan;
	b->layers = ib_xcalloc(plan->nlayers, sizeof(*b->layers));
	b->failed_layer = -1;
	*out = b;
out:
	ib_python_pin_clear(&pin);
	ib_basedef_free(base);
	return err;
}

void ib_build_free(ib_build *b)
{
	if (!b)
		return;
	ib_plan_free(b->plan);
	free(b->layers);
	free(b->error);
	free(b->log_tail);
	pthread_mutex_destroy(&b->mu);
	free(b);
}

const ib_plan *ib_build_plan(const ib_build *b)
{
	return b->plan;
}

void ib_build_status_get(ib_build *b, ib_build_status *out)
{
	pthread_mutex_lock(&b->mu);
	out->nlayers = b->plan->nlayers;
	out->layers = ib_xcalloc(out->nlayers, sizeof(*out->layers));
	memcpy(out->layers, b->layers, out->nlayers * sizeof(*out->layers));
	out->cached = b->cached;
	memcpy(out->ext4_sha256, b->ext4_sha256, sizeof(out->ext4_sha256));
	out->ext4_bytes = b->ext4_bytes;
	out->failed_layer = b->failed_layer;
	out->error = b->error ? ib_xstrdup(b->error) : NULL;
	out->log_tail = b->log_tail ? ib_xstrdup(b->log_tail) : NULL;
	pthread_mutex_unlock(&b->mu);
}

void ib_build_status_clear(ib_build_status *s)
{
	if (!s)
		return;
	free(s->layers);
	free(s->error);
	free(s->log_tail);
	memset(s, 0, sizeof(*s));
}

/* Progress and the build log. */
struct progress {
	const ib_build_opts *opts;
	ib_buf tail; /* the current step's output, the last IB_LOG_TAIL_MAX bytes */
};

static void emit_raw(struct progress *p, const char *data, size_t len)
{
	if (p->opts->log_fd >= 0)
		ib_write_all(p->opts->log_fd, data, len);
	if (p->opts->progress)
		p->opts->progress(data, len, p->opts->progress_arg);
}

static void emit(struct progress *p, const char *fmt, ...) IB_PRINTF(2, 3);

static void emit(struct progress *p, const char *fmt, ...)
{
	char line[1024];
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(line, sizeof(line), fmt, ap);
	va_end(ap);
	if (n > 0)
		emit_raw(p, line, (size_t)n < sizeof(line) ? (size_t)n : sizeof(line) - 1);
}

static void step_output(const char *data, size_t len, void *arg)
{
	struct progress *p = arg;

	emit_raw(p, data, len);
	ib_buf_add(&p->tail, data, len);
	if (p->tail.len > 2 * IB_LOG_TAIL_MAX) {
		memmove(p->tail.ptr, p->tail.ptr + p->tail.len - IB_LOG_TAIL_MAX, IB_LOG_TAIL_MAX);
		p->tail.len = IB_LOG_TAIL_MAX;
		p->tail.ptr[p->tail.len] = '\0';
	}
}

static char *tail_of(const ib_buf *t)
{
	size_t off = t->len > IB_LOG_TAIL_MAX ? t->len - IB_LOG_TAIL_MAX : 0;

	return ib_xstrndup(t->ptr ? t->ptr + off : "", t->len - off);
}

/*
 * A built layer whose seal (hash and sync, ib_cache_layer_seal) runs on a
 * thread while the next step already runs on its directory; the next layer's
 * commit waits for it and indexes it first.  Only ever one.
 */
struct pending {
	bool active, threaded;
	size_t index;
	pthread_t thread;
	char *scratch, *upper;
	int tmplock, lockfd;
	double seconds;
	ib_layer_seal seal;
	ib_walk_opts walk; /* the build's deadline and cancel flag */
	int err;
	char *msg;
};

struct run_ctx {
	ib_build *b;
	const ib_plan *plan;
	const ib_config *cfg;
	ib_cache *cache;
	const ib_build_opts *opts;
	struct progress *prog;
	double deadline;
	char *resolv;      /* the steps' resolver config */
	ib_sandbox_cfg sandbox;
	char *helper;      /* ib-sandbox */
	uint16_t ports[1]; /* host loopback ports steps may reach: the pip index's */
	ib_limits limits;  /* this build's */
	ib_cgroup cgroup;
	ib_disk disk;      /* where steps write (--disk); disk.mnt NULL: the scratch dir */
	ib_apt apt;        /* the shared apt state of the build's architecture */
	int *held;         /* per layer: its lock, held shared while the build uses it, or -1 */
	struct pending pending;
	ib_remote *remote; /* --remote: layers pulled before they are built, pushed after; NULL: none */
	const ib_runner_ops *runner;  /* where the steps run */
	ib_runner_session *session;   /* what the runner keeps across the build's steps (its VM) */
	char *vm_init;     /* the VM runner's guest agent */
};

/* Where layer i's tree is: in the store, or still in its scratch dir while pending. */
static char *layer_dir(const struct run_ctx *rc, size_t i)
{
	if (rc->pending.active && rc->pending.index == i)
		return ib_xstrdup(rc->pending.upper);
	return ib_cache_layer_path(rc->cache, rc->plan->layers[i].key);
}

static void *seal_thread(void *arg)
{
	struct pending *p = arg;

	if ((p->err = ib_cache_layer_seal(p->upper, &p->walk, &p->seal)) < 0)
		p->msg = ib_xstrdup(ib_error_last());
	return NULL;
}

/* Seal layer index on a thread; the pending entry takes over its scratch dir and lock. */
static void defer_commit(struct run_ctx *rc, size_t index, char **scratch, int *tmplock, char **upper,
			 int *lockfd, double seconds)
{
	struct pending *p = &rc->pending;

	*p = (struct pending){
		.active = true, .index = index, .scratch = *scratch, .upper = *upper,
		.tmplock = *tmplock, .lockfd = *lockfd, .seconds = seconds,
		.walk = { .deadline = rc->deadline, .cancel = rc->opts->cancel, .what = "the layer" },
	};
	*scratch = *upper = NULL;
	*tmplock = *lockfd = -1;
	if (pthread_create(&p->thread, NULL, seal_thread, p) == 0)
		p->threaded = true;
	else
		seal_thread(p); /* no thread to be had: seal here and now */
}

/*
 * Wait for the pending layer's seal and commit it.  A failure fails the
 * build (the layer is not cached); either way the pending entry is gone.
 */
static int finish_pending(struct run_ctx *rc)
{
	struct pending *p = &rc->pending;
	const ib_plan_layer *l;
	int err;

	if (!p->active)
		return 0;
	l = &rc->plan->layers[p->index];
	if (p->threaded)
		pthread_join(p->thread, NULL);
	err = p->err;
	if (err)
		ib_error_set("%s", p->msg ? p->msg : "cannot seal the layer");
	else
		err = ib_cache_layer_commit_sealed(rc->cache, l->key, p->index ? rc->plan->layers[p->index - 1].key : NULL,
						   l->kind, l->canonical, p->upper, p->seconds, &p->seal, NULL);
	if (!err && (err = ib_cache_share_lock(p->lockfd)) == 0) {
		rc->held[p->index] = p->lockfd;
		p->lockfd = -1;
	}
	if (err) {
		ib_error_prefix("cannot cache step %zu (%s)", p->index, l->kind);
		emit(rc->prog, "[%zu/%zu] %s: %s\n", p->index + 1, rc->plan->nlayers, l->kind, ib_error_last());
		set_layer(rc->b, p->index, IB_LAYER_FAILED, p->seconds);
	}
	ib_cache_unlock(p->lockfd);
	ib_cache_rmtemp(p->scratch, p->tmplock);
	free(p->scratch);
	free(p->upper);
	free(p->msg);
	*p = (struct pending){ .tmplock = -1, .lockfd = -1 };
	return err;
}

/* finish_pending for a build that failed already: its own error message stays. */
static void finish_pending_quietly(struct run_ctx *rc)
{
	char *msg;

	if (!rc->pending.active)
		return;
	msg = ib_xstrdup(ib_error_last());
	finish_pending(rc);
	ib_error_set("%s", msg);
	free(msg);
}

/*
 * env for the step at index: the fixed sandbox env, then every earlier env
 * step, then what the step kind itself needs (plan_env, KEY=VALUE).
 */
static void step_env(ib_strv *env, const ib_plan *plan, size_t index, const ib_strv *plan_env)
{
	json_t *merged = json_object(), *below = ib_plan_env_below(plan, index), *v;
	const char *k;
	char epoch_str[32];

	snprintf(epoch_str, sizeof(epoch_str), "%lld", (long long)plan->epoch);
	json_object_set_new(merged, "PATH", json_string(STEP_PATH));
	json_object_set_new(merged, "HOME", json_string("/root"));
	json_object_set_new(merged, "LANG", json_string("C.UTF-8"));
	json_object_set_new(merged, "DEBIAN_FRONTEND", json_string("noninteractive"));
	/* reproducible byte-code: python writes hash-based .pyc files */
	json_object_set_new(merged, "SOURCE_DATE_EPOCH", json_string(epoch_str));
	json_object_update(merged, below);
	json_decref(below);
	for (size_t i = 0; i < plan_env->n; i++) {
		const char *eq = strchr(plan_env->v[i], '=');
		if (!eq)
			continue;
		char *name = ib_xstrndup(plan_env->v[i], (size_t)(eq - plan_env->v[i]));
		json_object_set_new(merged, name, json_string(eq + 1));
		free(name);
	}
	json_object_foreach(merged, k, v)
		ib_strv_pushf(env, "%s=%s", k, json_string_value(v));
	json_decref(merged);
}

static int run_step(struct run_ctx *rc, size_t index, const char *upper, const char *scratch,
		    const ib_step_ops *ops, const json_t *arg)
{
	const ib_plan *plan = rc->plan;
	ib_step_plan sp = IB_STEP_PLAN_INIT;
	ib_step_ctx sctx = {
		.arch = plan->arch,
		.pip_index_url = rc->cfg->pip_index_url,
		.python = plan->python ? "/usr/local/bin/python3" : "python3",
		.apt_lists_fresh = rc->apt.fresh,
	};
	ib_strv env = IB_STRV_INIT;
	const char **lowers = NULL;
	char **paths = NULL;
	int err, lockfd = -1;

	if ((err = ops->plan(&sp, arg, &sctx)) < 0)
		goto out;
	if (!sp.ncmds)
		goto out;
	paths = ib_xcalloc(index, sizeof(*paths));
	lowers = ib_xcalloc(index, sizeof(*lowers));
	for (size_t i = 0; i < index; i++) {
		paths[i] = layer_dir(rc, i);
		lowers[i] = paths[i];
	}
	step_env(&env, plan, index, &sp.env);
	/* the shared lists do not change under the step (a harvest waits) */
	if ((sp.flags & IB_PLAN_APT_CACHE) && (err = ib_apt_lock(&rc->apt, false, &lockfd)) < 0)
		goto out;
	ib_run_req req = {
		.lowers = lowers,
		.nlowers = index,
		.upper = upper,
		.scratch = scratch,
		.plan = &sp,
		.env = (const char *const *)env.v,
		.apt_lists = rc->apt.lists,
		.apt_private = rc->apt.private,
		.resolv_conf = rc->resolv,
		.sandbox = &rc->sandbox,
		.deadline = rc->deadline,
		.cancel = rc->opts->cancel,
		.output = step_output,
		.output_arg = rc->prog,
		.session = &rc->session,
	};
	err = rc->runner->run(&req);
	if (err == IB_ERROR && ib_cgroup_oom(&rc->cgroup)) {
		char size[32], *msg = ib_xstrdup(ib_error_last());
		ib_format_size(size, rc->limits.memory);
		ib_error_set("%s: the step ran out of memory: the build's memory limit (--memory %s)", msg, size);
		free(msg);
	} else if (err == IB_ERROR && ib_cgroup_pids_hit(&rc->cgroup)) {
		char *msg = ib_xstrdup(ib_error_last());
		ib_error_set("%s: a fork failed at the build's process limit (--pids %llu)", msg,
			     (unsigned long long)rc->limits.pids);
		free(msg);
	}
	/*
	 * A kind that runs only apt leaves the lists current (the lock is
	 * still held); any other step that ran commands may have changed the
	 * sources.
	 */
	if (!err && (ops->flags & IB_STEP_APT_LISTS) && lockfd >= 0)
		ib_apt_mark_fresh(&rc->apt);
	else
		rc->apt.fresh = false;
out:
	ib_cache_unlock(lockfd);
	if (paths)
		for (size_t i = 0; i < index; i++)
			free(paths[i]);
	free(paths);
	free(lowers);
	ib_strv_free(&env);
	ib_step_plan_free(&sp);
	return err;
}

/*
 * The pinned python's layer: the python-build-standalone archive unpacked
 * into /usr/local (python3 and pip3 on PATH are it), then cloudpickle
 * installed with it from the configured index.
 */
static int build_python(struct run_ctx *rc, size_t index, const char *upper, const char *scratch)
{
	const ib_python_pin *py = rc->plan->python;
	ib_fetch_opts fo = { .deadline = rc->deadline, .cancel = rc->opts->cancel };
	json_t *pkgs = json_pack("[s]", IB_PYTHON_RUNTIME_PACKAGE);
	char *archive = NULL;
	int err;

	emit(rc->prog, "python %s (%s, release %s): %s\n", py->version, py->machine, py->release, py->url);
	if (mkdir(upper, 0755) < 0) {
		err = ib_error_set_errno(errno, "cannot create '%s'", upper);
		goto out;
	}
	if ((err = ib_python_fetch(&archive, rc->cache, py, &fo)) < 0)
		goto out;
	if ((err = ib_python_unpack(archive, upper)) < 0)
		goto out;
	if (rc->runner == &ib_runner_vm) {
		/* the VM starts a step from an empty upper: this one's pip runs in namespaces */
		const ib_runner_ops *runner = rc->runner;
		emit(rc->prog, "vm: the python layer's pip runs in the namespace runner\n");
		rc->runner = &ib_runner_namespace;
		err = run_step(rc, index, upper, scratch, &ib_step_pip_install, pkgs);
		rc->runner = runner;
		goto out;
	}
	err = run_step(rc, index, upper, scratch, &ib_step_pip_install, pkgs);
out:
	json_decref(pkgs);
	free(archive);
	return err;
}

/*
 * A step (or the python layer): on the build's disk when there is one,
 * its finished tree then copied to upper in the cache's scratch.
 */
static int build_step(struct run_ctx *rc, size_t index, const char *upper, const char *scratch,
		      const ib_walk_opts *walk)
{
	const ib_plan_layer *l = &rc->plan->layers[index];
	char *dir = NULL, *dir_upper = NULL;
	const char *where = upper, *where_scratch = scratch;
	int err;

	if (rc->disk.mnt) {
		if ((err = ib_disk_mkdir(&rc->disk, &dir)) < 0)
			return err;
		dir_upper = ib_xasprintf("%s/upper", dir);
		where = dir_upper;
		where_scratch = dir;
	}
	if (!l->step)
		err = build_python(rc, index, where, where_scratch);
	else if (mkdir(where, 0755) < 0)
		err = ib_error_set_errno(errno, "cannot create '%s'", where);
	else
		err = run_step(rc, index, where, where_scratch, l->step->ops, l->step->arg);
	if (err && err != IB_ETIMEOUT && err != IB_ECANCELED && ib_disk_full(&rc->disk)) {
		char size[32], *msg = ib_xstrdup(ib_error_last());
		ib_format_size(size, rc->limits.disk);
		ib_error_set("%s: the step ran out of disk space: the build's disk limit (--disk %s)", msg, size);
		free(msg);
	}
	if (!err && dir)
		err = ib_tree_copy(dir_upper, upper, walk);
	if (dir) {
		int rerr = ib_disk_release(&rc->disk, dir);
		if (!err)
			err = rerr;
	}
	free(dir);
	free(dir_upper);
	return err;
}

static int build_base(struct run_ctx *rc, const char *upper)
{
	ib_basedef *base = NULL;
	ib_proc_opts po = {
		.output = step_output, .output_arg = rc->prog,
		.deadline = rc->deadline, .cancel = rc->opts->cancel,
	};
	int err;

	if ((err = ib_base_load(&base, rc->cfg, rc->plan->spec->base)) == 0)
		err = ib_base_bootstrap(base, upper, rc->cfg, &po);
	ib_basedef_free(base);
	if (!err)
		err = ib_apt_harvest(&rc->apt, upper);
	if (!err)
		err = ib_junk_neutralise_base(upper);
	return err;
}

/* The layer is in the cache: use it (held shared) for the rest of the build. */
static void use_cached(struct run_ctx *rc, size_t index, int lockfd, const char *how)
{
	const ib_plan_layer *l = &rc->plan->layers[index];

	rc->held[index] = lockfd;
	set_layer(rc->b, index, IB_LAYER_CACHED, -1);
	emit(rc->prog, "[%zu/%zu] %s: %s (%.12s)\n", index + 1, rc->plan->nlayers, l->kind, how, l->key);
}

static int build_layer(struct run_ctx *rc, size_t index)
{
	ib_build *b = rc->b;
	const ib_plan *plan = rc->plan;
	const ib_plan_layer *l = &plan->layers[index];
	char *scratch = NULL, *upper = NULL;
	int err = 0, lockfd = -1, tmplock = -1, r;
	ib_walk_opts walk;
	ib_layer_seal seal;
	double t0;

	bool waited = false;
	/* --force rebuilds the steps; the base is pinned by its definition (gc refreshes it). */
	bool force = rc->opts->force && index > 0;

	if (!force) {
		/* In use from here on (shared lock): gc leaves it alone. */
		if ((err = ib_cache_lock_layer(rc->cache, l->key, IB_LOCK_SHARED, rc->opts->cancel, rc->deadline,
					       &lockfd, NULL)) < 0)
			goto fail_early;
		if ((r = ib_cache_layer_get(rc->cache, l->key, NULL)) != 0) {
			if (r < 0) {
				ib_cache_unlock(lockfd);
				return r;
			}
			ib_cache_touch_layer(rc->cache, l->key);
			use_cached(rc, index, lockfd, "cached");
			return 0;
		}
		ib_cache_unlock(lockfd);
		lockfd = -1;
	}
	/* Single flight per layer: whoever holds the exclusive lock builds it. */
	if ((err = ib_cache_lock_layer(rc->cache, l->key, 0, rc->opts->cancel, rc->deadline, &lockfd, &waited)) < 0)
		goto fail_early;
	if (!force && (r = ib_cache_layer_get(rc->cache, l->key, NULL)) != 0) {
		if (r < 0 || (r = ib_cache_share_lock(lockfd)) < 0) {
			ib_cache_unlock(lockfd);
			return r;
		}
		use_cached(rc, index, lockfd, "cached, built meanwhile");
		return 0;
	}

	if (!force && rc->remote) {
		/* another node may have built it: pulled and verified, or built here */
		ib_share_layer sl = { l->key, index ? plan->layers[index - 1].key : "", l->kind, l->canonical };
		ib_walk_opts pw = { .deadline = rc->deadline, .cancel = rc->opts->cancel, .what = "the pulled layer" };
		if ((err = finish_pending(rc)) < 0)
			goto fail_early;
		t0 = ib_now();
		r = ib_share_pull(rc->remote, rc->cache, &sl, &pw, rc->limits.disk ? rc->limits.disk : UINT64_MAX);
		if (r > 0 && (r = ib_cache_share_lock(lockfd)) == 0) {
			rc->held[index] = lockfd;
			set_source(b, index, IB_SOURCE_REMOTE);
			set_layer(b, index, IB_LAYER_CACHED, ib_now() - t0);
			emit(rc->prog, "[%zu/%zu] %s: pulled from the remote in %.1fs (%.12s)\n", index + 1,
			     plan->nlayers, l->kind, ib_now() - t0, l->key);
			return 0;
		}
		if (r < 0)
			emit(rc->prog, "warning: %s; building it here\n", ib_error_last());
		ib_error_clear();
		err = 0;
	}
	if (waited)
		emit(rc->prog, "[%zu/%zu] %s: waited for another build of this layer\n", index + 1, plan->nlayers,
		     l->kind);
	set_layer(b, index, IB_LAYER_RUNNING, -1);
	emit(rc->prog, "[%zu/%zu] %s %.200s\n", index + 1, plan->nlayers, l->kind,
	     index == 0 ? plan->spec->base : l->step ? l->canonical : plan->spec->python_version);
	ib_buf_reset(&rc->prog->tail);
	t0 = ib_now();
	if ((err = ib_cache_mktemp(rc->cache, &scratch, &tmplock)) < 0)
		goto out;
	upper = ib_xasprintf("%s/upper", scratch);
	walk = (ib_walk_opts){ .deadline = rc->deadline, .cancel = rc->opts->cancel, .what = "the layer" };
	if (index == 0)
		err = build_base(rc, upper);
	else
		err = build_step(rc, index, upper, scratch, &walk);
	if (err)
		goto out;
	if ((err = ib_junk_remove(upper)) < 0 || (err = ib_tree_normalise(upper, plan->epoch, &walk)) < 0)
		goto out;
	/* the parent is indexed before its child */
	if ((err = finish_pending(rc)) < 0)
		goto out;
	if (index + 1 < plan->nlayers) {
		/* the next step runs on this tree while it is hashed and synced */
		defer_commit(rc, index, &scratch, &tmplock, &upper, &lockfd, ib_now() - t0);
		goto out;
	}
	if ((err = ib_cache_layer_seal(upper, &walk, &seal)) < 0)
		goto out;
	err = ib_cache_layer_commit_sealed(rc->cache, l->key, index ? plan->layers[index - 1].key : NULL, l->kind,
					   l->canonical, upper, ib_now() - t0, &seal, NULL);
	/* Built: keep using it (shared) for the rest of the build. */
	if (!err && (err = ib_cache_share_lock(lockfd)) == 0) {
		rc->held[index] = lockfd;
		lockfd = -1;
	}
out:
	/* a failed step still indexes its good parent */
	if (err)
		finish_pending_quietly(rc);
	if (err) {
		char *tail = tail_of(&rc->prog->tail);
		set_layer(b, index, IB_LAYER_FAILED, ib_now() - t0);
		pthread_mutex_lock(&b->mu);
		free(b->log_tail);
		b->log_tail = tail;
		pthread_mutex_unlock(&b->mu);
	} else {
		double secs = ib_now() - t0;
		set_layer(b, index, IB_LAYER_DONE, secs);
		emit(rc->prog, "[%zu/%zu] %s: done in %.1fs (%.12s)\n", index + 1, plan->nlayers, l->kind, secs,
		     l->key);
	}
	ib_cache_rmtemp(scratch, tmplock);
	free(scratch);
	free(upper);
	ib_cache_unlock(lockfd);
	return err;
fail_early:
	set_layer(b, index, IB_LAYER_FAILED, -1);
	return err;
}

static int export_image(struct run_ctx *rc)
{
	ib_build *b = rc->b;
	const ib_plan *plan = rc->plan;
	ib_image_info img = { 0 };
	ib_image_meta *final_meta = NULL;
	char *scratch = NULL, *ext4 = NULL;
	struct stat st;
	int err, tmplock = -1;
	double t0 = ib_now();

	emit(rc->prog, "[export] writing ext4 image %.12s\n", plan->image_id);
	snprintf(img.id, sizeof(img.id), "%s", plan->image_id);
	snprintf(img.top_key, sizeof(img.top_key), "%s", plan->layers[plan->nlayers - 1].key);
	snprintf(img.arch, sizeof(img.arch), "%s", plan->arch);
	img.meta = ib_export_meta_of_plan(plan);
	img.nlayers = plan->nlayers;
	img.layers = ib_xcalloc(plan->nlayers + 1, sizeof(char *));
	for (size_t i = 0; i < plan->nlayers; i++)
		img.layers[i] = ib_xstrdup(plan->layers[i].key);

	if ((err = ib_cache_mktemp(rc->cache, &scratch, &tmplock)) < 0)
		goto out;
	ext4 = ib_xasprintf("%s/image.ext4", scratch);
	if ((err = ib_export_image(rc->cache, rc->cfg, &img, ext4, false, &final_meta)) < 0)
		goto out;
	/* the index keeps the metadata as the image holds it */
	ib_image_meta_free(img.meta);
	img.meta = final_meta;
	/* the data digest (what verify checks) costs the content's reading; the file's SHA-256 is made when asked */
	if ((err = ib_sha256_file_data(NULL, img.data_digest, ext4)) < 0)
		goto out;
	if (stat(ext4, &st) < 0) {
		err = ib_error_set_errno(errno, "cannot stat '%s'", ext4);
		goto out;
	}
	img.ext4_bytes = (uint64_t)st.st_size;
	if ((err = ib_cache_image_commit(rc->cache, &img, ext4)) < 0)
		goto out;
	pthread_mutex_lock(&b->mu);
	memcpy(b->ext4_sha256, img.ext4_sha256, sizeof(b->ext4_sha256));
	b->ext4_bytes = img.ext4_bytes;
	pthread_mutex_unlock(&b->mu);
	emit(rc->prog, "[export] done in %.1fs: %llu bytes (%llu allocated)\n", ib_now() - t0,
	     (unsigned long long)img.ext4_bytes, (unsigned long long)st.st_blocks * 512);
out:
	ib_image_info_clear(&img);
	ib_cache_rmtemp(scratch, tmplock);
	free(scratch);
	free(ext4);
	return err;
}

/*
 * The steps' resolver config: the one address pasta forwards to the host's
 * resolver, and the host's search domains and options.
 */
static int write_resolv_conf(const char *path)
{
	char *data = NULL, *line, *save = NULL;
	ib_buf b = IB_BUF_INIT;
	size_t len = 0;
	int err;

	ib_buf_puts(&b, "nameserver " IB_SANDBOX_DNS "\n");
	if (ib_read_file(&data, &len, "/etc/resolv.conf", 1 << 20) == 0) {
		for (line = strtok_r(data, "\n", &save); line; line = strtok_r(NULL, "\n", &save))
			if (!strncmp(line, "search", 6) || !strncmp(line, "domain", 6) || !strncmp(line, "options", 7))
				ib_buf_printf(&b, "%s\n", line);
	} else {
		ib_error_clear();
	}
	err = ib_write_file_atomic(path, b.ptr, b.len, 0644);
	free(data);
	ib_buf_free(&b);
	return err;
}

/* The loopback port of the pip index, when it is on this host: steps may reach it. */
static size_t index_ports(const char *url, uint16_t *ports)
{
	const char *host, *end, *colon = NULL;
	uint64_t port = 80;

	if (!url)
		return 0;
	if (!strncmp(url, "http://", 7)) {
		host = url + 7;
	} else if (!strncmp(url, "https://", 8)) {
		host = url + 8;
		port = 443;
	} else {
		return 0;
	}
	/* IPv4 only, as pasta runs (--ipv4-only): an index at [::1] stays out of reach */
	if (strncmp(host, "127.", 4) && strncmp(host, "localhost", 9))
		return 0;
	end = host + strcspn(host, "/");
	for (const char *c = host; c < end; c++)
		if (*c == ':')
			colon = c;
	if (colon) {
		char *digits = ib_xstrndup(colon + 1, (size_t)(end - colon - 1));
		if (ib_parse_u64(&port, digits, 65535) < 0) {
			ib_error_clear();
			port = 0;
		}
		free(digits);
	}
	if (!port)
		return 0;
	ports[0] = (uint16_t)port;
	return 1;
}

/* ib-sandbox: beside the program (build/), else installed. */
static char *find_helper(const ib_config *cfg)
{
	if (cfg->program_dir) {
		char *p = ib_xasprintf("%s/ib-sandbox", cfg->program_dir);
		if (access(p, R_OK) == 0)
			return p;
		free(p);
	}
	return ib_xstrdup("/usr/lib/imagebuilder/ib-sandbox");
}

/* The build's scratch: the steps' resolver config, the sandbox's makings, the apt state. */
static int prepare(struct run_ctx *rc, char **scratch, int *tmplock)
{
	int err;

	if ((err = ib_cache_mktemp(rc->cache, scratch, tmplock)) < 0)
		return err;
	rc->resolv = ib_xasprintf("%s/resolv.conf", *scratch);
	if ((err = write_resolv_conf(rc->resolv)) < 0)
		return err;
	rc->helper = find_helper(rc->cfg);
	{
		static unsigned counter;
		unsigned char rnd[4] = { 0 };
		char name[64], hex[9];

		/*
		 * A build killed with -9 (or at a crash point) leaves its group
		 * behind: a later process with the same pid must not meet it.
		 */
		if (getentropy(rnd, sizeof(rnd)) < 0)
			memset(rnd, 0, sizeof(rnd));
		ib_hex(hex, rnd, sizeof(rnd));
		snprintf(name, sizeof(name), "b-%ld-%u-%s", (long)getpid(),
			 __atomic_add_fetch(&counter, 1, __ATOMIC_RELAXED), hex);
		if ((err = ib_cgroup_create(&rc->cgroup, name, &rc->limits)) < 0)
			return err;
	}
	rc->runner = rc->opts->runner ? rc->opts->runner : ib_runner_of(rc->cfg->runner);
	if (rc->runner == &ib_runner_vm && !ib_vm_runs(rc->plan->arch)) {
		emit(rc->prog, "vm: no VM for %s on this host: its steps run in the namespace runner (qemu-user)\n",
		     rc->plan->arch);
		rc->runner = &ib_runner_namespace;
	}
	if (rc->runner == &ib_runner_vm) {
		struct utsname u;
		if (uname(&u) == 0)
			rc->vm_init = ib_export_find_init(rc->cfg, u.machine);
	}
	rc->sandbox = (ib_sandbox_cfg){
		.uid = rc->cfg->idmap_uid,
		.gid = rc->cfg->idmap_gid,
		.helper = rc->helper,
		.ports = rc->ports,
		.nports = index_ports(rc->cfg->pip_index_url, rc->ports),
		.cgroups = (const char *const *)rc->cgroup.dirs,
		.arch = rc->plan->arch,
		.cache_dir = ib_cache_dir(rc->cache),
		.vm_kernel = rc->cfg->vm_kernel,
		.vm_init = rc->vm_init,
		.vm_dir = *scratch,
		.limits = &rc->limits,
		.epoch = rc->plan->epoch,
	};
	if (rc->limits.disk && (err = ib_disk_open(&rc->disk, *scratch, rc->limits.disk)) < 0)
		return err;
	return ib_apt_open(&rc->apt, ib_cache_dir(rc->cache), rc->plan->arch,
			   rc->disk.mnt ? rc->disk.mnt : *scratch);
}

/* The image is in the cache, exported with this program's init: 1 and every layer marked cached. */
static int found_cached(struct run_ctx *rc)
{
	ib_build *b = rc->b;
	const ib_plan *plan = rc->plan;
	ib_image_info img = { 0 };
	int r;

	if ((r = ib_cache_image_get(rc->cache, plan->image_id, NULL)) <= 0)
		return r;
	if ((r = ib_cache_image_get(rc->cache, plan->image_id, &img)) <= 0)
		return r < 0 ? r : ib_error_set("image '%s' vanished from the cache", plan->image_id);
	if (ib_export_init_stale(rc->cfg, img.meta)) {
		emit(rc->prog, "image %.12s was exported with another init: exporting it again\n", plan->image_id);
		ib_image_info_clear(&img);
		return 0;
	}
	for (size_t i = 0; i < plan->nlayers; i++)
		set_layer(b, i, IB_LAYER_CACHED, -1);
	pthread_mutex_lock(&b->mu);
	b->cached = true;
	memcpy(b->ext4_sha256, img.ext4_sha256, sizeof(b->ext4_sha256));
	b->ext4_bytes = img.ext4_bytes;
	pthread_mutex_unlock(&b->mu);
	ib_image_info_clear(&img);
	ib_cache_touch_image(rc->cache, plan->image_id);
	emit(rc->prog, "image %s is cached\n", plan->image_id);
	return 1;
}

/* Does an apt_install step of the spec name package (name, name=version or name:arch)? */
static bool installs(const ib_plan *plan, const char *package)
{
	size_t n = strlen(package);

	for (size_t i = 0; i < plan->nlayers; i++) {
		const ib_step *st = plan->layers[i].step;
		if (!st || !(st->ops->flags & IB_STEP_APT_LISTS))
			continue;
		for (size_t k = 0; k < json_array_size(st->arg); k++) {
			const char *p = json_string_value(json_array_get(st->arg, k));
			if (p && !strncmp(p, package, n) && (!p[n] || p[n] == '=' || p[n] == ':'))
				return true;
		}
	}
	return false;
}

/* What the spec asks for that will not work as its author likely expects. */
static void warn(struct progress *prog, const ib_plan *plan)
{
	if (installs(plan, "systemd-sysv") && !installs(plan, "udev"))
		emit(prog, "warning: the spec installs systemd-sysv without udev: at boot systemd waits 90 s for the "
			   "serial console (dev-ttyS0.device) before it gives up; add udev (README, \"Booting an "
			   "image\")\n");
}

/*
 * The layers this build made or found here, to the remote, unless it has
 * them (a push that failed before is retried so); a failure is a warning.
 * Returns how many pushes failed; the first one's reason stays in *first.
 */
static int push_built(struct run_ctx *rc, char **first)
{
	const ib_plan *plan = rc->plan;
	int failed = 0;

	if (!rc->remote)
		return 0;
	for (size_t i = 0; i < plan->nlayers; i++) {
		const ib_plan_layer *l = &plan->layers[i];
		ib_share_layer sl = { l->key, i ? plan->layers[i - 1].key : "", l->kind, l->canonical };
		ib_layer_source src;
		int r, lockfd = -1;

		pthread_mutex_lock(&rc->b->mu);
		src = rc->b->layers[i].source;
		pthread_mutex_unlock(&rc->b->mu);
		if (src != IB_SOURCE_BUILT && src != IB_SOURCE_CACHE)
			continue;
		/* a cached image holds no layer: hold each (shared) while it is read, so gc leaves it */
		if (rc->held[i] < 0 &&
		    (ib_cache_lock_layer(rc->cache, l->key, IB_LOCK_SHARED | IB_LOCK_NOWAIT, NULL, 0, &lockfd, NULL) < 0 ||
		     ib_cache_layer_get(rc->cache, l->key, NULL) <= 0)) {
			ib_cache_unlock(lockfd);
			ib_error_clear();
			continue;
		}
		r = ib_share_push(rc->remote, rc->cache, &sl, NULL);
		ib_cache_unlock(lockfd);
		if (r < 0) {
			emit(rc->prog, "warning: %s\n", ib_error_last());
			if (!failed++ && first)
				*first = ib_xstrdup(ib_error_last());
			ib_error_clear();
		} else if (r > 0) {
			emit(rc->prog, "[%zu/%zu] %s: pushed to the remote (%.12s)\n", i + 1, plan->nlayers, l->kind,
			     l->key);
		}
	}
	return failed;
}

/* The image, to the remote, for workers to pull (`imagebuilder pull`); a failure is a warning (1). */
static int push_image(struct run_ctx *rc, char **first)
{
	int r;

	if (!rc->remote)
		return 0;
	if ((r = ib_share_image_push(rc->remote, rc->cache, rc->plan->image_id)) < 0) {
		emit(rc->prog, "warning: %s\n", ib_error_last());
		if (first && !*first)
			*first = ib_xstrdup(ib_error_last());
		ib_error_clear();
		return 1;
	}
	if (r > 0)
		emit(rc->prog, "[export] image %.12s pushed to the remote\n", rc->plan->image_id);
	return 0;
}

/*
 * warm --push, with the image cached: is every layer here or in the
 * remote?  A layer in neither (gc took it here, the remote never had it)
 * must be made again for the remote to have the whole spec.
 */
static bool layers_reachable(struct run_ctx *rc)
{
	const ib_plan *plan = rc->plan;

	for (size_t i = 0; i < plan->nlayers; i++) {
		if (ib_cache_layer_get(rc->cache, plan->layers[i].key, NULL) > 0)
			continue;
		if (ib_share_layer_exists(rc->remote, plan->layers[i].key) <= 0) {
			ib_error_clear();
			emit(rc->prog, "[%zu/%zu] %s: neither cached nor in the remote: making the layers again\n",
			     i + 1, plan->nlayers, plan->layers[i].kind);
			return false;
		}
	}
	return true;
}

int ib_build_run(ib_build *b, ib_cache *cache, const ib_build_opts *opts)
{
	const ib_plan *plan = b->plan;
	struct progress prog = { .opts = opts, .tail = IB_BUF_INIT };
	struct run_ctx rc = { .b = b, .plan = plan, .cfg = b->cfg, .cache = cache, .opts = opts, .prog = &prog };
	char *scratch = NULL, *first_failure = NULL;
	int err = 0, tmplock = -1, r, failed;
	bool image_cached = false;
	double timeout = opts->timeout > 0 ? opts->timeout : IB_STEP_TIMEOUT_DEFAULT;

	rc.disk = (ib_disk)IB_DISK_INIT;
	rc.deadline = ib_now() + timeout;
	rc.limits = opts->limits ? *opts->limits : b->cfg->limits;
	warn(&prog, plan);
	rc.held = ib_xmalloc(plan->nlayers * sizeof(*rc.held));
	for (size_t i = 0; i < plan->nlayers; i++)
		rc.held[i] = -1;
	if (b->cfg->remote && ib_remote_open(&rc.remote, b->cfg->remote) == 0) {
		ib_remote_set_chunk(rc.remote, b->cfg->remote_chunk);
		ib_remote_set_abort(rc.remote, rc.deadline, opts->cancel);
	} else if (b->cfg->remote) {
		if (opts->push) {
			err = IB_ERROR;
			goto out;
		}
		/* a remote failure never fails a build */
		emit(&prog, "warning: %s; building without it\n", ib_error_last());
		ib_error_clear();
	}
	if (opts->push && !rc.remote) {
		err = ib_error_set("nothing to push to: give --remote or IMAGEBUILDER_REMOTE");
		goto out;
	}
	if (!opts->force && (r = found_cached(&rc)) != 0) {
		err = r < 0 ? r : 0;
		if (r < 0)
			goto out;
		if (!opts->push || layers_reachable(&rc))
			goto output;
		image_cached = true;
	}

	/* Foreign architectures: check emulation before doing any work. */
	if ((err = ib_binfmt_ensure(plan->machine)) < 0)
		goto out;
	if ((err = prepare(&rc, &scratch, &tmplock)) < 0)
		goto out;
	for (size_t i = 0; i < plan->nlayers; i++) {
		if (opts->cancel && *opts->cancel) {
			err = IB_ECANCELED;
			ib_error_set("build cancelled");
			set_layer(b, i, IB_LAYER_FAILED, -1);
			goto out;
		}
		if (ib_now() >= rc.deadline) {
			err = IB_ETIMEOUT;
			ib_error_set("build timed out after %.0fs", timeout);
			set_layer(b, i, IB_LAYER_FAILED, -1);
			goto out;
		}
		if ((err = build_layer(&rc, i)) < 0) {
			if (err == IB_ETIMEOUT)
				ib_error_set("build timed out after %.0fs", timeout);
			ib_error_prefix("step %zu (%s)", i, plan->layers[i].kind);
			goto out;
		}
	}
	if ((err = finish_pending(&rc)) < 0)
		goto out;
	if (!image_cached && (err = export_image(&rc)) < 0)
		goto out;
output:
	/* everything the image needs, to the remote (what it has already costs a lookup each) */
	failed = push_built(&rc, &first_failure) + push_image(&rc, &first_failure);
	if (failed && opts->push) {
		err = ib_error_set("%d push%s to the remote failed; the first: %s", failed, failed > 1 ? "es" : "",
				   first_failure);
		goto out;
	}
	if (opts->output) {
		char *src = ib_cache_image_path(cache, plan->image_id);
		err = ib_copy_sparse(src, opts->output, 0644);
		free(src);
	}
out:
	if (err) {
		char *msg;

		finish_pending_quietly(&rc);
		msg = ib_xstrdup(ib_error_last());
		push_built(&rc, NULL); /* what was built is good, though the build failed */
		pthread_mutex_lock(&b->mu);
		free(b->error);
		b->error = msg;
		pthread_mutex_unlock(&b->mu);
	}
	ib_remote_close(rc.remote);
	free(first_failure);
	if (rc.runner && rc.runner->finish)
		rc.runner->finish(rc.session);
	free(rc.vm_init);
	ib_cgroup_destroy(&rc.cgroup);
	ib_apt_close(&rc.apt);
	ib_disk_close(&rc.disk);
	ib_cache_rmtemp(scratch, tmplock);
	free(scratch);
	free(rc.resolv);
	free(rc.helper);
	for (size_t i = 0; i < plan->nlayers; i++)
		ib_cache_unlock(rc.held[i]);
	free(rc.held);
	ib_buf_free(&prog.tail);
	return err;
}

#include "builder/cgroup.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "lib/util.h"

#define CGROUP_ROOT	"/sys/fs/cgroup"
#define CGROUP2_MAGIC	0x63677270
#define PARENT		"imagebuilder"

static int put(const char *dir, const char *file, const char *value)
{
	char *path = ib_xasprintf("%s/%s", dir, file);
	int fd = open(path, O_WRONLY | O_CLOEXEC), err = 0;

	if (fd < 0 || ib_write_all(fd, value, strlen(value)) < 0)
		err = ib_error_set_errno(errno, "cannot write '%s' to '%s'", value, path);
	if (fd >= 0)
		close(fd);
	free(path);
	return err;
}

static bool exists(const char *dir, const char *file)
{
	char *path = ib_xasprintf("%s/%s", dir, file);
	bool yes = access(path, F_OK) == 0;

	free(path);
	return yes;
}

/* The value of key in a "key value" file (memory.events, memory.oom_control); 0 when absent. */
static uint64_t keyed(const char *dir, const char *file, const char *key)
{
	char *path = ib_xasprintf("%s/%s", dir, file), *text = NULL, *p;
	size_t len = 0, klen = strlen(key);
	uint64_t v = 0;

	if (ib_read_file(&text, &len, path, 1 << 16) == 0) {
		for (p = text; p && *p; p = strchr(p, '\n') ? strchr(p, '\n') + 1 : NULL)
			if (!strncmp(p, key, klen) && p[klen] == ' ')
				v = strtoull(p + klen + 1, NULL, 10);
	} else {
		ib_error_clear();
	}
	free(text);
	free(path);
	return v;
}

static bool is_cgroup2(const char *path)
{
	struct statfs sf;

	return statfs(path, &sf) == 0 && (unsigned long)sf.f_type == CGROUP2_MAGIC;
}

/* ---- v2 ---- */

/* Enable the controllers dir's children need, as far as dir offers them. */
static int enable(const char *dir, const char *want)
{
	char *path = ib_xasprintf("%s/cgroup.controllers", dir), *have = NULL;
	size_t len = 0;
	ib_buf b = IB_BUF_INIT;
	int err = 0;

	if (ib_read_file(&have, &len, path, 4096) < 0) {
		free(path);
		return -1;
	}
	for (const char *w = want; *w;) {
		size_t n = strcspn(w, " ");
		char *name = ib_xstrndup(w, n);
		char *hit = strstr(have, name);
		if (hit && (hit == have || hit[-1] == ' ') && (hit[n] == ' ' || hit[n] == '\n' || !hit[n]))
			ib_buf_printf(&b, "%s+%s", b.len ? " " : "", name);
		free(name);
		w += n;
		while (*w == ' ')
			w++;
	}
	if (b.len)
		err = put(dir, "cgroup.subtree_control", b.ptr);
	ib_buf_free(&b);
	free(have);
	free(path);
	return err;
}

static void empty_group(const char *dir);

/*
 * The groups of builds whose process is gone (kill -9, a crash) under
 * parent: b-<pid>-..., the pid dead.  What is left in one is killed, and
 * the group removed.
 */
static void sweep(const char *parent)
{
	DIR *d = opendir(parent);
	struct dirent *e;

	if (!d)
		return;
	while ((e = readdir(d))) {
		char *end, *dir;
		long pid;

		if (strncmp(e->d_name, "b-", 2))
			continue;
		pid = strtol(e->d_name + 2, &end, 10);
		if (end == e->d_name + 2 || *end != '-' || pid <= 0 || (kill((pid_t)pid, 0) == 0 || errno != ESRCH))
			continue;
		dir = ib_xasprintf("%s/%s", parent, e->d_name);
		empty_group(dir);
		rmdir(dir);
		free(dir);
	}
	closedir(d);
}

static int create_v2(ib_cgroup *cg, const char *name, const ib_limits *lim)
{
	char *parent = ib_xasprintf("%s/%s", CGROUP_ROOT, PARENT), *dir = NULL, val[64];
	int err;

	if (mkdir(parent, 0755) < 0 && errno != EEXIST) {
		err = ib_error_set_errno(errno, "cannot create the cgroup '%s'", parent);
		goto out;
	}
	/* the root offers what systemd enabled; the parent must pass them on to the builds */
	if ((err = enable(CGROUP_ROOT, "memory pids cpu")) < 0 || (err = enable(parent, "memory pids cpu")) < 0) {
		ib_error_prefix("cannot enable the memory, pids and cpu controllers for '%s'", parent);
		goto out;
	}
	sweep(parent);
	dir = ib_xasprintf("%s/%s", parent, name);
	if (mkdir(dir, 0755) < 0) {
		err = ib_error_set_errno(errno, "cannot create the cgroup '%s'", dir);
		goto out;
	}
	cg->v2 = true;
	cg->dirs[0] = dir;
	dir = NULL;
	if (lim->memory) {
		if (!exists(cg->dirs[0], "memory.max")) {
			err = ib_error_set("no memory controller for '%s': --memory cannot be enforced", cg->dirs[0]);
			goto out;
		}
		snprintf(val, sizeof(val), "%llu", (unsigned long long)lim->memory);
		if ((err = put(cg->dirs[0], "memory.max", val)) < 0)
			goto out;
		if (exists(cg->dirs[0], "memory.swap.max") && (err = put(cg->dirs[0], "memory.swap.max", "0")) < 0)
			goto out;
		cg->memory = cg->dirs[0];
		cg->oom_base = keyed(cg->dirs[0], "memory.events", "oom_kill");
	}
	if (lim->pids) {
		snprintf(val, sizeof(val), "%llu", (unsigned long long)lim->pids);
		if (!exists(cg->dirs[0], "pids.max")) {
			err = ib_error_set("no pids controller for '%s': --pids cannot be enforced", cg->dirs[0]);
			goto out;
		}
		cg->pids = cg->dirs[0];
		if ((err = put(cg->dirs[0], "pids.max", val)) < 0)
			goto out;
	}
	if (lim->cpus) {
		snprintf(val, sizeof(val), "%llu 100000", (unsigned long long)(lim->cpus * 100));
		if (!exists(cg->dirs[0], "cpu.max")) {
			err = ib_error_set("no cpu controller for '%s': --cpus cannot be enforced", cg->dirs[0]);
			goto out;
		}
		if ((err = put(cg->dirs[0], "cpu.max", val)) < 0)
			goto out;
	}
out:
	free(parent);
	free(dir);
	return err;
}

/* ---- v1 (and hybrid) ---- */

/* This process's group in the v1 hierarchy of controller, from /proc/self/cgroup; NULL when none. */
static char *own_v1_group(const char *controller)
{
	char *text = NULL, *line, *save = NULL, *found = NULL;
	size_t len = 0;

	if (ib_read_file(&text, &len, "/proc/self/cgroup", 1 << 16) < 0) {
		ib_error_clear();
		return NULL;
	}
	for (line = strtok_r(text, "\n", &save); line && !found; line = strtok_r(NULL, "\n", &save)) {
		char *c1 = strchr(line, ':'), *c2 = c1 ? strchr(c1 + 1, ':') : NULL;
		if (!c2)
			continue;
		*c2 = '\0';
		for (char *tok = c1 + 1; tok && *tok;) {
			size_t n = strcspn(tok, ",");
			if (n == strlen(controller) && !strncmp(tok, controller, n))
				found = ib_xstrdup(c2 + 1);
			tok += n;
			if (*tok == ',')
				tok++;
		}
	}
	free(text);
	return found;
}

/* A group name under controller's hierarchy: mount/<own group>/imagebuilder/<name>. */
static int v1_group(ib_cgroup *cg, size_t slot, const char *controller, const char *name, char **out)
{
	char *own = own_v1_group(controller), *parent, *dir;
	int err = 0;

	*out = NULL;
	if (!own)
		return ib_error_set("no cgroup hierarchy with the %s controller on this host", controller);
	parent = ib_xasprintf("%s/%s%s/%s", CGROUP_ROOT, controller, strcmp(own, "/") ? own : "", PARENT);
	free(own);
	if (mkdir(parent, 0755) < 0 && errno != EEXIST) {
		err = ib_error_set_errno(errno, "cannot create the cgroup '%s'", parent);
		free(parent);
		return err;
	}
	sweep(parent);
	dir = ib_xasprintf("%s/%s", parent, name);
	free(parent);
	if (mkdir(dir, 0755) < 0) {
		err = ib_error_set_errno(errno, "cannot create the cgroup '%s'", dir);
		free(dir);
		return err;
	}
	cg->dirs[slot] = dir;
	*out = dir;
	return 0;
}

static int create_v1(ib_cgroup *cg, const char *name, const ib_limits *lim)
{
	size_t slot = 0;
	char *dir, val[64];
	int err;

	if (lim->memory) {
		if ((err = v1_group(cg, slot++, "memory", name, &dir)) < 0)
			return err;
		snprintf(val, sizeof(val), "%llu", (unsigned long long)lim->memory);
		if ((err = put(dir, "memory.limit_in_bytes", val)) < 0)
			return err;
		/* memory and swap together at the same limit: no swap */
		if (exists(dir, "memory.memsw.limit_in_bytes") && (err = put(dir, "memory.memsw.limit_in_bytes", val)) < 0)
			return err;
		cg->memory = dir;
		cg->oom_base = keyed(dir, "memory.oom_control", "oom_kill");
	}
	if (lim->pids) {
		if ((err = v1_group(cg, slot++, "pids", name, &dir)) < 0)
			return err;
		snprintf(val, sizeof(val), "%llu", (unsigned long long)lim->pids);
		cg->pids = dir;
		if ((err = put(dir, "pids.max", val)) < 0)
			return err;
	}
	if (lim->cpus) {
		if ((err = v1_group(cg, slot++, "cpu", name, &dir)) < 0)
			return err;
		snprintf(val, sizeof(val), "%llu", (unsigned long long)(lim->cpus * 100));
		if ((err = put(dir, "cpu.cfs_period_us", "100000")) < 0 || (err = put(dir, "cpu.cfs_quota_us", val)) < 0)
			return err;
	}
	return 0;
}

int ib_cgroup_create(ib_cgroup *cg, const char *name, const ib_limits *lim)
{
	int err;

	memset(cg, 0, sizeof(*cg));
	if (!lim->memory && !lim->pids && !lim->cpus)
		return 0;
	err = is_cgroup2(CGROUP_ROOT) ? create_v2(cg, name, lim) : create_v1(cg, name, lim);
	if (err < 0) {
		ib_error_prefix("build limits (--memory, --pids, --cpus)");
		ib_cgroup_destroy(cg);
	}
	return err;
}

/* Kill every process listed in dir's cgroup.procs, until none is left (or 5 s). */
static void empty_group(const char *dir)
{
	char *path = ib_xasprintf("%s/cgroup.procs", dir);

	for (int round = 0; round < 500; round++) {
		char *text = NULL, *p;
		size_t len = 0;
		bool any = false;

		if (ib_read_file(&text, &len, path, 1 << 20) < 0) {
			ib_error_clear();
			break;
		}
		for (p = text; *p;) {
			long pid = strtol(p, &p, 10);
			if (pid > 0) {
				kill((pid_t)pid, SIGKILL);
				any = true;
			}
			while (*p == '\n')
				p++;
			if (*p && (*p < '0' || *p > '9'))
				break;
		}
		free(text);
		if (!any)
			break;
		usleep(10000);
	}
	free(path);
}

void ib_cgroup_destroy(ib_cgroup *cg)
{
	/* cleanup's own failures are not reported: the caller's message stays */
	char *msg = ib_xstrdup(ib_error_last());

	for (size_t i = 0; i < sizeof(cg->dirs) / sizeof(cg->dirs[0]) && cg->dirs[i]; i++) {
		if (cg->v2 && exists(cg->dirs[i], "cgroup.kill"))
			put(cg->dirs[i], "cgroup.kill", "1");
		empty_group(cg->dirs[i]);
		for (int tries = 0; rmdir(cg->dirs[i]) < 0 && errno == EBUSY && tries < 100; tries++)
			usleep(10000);
		free(cg->dirs[i]);
		cg->dirs[i] = NULL;
	}
	if (*msg)
		ib_error_set("%s", msg);
	else
		ib_error_clear();
	free(msg);
	memset(cg, 0, sizeof(*cg));
}

bool ib_cgroup_pids_hit(const ib_cgroup *cg)
{
	return cg->pids && keyed(cg->pids, "pids.events", "max") > 0;
}

bool ib_cgroup_oom(const ib_cgroup *cg)
{
	if (!cg->memory)
		return false;
	return (cg->v2 ? keyed(cg->memory, "memory.events", "oom_kill")
		       : keyed(cg->memory, "memory.oom_control", "oom_kill")) > cg->oom_base;
}

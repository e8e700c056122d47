/*
 * Checking the cache, and repairing it: ib_cache_verify(),
 * ib_cache_orphans() and their --repair.  See cache.h.
 */
#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cache/cache-internal.h"
#include "layer/tree.h"
#include "lib/crash.h"
#include "lib/util.h"

struct verify_ctx {
	ib_cache_report_cb report;
	void *arg;
	unsigned problems;
	unsigned repaired;
};

static void vreport(struct verify_ctx *v, const char *what, bool problem, const char *fmt, ...) IB_PRINTF(4, 5);

static void vreport(struct verify_ctx *v, const char *what, bool problem, const char *fmt, ...)
{
	char msg[1024];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if (problem)
		v->problems++;
	if (v->report)
		v->report(what, msg, problem, v->arg);
}

static bool is_hex64_prefix(const char *s)
{
	for (int i = 0; i < 64; i++)
		if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
			return false;
	return true;
}

/* "<64 hex>" + rest; *gen from ".<digits>" before the rest (0 when absent).  false: not ours. */
static bool parse_entry(const char *name, const char *rest, char id[IB_SHA256_HEX], int64_t *gen)
{
	size_t n = strlen(name), r = strlen(rest);
	uint64_t g = 0;

	if (n < 64 + r || !is_hex64_prefix(name) || strcmp(name + n - r, rest))
		return false;
	memcpy(id, name, 64);
	id[64] = '\0';
	if (n > 64 + r) {
		char digits[24];
		size_t k = n - 64 - r - 1;
		if (name[64] != '.' || k == 0 || k >= sizeof(digits))
			return false;
		memcpy(digits, name + 65, k);
		digits[k] = '\0';
		if (ib_parse_u64(&g, digits, INT64_MAX) < 0 || g == 0)
			return false;
	}
	*gen = (int64_t)g;
	return true;
}

/*
 * Is the layer or image named by (table, id, gen) an orphan: no row names
 * that generation?  Taken under the item's lock (nowait), so that one being
 * committed right now is left alone: 1 orphan (*lockfd held), 0 not, <0
 * error.
 */
/* Does a row name it: the layer or image of that generation (and the artifact, kind >= 0)? */
static int named(ib_cache *c, const char *table, const char *id, int64_t gen, int kind)
{
	int64_t row = 0;
	int r;

	pthread_mutex_lock(&c->lock);
	r = ib_cache__row_gen(c, table, id, &row);
	if (r == 1)
		r = row != gen ? 0 : kind < 0 ? 1 : ib_cache__artifact_indexed(c, id, (ib_artifact)kind, gen);
	pthread_mutex_unlock(&c->lock);
	return r;
}

static int orphan_locked(ib_cache *c, const char *table, const char *id, int64_t gen, int kind, int *lockfd)
{
	bool layers = !strcmp(table, "layers");
	int r;

	*lockfd = -1;
	/* most entries are named by their row: no lock needed to see that */
	if ((r = named(c, table, id, gen, kind)) != 0)
		return r < 0 ? r : 0;
	r = layers ? ib_cache_lock_layer(c, id, IB_LOCK_NOWAIT, NULL, 0, lockfd, NULL)
		   : ib_cache__lock_image(c, id, true, lockfd);
	if (r == IB_EEXISTS)
		return 0;
	if (r < 0)
		return r;
	if ((r = named(c, table, id, gen, kind)) != 0) {
		ib_cache_unlock(*lockfd);
		*lockfd = -1;
		return r < 0 ? r : 0;
	}
	return 1;
}

/* One orphan found: report it, and remove it when asked. */
static int orphan(ib_cache *c, struct verify_ctx *v, ib_orphans *res, bool remove, const char *kind,
		  const char *path, bool dir)
{
	uint64_t bytes = ib_du(path);
	int err = 0;

	if (remove) {
		if (dir)
			err = ib_cache__discard_dir(c, path);
		else if (unlink(path) < 0 && errno != ENOENT)
			err = ib_error_set_errno(errno, "cannot remove '%s'", path);
		if (err)
			return err;
	}
	res->count++;
	res->bytes += bytes;
	vreport(v, kind, false, "%s '%s' (%llu bytes): nothing names it%s", dir ? "directory" : "file", path,
		(unsigned long long)bytes, remove ? "; removed" : "; reclaimable (gc, cache verify --repair)");
	return 0;
}

/* layers/<key>[.<gen>] and images/<id>[.<gen>].ext4 that no row names. */
static int sweep_store(ib_cache *c, struct verify_ctx *v, ib_orphans *res, bool remove, const char *table)
{
	bool layers = !strcmp(table, "layers");
	char *dir = ib_xasprintf("%s/%s", ib_cache_dir(c), layers ? "layers" : "images");
	DIR *d = opendir(dir);
	struct dirent *de;
	int err = 0;

	if (!d) {
		err = ib_error_set_errno(errno, "cannot read '%s'", dir);
		free(dir);
		return err;
	}
	while (!err && (de = readdir(d))) {
		char id[IB_SHA256_HEX], *path;
		int64_t gen;
		int lockfd, r, kind = -1;

		if (de->d_name[0] == '.')
			continue;
		if (layers) {
			if (!parse_entry(de->d_name, "", id, &gen))
				continue;
		} else if (!parse_entry(de->d_name, ".ext4", id, &gen)) {
			/* an artifact: <id>[.<gen>].ext4.<kind> */
			for (int k = 0; k < IB_ARTIFACT_COUNT && kind < 0; k++) {
				char *rest = ib_xasprintf(".ext4%s", ib_cache__artifact_suffix[k]);
				if (parse_entry(de->d_name, rest, id, &gen))
					kind = k;
				free(rest);
			}
			if (kind < 0)
				continue;
		}
		if ((r = orphan_locked(c, table, id, gen, kind, &lockfd)) <= 0) {
			err = r;
			continue;
		}
		path = ib_xasprintf("%s/%s", dir, de->d_name);
		err = orphan(c, v, res, remove, layers ? "layer" : kind < 0 ? "image" : "artifact", path, layers);
		free(path);
		ib_cache_unlock(lockfd);
	}
	closedir(d);
	free(dir);
	return err;
}

/* Partial downloads of earlier versions (downloads/<x>.part.<pid>) whose process is gone. */
static int sweep_downloads(ib_cache *c, struct verify_ctx *v, ib_orphans *res, bool remove)
{
	char *dir = ib_xasprintf("%s/downloads", ib_cache_dir(c));
	DIR *d = opendir(dir);
	struct dirent *de;
	int err = 0;

	while (d && !err && (de = readdir(d))) {
		const char *part = strstr(de->d_name, ".part.");
		uint64_t pid;

		if (!part || ib_parse_u64(&pid, part + 6, INT32_MAX) < 0 || (kill((pid_t)pid, 0) == 0 || errno != ESRCH))
			continue;
		char *path = ib_xasprintf("%s/%s", dir, de->d_name);
		err = orphan(c, v, res, remove, "download", path, false);
		free(path);
	}
	if (d)
		closedir(d);
	free(dir);
	return err;
}

/* Git mirrors a crash left half made (git/<hash>.git.new-<pid>) whose process is gone. */
static int sweep_git(ib_cache *c, struct verify_ctx *v, ib_orphans *res, bool remove)
{
	char *dir = ib_xasprintf("%s/git", ib_cache_dir(c));
	DIR *d = opendir(dir);
	struct dirent *de;
	int err = 0;

	while (d && !err && (de = readdir(d))) {
		const char *part = strstr(de->d_name, ".git.new-");
		uint64_t pid;

		if (!part || ib_parse_u64(&pid, part + 9, INT32_MAX) < 0 || (kill((pid_t)pid, 0) == 0 || errno != ESRCH))
			continue;
		char *path = ib_xasprintf("%s/%s", dir, de->d_name);
		err = orphan(c, v, res, remove, "git", path, true);
		free(path);
	}
	if (d)
		closedir(d);
	free(dir);
	return err;
}

int ib_cache_orphans(ib_cache *c, bool remove, ib_cache_report_cb report, void *arg, ib_orphans *out)
{
	struct verify_ctx v = { report, arg, 0, 0 };
	ib_orphans res = { 0 };
	int err;

	if ((err = ib_cache__sweep_tmp(c, remove, &res.count, &res.bytes)) < 0 ||
	    (err = sweep_store(c, &v, &res, remove, "layers")) < 0 ||
	    (err = sweep_store(c, &v, &res, remove, "images")) < 0 ||
	    (err = sweep_downloads(c, &v, &res, remove)) < 0 || (err = sweep_git(c, &v, &res, remove)) < 0)
		return err;
	if (out)
		*out = res;
	return 0;
}

/* Remove an image's row and file (repair: it does not verify). */
static int drop_image(ib_cache *c, const char *id)
{
	sqlite3_stmt *st = NULL;
	int64_t gen = 0;
	char *path = NULL;
	int err = 0, lockfd = -1;

	if ((err = ib_cache__lock_image(c, id, false, &lockfd)) < 0)
		return err;
	pthread_mutex_lock(&c->lock);
	if ((err = ib_cache__row_gen(c, "images", id, &gen)) > 0) {
		path = ib_cache__image_file(c, id, gen);
		err = 0;
		if (sqlite3_prepare_v2(c->db, "DELETE FROM images WHERE id = ?", -1, &st, NULL) != SQLITE_OK)
			err = ib_cache__db_error(c->db, "cannot update the cache index");
		else {
			sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
			if (sqlite3_step(st) != SQLITE_DONE)
				err = ib_cache__db_error(c->db, "cannot update the cache index");
		}
		sqlite3_finalize(st);
	}
	pthread_mutex_unlock(&c->lock);
	if (!err && path)
		ib_cache__unlink_image_files(path);
	ib_cache_unlock(lockfd);
	free(path);
	return err < 0 ? err : 0;
}

/* Remove a layer's row and directory (repair); a layer in use is left alone (1). */
static int drop_layer(ib_cache *c, const char *key)
{
	int lockfd = -1, err;

	err = ib_cache_lock_layer(c, key, IB_LOCK_NOWAIT, NULL, 0, &lockfd, NULL);
	if (err == IB_EEXISTS)
		return 1;
	if (err < 0)
		return err;
	err = ib_cache_layer_remove(c, key);
	ib_cache_unlock(lockfd);
	return err;
}

struct strs {
	char **v;
	size_t n;
};

static void strs_add(struct strs *s, const char *a)
{
	s->v = ib_xrealloc(s->v, (s->n + 1) * sizeof(*s->v));
	s->v[s->n++] = ib_xstrdup(a);
}

static void strs_free(struct strs *s)
{
	for (size_t i = 0; i < s->n; i++)
		free(s->v[i]);
	free(s->v);
	s->v = NULL;
	s->n = 0;
}

static bool strs_has(const struct strs *s, const char *a)
{
	for (size_t i = 0; i < s->n; i++)
		if (!strcmp(s->v[i], a))
			return true;
	return false;
}

/* Rows of a query: column 0 and 1 of each. */
static int query2(ib_cache *c, const char *sql, struct strs *a, struct strs *b)
{
	sqlite3_stmt *st = NULL;
	int rc, err = 0;

	pthread_mutex_lock(&c->lock);
	if (sqlite3_prepare_v2(c->db, sql, -1, &st, NULL) != SQLITE_OK) {
		err = ib_cache__db_error(c->db, "cannot read the cache index");
		goto out;
	}
	while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
		strs_add(a, (const char *)sqlite3_column_text(st, 0));
		strs_add(b, (const char *)sqlite3_column_text(st, 1));
	}
	if (rc != SQLITE_DONE)
		err = ib_cache__db_error(c->db, "cannot read the cache index");
out:
	sqlite3_finalize(st);
	pthread_mutex_unlock(&c->lock);
	return err;
}

/* The compact forms: each row's file there, with the digest the row says; with repair, a bad one goes. */
static int verify_artifacts(ib_cache *c, struct verify_ctx *v, bool repair)
{
	static const char *const kinds[] = { [IB_ARTIFACT_ZST] = "zst", [IB_ARTIFACT_BMAP] = "bmap" };
	struct strs ids = { 0 }, rest = { 0 };
	int err;

	if ((err = query2(c, "SELECT image_id, kind || ' ' || gen || ' ' || sha256 FROM image_artifacts"
			     " ORDER BY image_id, kind", &ids, &rest)) < 0)
		return err;
	for (size_t i = 0; i < ids.n && !err; i++) {
		char kind[16] = "", sha[IB_SHA256_HEX] = "", hex[IB_SHA256_HEX];
		long long gen = 0;
		int k = -1;
		char *file, *path;

		if (sscanf(rest.v[i], "%15s %lld %64s", kind, &gen, sha) != 3)
			continue;
		for (int j = 0; j < IB_ARTIFACT_COUNT; j++)
			if (!strcmp(kinds[j], kind))
				k = j;
		if (k < 0)
			continue;
		file = ib_cache__image_file(c, ids.v[i], gen);
		path = ib_xasprintf("%s%s", file, ib_cache__artifact_suffix[k]);
		if (ib_sha256_file(hex, path) < 0 || strcmp(hex, sha)) {
			vreport(v, ids.v[i], true, "its %s file '%s' is missing or changed", kind, path);
			if (repair) {
				sqlite3_stmt *st = NULL;
				pthread_mutex_lock(&c->lock);
				if (sqlite3_prepare_v2(c->db, "DELETE FROM image_artifacts WHERE image_id = ? AND kind = ?",
						       -1, &st, NULL) != SQLITE_OK)
					err = ib_cache__db_error(c->db, "cannot update the cache index");
				else {
					sqlite3_bind_text(st, 1, ids.v[i], -1, SQLITE_STATIC);
					sqlite3_bind_text(st, 2, kind, -1, SQLITE_STATIC);
					if (sqlite3_step(st) != SQLITE_DONE)
						err = ib_cache__db_error(c->db, "cannot update the cache index");
				}
				sqlite3_finalize(st);
				pthread_mutex_unlock(&c->lock);
				/* the row first: a crash here leaves a file no row names, which gc collects */
				IB_CRASH_POINT("artifact-drop:after-row");
				unlink(path);
				if (!err) {
					v->repaired++;
					vreport(v, ids.v[i], false, "%s removed (repair; made again when asked for)", kind);
				}
			}
		}
		free(file);
		free(path);
	}
	strs_free(&ids);
	strs_free(&rest);
	return err;
}

int ib_cache_verify(ib_cache *c, const ib_verify_opts *opts, ib_cache_report_cb report, void *arg,
		    ib_verify_result *out)
{
	struct verify_ctx v = { report, arg, 0, 0 };
	struct strs keys = { 0 }, digests = { 0 }, ids = { 0 }, shas = { 0 }, li = { 0 }, lk = { 0 };
	struct strs bad_layers = { 0 }, bad_images = { 0 };
	bool repair = opts && opts->repair;
	ib_orphans orph = { 0 };
	char *path = NULL;
	int err;

	if ((err = query2(c, "SELECT key, digest_version || ' ' || digest FROM layers ORDER BY key", &keys,
			  &digests)) < 0 ||
	    (err = query2(c, "SELECT id, CASE WHEN data_digest != '' THEN 'data ' || data_digest"
			     " ELSE 'file ' || ext4_sha256 END FROM images ORDER BY id", &ids, &shas)) < 0 ||
	    (err = query2(c, "SELECT image_id, key FROM image_layers WHERE key NOT IN (SELECT key FROM layers)"
			     " ORDER BY image_id", &li, &lk)) < 0)
		goto out;

	for (size_t i = 0; i < keys.n; i++) {
		char hex[IB_SHA256_HEX];
		free(path);
		path = ib_cache_layer_path(c, keys.v[i]);
		if (access(path, F_OK) < 0) {
			vreport(&v, keys.v[i], true, "layer directory '%s' is missing", path);
			strs_add(&bad_layers, keys.v[i]);
		} else if (ib_tree_digest(hex, path, (int)strtol(digests.v[i], NULL, 10), NULL, NULL, NULL) < 0) {
			vreport(&v, keys.v[i], true, "%s", ib_error_last());
			strs_add(&bad_layers, keys.v[i]);
		} else if (strcmp(hex, strchr(digests.v[i], ' ') + 1)) {
			vreport(&v, keys.v[i], true, "layer content changed: digest %s, expected %s", hex,
				strchr(digests.v[i], ' ') + 1);
			strs_add(&bad_layers, keys.v[i]);
		}
	}
	for (size_t i = 0; i < li.n; i++) {
		vreport(&v, li.v[i], true, "layer '%s' of the image is not in the cache", lk.v[i]);
		if (!strs_has(&bad_images, li.v[i]))
			strs_add(&bad_images, li.v[i]);
	}
	for (size_t i = 0; i < ids.n; i++) {
		char hex[IB_SHA256_HEX];
		free(path);
		path = ib_cache_image_path(c, ids.v[i]);
		/* the data digest where the index has one (reading only data); else the file's SHA-256 */
		bool data = !strncmp(shas.v[i], "data ", 5);
		const char *want = shas.v[i] + 5;
		if ((data ? ib_sha256_file_data(NULL, hex, path) : ib_sha256_file(hex, path)) < 0) {
			vreport(&v, ids.v[i], true, "%s", ib_error_last());
		} else if (!*want && !data) {
			continue; /* neither digest known yet */
		} else if (strcmp(hex, want)) {
			vreport(&v, ids.v[i], true, "image file changed: %s %s, expected %s",
				data ? "data digest" : "sha256", hex, want);
		} else {
			continue;
		}
		if (!strs_has(&bad_images, ids.v[i]))
			strs_add(&bad_images, ids.v[i]);
	}

	if ((err = verify_artifacts(c, &v, repair)) < 0)
		goto out;
	if (repair) {
		/* what does not verify goes (images that need a bad layer with it); what verifies stays */
		struct strs dep_i = { 0 }, dep_k = { 0 };
		if ((err = query2(c, "SELECT image_id, key FROM image_layers", &dep_i, &dep_k)) < 0)
			goto out;
		for (size_t i = 0; i < dep_i.n; i++)
			if (strs_has(&bad_layers, dep_k.v[i]) && !strs_has(&bad_images, dep_i.v[i]))
				strs_add(&bad_images, dep_i.v[i]);
		strs_free(&dep_i);
		strs_free(&dep_k);
		for (size_t i = 0; i < bad_images.n && !err; i++)
			if ((err = drop_image(c, bad_images.v[i])) == 0) {
				v.repaired++;
				vreport(&v, bad_images.v[i], false, "image removed (repair)");
			}
		for (size_t i = 0; i < bad_layers.n && !err; i++) {
			int r = drop_layer(c, bad_layers.v[i]);
			if (r < 0)
				err = r;
			else if (r == 1)
				vreport(&v, bad_layers.v[i], false, "layer in use by a build: left alone");
			else {
				v.repaired++;
				vreport(&v, bad_layers.v[i], false, "layer removed (repair)");
			}
		}
		if (err)
			goto out;
	}
	err = ib_cache_orphans(c, repair, report, arg, &orph);
out:
	if (!err && out) {
		out->problems = v.problems;
		out->repaired = v.repaired;
		out->orphans = orph.count;
		out->orphan_bytes = orph.bytes;
	}
	free(path);
	strs_free(&keys);
	strs_free(&digests);
	strs_free(&ids);
	strs_free(&shas);
	strs_free(&li);
	strs_free(&lk);
	strs_free(&bad_layers);
	strs_free(&bad_images);
	return err;
}

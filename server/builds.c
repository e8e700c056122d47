/*
 * Build records in the cache index (the `builds` table; its columns come
 * from migrations 1 and 3 in cache.c).
 */
#include "server/builds.h"

#include <pthread.h>
#include <sqlite3.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "lib/util.h"

struct ib_builds {
	sqlite3 *db;
	/* Serialises the connection and the cached statement below. */
	pthread_mutex_t mu;
	sqlite3_stmt *last_ready; /* hot: asked on every cached BuildImage */
};

#define RECORD_COLS                                                                                     \
	"id, image_id, status, spec, created, started, finished, force, cached, timeout_s, steps,"     \
	" error_step, error, log_tail"

static const char *const final_statuses[] = { "READY", "FAILED", "CANCELLED", "TIMEOUT" };

bool ib_build_status_final(const char *s)
{
	for (size_t i = 0; i < sizeof(final_statuses) / sizeof(final_statuses[0]); i++)
		if (!strcmp(s, final_statuses[i]))
			return true;
	return false;
}

static int db_error(sqlite3 *db, const char *what)
{
	return ib_error_set("%s: %s", what, sqlite3_errmsg(db));
}

void ib_build_record_clear(ib_build_record *rec)
{
	if (!rec)
		return;
	free(rec->spec);
	free(rec->steps);
	free(rec->error);
	free(rec->log_tail);
	rec->spec = rec->steps = rec->error = rec->log_tail = NULL;
}

int ib_builds_open(ib_builds **out, ib_cache *cache)
{
	ib_builds *b = ib_xcalloc(1, sizeof(*b));
	char *path = ib_xasprintf("%s/index.db", ib_cache_dir(cache));
	char *msg = NULL;
	int err = 0;

	pthread_mutex_init(&b->mu, NULL);
	/* The cache has created the file and run the migrations already. */
	if (sqlite3_open_v2(path, &b->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_FULLMUTEX, NULL) != SQLITE_OK) {
		err = ib_error_set("cannot open cache index '%s': %s", path,
				   b->db ? sqlite3_errmsg(b->db) : "out of memory");
		goto out;
	}
	sqlite3_busy_timeout(b->db, 30000);
	/*
	 * NORMAL is durable across a crash of the process (WAL); only a power
	 * cut may lose the last status changes, and the index stays sound.
	 */
	if (sqlite3_exec(b->db, "PRAGMA synchronous=NORMAL", NULL, NULL, &msg) != SQLITE_OK) {
		err = ib_error_set("cache index '%s': %s", path, msg ? msg : sqlite3_errmsg(b->db));
		goto out;
	}
	if (sqlite3_prepare_v2(b->db,
			       "SELECT id FROM builds WHERE image_id = ? AND status = 'READY'"
			       " ORDER BY created DESC, rowid DESC LIMIT 1",
			       -1, &b->last_ready, NULL) != SQLITE_OK) {
		err = db_error(b->db, "cannot read build records");
		goto out;
	}
out:
	sqlite3_free(msg);
	free(path);
	if (err) {
		ib_builds_close(b);
		return err;
	}
	*out = b;
	return 0;
}

void ib_builds_close(ib_builds *b)
{
	if (!b)
		return;
	sqlite3_finalize(b->last_ready);
	if (b->db)
		sqlite3_close(b->db);
	pthread_mutex_destroy(&b->mu);
	free(b);
}

static void bind_text_or_null(sqlite3_stmt *st, int col, const char *s)
{
	if (s)
		sqlite3_bind_text(st, col, s, -1, SQLITE_STATIC);
	else
		sqlite3_bind_null(st, col);
}

static void bind_time_or_null(sqlite3_stmt *st, int col, int64_t t)
{
	if (t)
		sqlite3_bind_int64(st, col, t);
	else
		sqlite3_bind_null(st, col);
}

int ib_builds_insert(ib_builds *b, const ib_build_record *rec)
{
	sqlite3_stmt *st = NULL;
	int err = 0, rc;

	pthread_mutex_lock(&b->mu);
	if (sqlite3_prepare_v2(b->db,
			       "INSERT INTO builds (" RECORD_COLS ") VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
			       -1, &st, NULL) != SQLITE_OK) {
		err = db_error(b->db, "cannot record build");
		goto out;
	}
	sqlite3_bind_text(st, 1, rec->id, -1, SQLITE_STATIC);
	sqlite3_bind_text(st, 2, rec->image_id, -1, SQLITE_STATIC);
	sqlite3_bind_text(st, 3, rec->status, -1, SQLITE_STATIC);
	sqlite3_bind_text(st, 4, rec->spec ? rec->spec : "", -1, SQLITE_STATIC);
	sqlite3_bind_int64(st, 5, rec->created);
	bind_time_or_null(st, 6, rec->started);
	bind_time_or_null(st, 7, rec->finished);
	sqlite3_bind_int(st, 8, rec->force);
	sqlite3_bind_int(st, 9, rec->cached);
	sqlite3_bind_int64(st, 10, rec->timeout_s);
	bind_text_or_null(st, 11, rec->steps);
	if (rec->error_step >= 0)
		sqlite3_bind_int(st, 12, rec->error_step);
	else
		sqlite3_bind_null(st, 12);
	bind_text_or_null(st, 13, rec->error);
	bind_text_or_null(st, 14, rec->log_tail);
	rc = sqlite3_step(st);
	if (rc == SQLITE_CONSTRAINT)
		err = (ib_error_set("build '%s' exists already", rec->id), IB_EEXISTS);
	else if (rc != SQLITE_DONE)
		err = db_error(b->db, "cannot record build");
out:
	sqlite3_finalize(st);
	pthread_mutex_unlock(&b->mu);
	return err;
}

int ib_builds_start(ib_builds *b, const char *id, int64_t started, const char *steps)
{
	sqlite3_stmt *st = NULL;
	int err = 0;

	pthread_mutex_lock(&b->mu);
	if (sqlite3_prepare_v2(b->db,
			       "UPDATE builds SET status = 'BUILDING', started = ?, steps = ?"
			       " WHERE id = ? AND status = 'QUEUED'",
			       -1, &st, NULL) != SQLITE_OK) {
		err = db_error(b->db, "cannot update build record");
		goto out;
	}
	sqlite3_bind_int64(st, 1, started);
	bind_text_or_null(st, 2, steps);
	sqlite3_bind_text(st, 3, id, -1, SQLITE_STATIC);
	if (sqlite3_step(st) != SQLITE_DONE)
		err = db_error(b->db, "cannot update build record");
	else if (sqlite3_changes(b->db) == 0)
		err = (ib_error_set("no queued build '%s'", id), IB_ENOTFOUND);
out:
	sqlite3_finalize(st);
	pthread_mutex_unlock(&b->mu);
	return err;
}

int ib_builds_finish(ib_builds *b, const ib_build_record *rec)
{
	sqlite3_stmt *st = NULL;
	int err = 0;

	pthread_mutex_lock(&b->mu);
	if (sqlite3_prepare_v2(b->db,
			       "UPDATE builds SET status = ?, finished = ?, cached = ?, steps = COALESCE(?, steps),"
			       " error_step = ?, error = ?, log_tail = ?"
			       " WHERE id = ? AND status IN ('QUEUED', 'BUILDING')",
			       -1, &st, NULL) != SQLITE_OK) {
		err = db_error(b->db, "cannot update build record");
		goto out;
	}
	sqlite3_bind_text(st, 1, rec->status, -1, SQLITE_STATIC);
	sqlite3_bind_int64(st, 2, rec->finished);
	sqlite3_bind_int(st, 3, rec->cached);
	bind_text_or_null(st, 4, rec->steps);
	if (rec->error_step >= 0)
		sqlite3_bind_int(st, 5, rec->error_step);
	else
		sqlite3_bind_null(st, 5);
	bind_text_or_null(st, 6, rec->error);
	bind_text_or_null(st, 7, rec->log_tail);
	sqlite3_bind_text(st, 8, rec->id, -1, SQLITE_STATIC);
	if (sqlite3_step(st) != SQLITE_DONE)
		err = db_error(b->db, "cannot update build record");
	else if (sqlite3_changes(b->db) == 0)
		err = (ib_error_set("no unfinished build '%s'", rec->id), IB_ENOTFOUND);
out:
	sqlite3_finalize(st);
	pthread_mutex_unlock(&b->mu);
	return err;
}

static char *column_strdup(sqlite3_stmt *st, int col)
{
	const unsigned char *s = sqlite3_column_text(st, col);

	return s ? ib_xstrdup((const char *)s) : NULL;
}

static void copy_column(char *dst, size_t size, sqlite3_stmt *st, int col)
{
	const unsigned char *s = sqlite3_column_text(st, col);

	snprintf(dst, size, "%s", s ? (const char *)s : "");
}

static void record_from_row(ib_build_record *rec, sqlite3_stmt *st)
{
	memset(rec, 0, sizeof(*rec));
	copy_column(rec->id, sizeof(rec->id), st, 0);
	copy_column(rec->image_id, sizeof(rec->image_id), st, 1);
	copy_column(rec->status, sizeof(rec->status), st, 2);
	rec->spec = column_strdup(st, 3);
	rec->created = sqlite3_column_int64(st, 4);
	rec->started = sqlite3_column_int64(st, 5);
	rec->finished = sqlite3_column_int64(st, 6);
	rec->force = sqlite3_column_int(st, 7) != 0;
	rec->cached = sqlite3_column_int(st, 8) != 0;
	rec->timeout_s = sqlite3_column_int64(st, 9);
	rec->steps = column_strdup(st, 10);
	rec->error_step = sqlite3_column_type(st, 11) == SQLITE_NULL ? -1 : sqlite3_column_int(st, 11);
	rec->error = column_strdup(st, 12);
	rec->log_tail = column_strdup(st, 13);
}

int ib_builds_get(ib_builds *b, const char *id, ib_build_record *out)
{
	sqlite3_stmt *st = NULL;
	int ret = 0, rc;

	pthread_mutex_lock(&b->mu);
	if (sqlite3_prepare_v2(b->db, "SELECT " RECORD_COLS " FROM builds WHERE id = ?", -1, &st, NULL) !=
	    SQLITE_OK) {
		ret = db_error(b->db, "cannot read build records");
		goto out;
	}
	sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
	rc = sqlite3_step(st);
	if (rc == SQLITE_ROW) {
		if (out)
			record_from_row(out, st);
		ret = 1;
	} else if (rc != SQLITE_DONE) {
		ret = db_error(b->db, "cannot read build records");
	}
out:
	sqlite3_finalize(st);
	pthread_mutex_unlock(&b->mu);
	return ret;
}

int ib_builds_last_ready(ib_builds *b, const char *image_id, char out[IB_BUILD_ID_MAX])
{
	sqlite3_stmt *st = b->last_ready;
	int ret = 0, rc;

	pthread_mutex_lock(&b->mu);
	sqlite3_reset(st);
	sqlite3_bind_text(st, 1, image_id, -1, SQLITE_STATIC);
	rc = sqlite3_step(st);
	if (rc == SQLITE_ROW) {
		copy_column(out, IB_BUILD_ID_MAX, st, 0);
		ret = 1;
	} else if (rc != SQLITE_DONE) {
		ret = db_error(b->db, "cannot read build records");
	}
	sqlite3_reset(st);
	sqlite3_clear_bindings(st);
	pthread_mutex_unlock(&b->mu);
	return ret;
}

int ib_builds_recover(ib_builds *b, const char *reason, ib_builds_recover_cb cb, void *arg, unsigned *out_count)
{
	sqlite3_stmt *st = NULL;
	ib_build_record *recs = NULL;
	size_t n = 0;
	int err = 0, rc, in_tx = 0;
	int64_t now = (int64_t)time(NULL);

	pthread_mutex_lock(&b->mu);
	if (sqlite3_exec(b->db, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK) {
		err = db_error(b->db, "cannot recover build records");
		goto out;
	}
	in_tx = 1;
	if (sqlite3_prepare_v2(b->db,
			       "SELECT " RECORD_COLS " FROM builds WHERE status IN ('QUEUED', 'BUILDING')"
			       " ORDER BY created, rowid",
			       -1, &st, NULL) != SQLITE_OK) {
		err = db_error(b->db, "cannot recover build records");
		goto out;
	}
	while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
		recs = ib_xrealloc(recs, (n + 1) * sizeof(*recs));
		record_from_row(&recs[n++], st);
	}
	if (rc != SQLITE_DONE) {
		err = db_error(b->db, "cannot recover build records");
		goto out;
	}
	sqlite3_finalize(st);
	st = NULL;
	if (sqlite3_prepare_v2(b->db,
			       "UPDATE builds SET status = 'FAILED', finished = ?, error = ?, log_tail = ?"
			       " WHERE id = ?",
			       -1, &st, NULL) != SQLITE_OK) {
		err = db_error(b->db, "cannot recover build records");
		goto out;
	}
	for (size_t i = 0; i < n; i++) {
		char *tail = cb ? cb(&recs[i], arg) : NULL;

		sqlite3_reset(st);
		sqlite3_bind_int64(st, 1, now);
		sqlite3_bind_text(st, 2, reason, -1, SQLITE_STATIC);
		bind_text_or_null(st, 3, tail);
		sqlite3_bind_text(st, 4, recs[i].id, -1, SQLITE_STATIC);
		rc = sqlite3_step(st);
		free(tail);
		if (rc != SQLITE_DONE) {
			err = db_error(b->db, "cannot recover build records");
			goto out;
		}
	}
out:
	sqlite3_finalize(st);
	if (in_tx && sqlite3_exec(b->db, err ? "ROLLBACK" : "COMMIT", NULL, NULL, NULL) != SQLITE_OK && !err)
		err = db_error(b->db, "cannot recover build records");
	pthread_mutex_unlock(&b->mu);
	for (size_t i = 0; i < n; i++)
		ib_build_record_clear(&recs[i]);
	free(recs);
	if (!err && out_count)
		*out_count = (unsigned)n;
	return err;
}

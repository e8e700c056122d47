#include "cache/cache-internal.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <dirent.h>
#include <stdarg.h>

#include "layer/compact.h"
#include "layer/tree.h"
#include "lib/crash.h"
#include "lib/util.h"


/*
 * The schema, as migrations: entry i brings user_version i to i + 1.  Add
 * new entries at the end; never edit one that has shipped.
 */
static const char *const migrations[] = {
	"CREATE TABLE layers ("
	"  key TEXT PRIMARY KEY,"
	"  parent TEXT NOT NULL,"
	"  kind TEXT NOT NULL,"
	"  step TEXT NOT NULL,"
	"  digest TEXT NOT NULL,"
	"  bytes INTEGER NOT NULL,"
	"  files INTEGER NOT NULL,"
	"  seconds REAL NOT NULL,"
	"  created INTEGER NOT NULL,"
	"  last_used INTEGER NOT NULL);"
	"CREATE TABLE images ("
	"  id TEXT PRIMARY KEY,"
	"  top_key TEXT NOT NULL,"
	"  arch TEXT NOT NULL,"
	"  ext4_sha256 TEXT NOT NULL,"
	"  ext4_bytes INTEGER NOT NULL,"
	"  meta TEXT NOT NULL,"
	"  created INTEGER NOT NULL,"
	"  last_used INTEGER NOT NULL);"
	"CREATE TABLE image_layers ("
	"  image_id TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,"
	"  idx INTEGER NOT NULL,"
	"  key TEXT NOT NULL,"
	"  PRIMARY KEY (image_id, idx));"
	"CREATE INDEX image_layers_key ON image_layers(key);"
	"CREATE TABLE builds ("
	"  id TEXT PRIMARY KEY,"
	"  image_id TEXT NOT NULL,"
	"  status TEXT NOT NULL,"
	"  spec TEXT NOT NULL,"
	"  created INTEGER NOT NULL,"
	"  finished INTEGER,"
	"  error TEXT);",
	/* 2: where images were warmed from (imagebuilder warm --git) */
	"CREATE TABLE image_sources ("
	"  image_id TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,"
	"  source TEXT NOT NULL,"
	"  commit_id TEXT NOT NULL,"
	"  path TEXT NOT NULL,"
	"  warmed INTEGER NOT NULL,"
	"  PRIMARY KEY (image_id, source, commit_id, path));",
	/* 3: the BuildImage service's build records (cache/builds.c) */
	"ALTER TABLE builds ADD COLUMN started INTEGER;"
	"ALTER TABLE builds ADD COLUMN force INTEGER NOT NULL DEFAULT 0;"
	"ALTER TABLE builds ADD COLUMN timeout_s INTEGER NOT NULL DEFAULT 0;"
	"ALTER TABLE builds ADD COLUMN cached INTEGER NOT NULL DEFAULT 0;"
	"ALTER TABLE builds ADD COLUMN error_step INTEGER;"
	"ALTER TABLE builds ADD COLUMN log_tail TEXT;"
	"ALTER TABLE builds ADD COLUMN steps TEXT;"
	"CREATE INDEX builds_image ON builds(image_id, status, created);"
	"CREATE INDEX builds_status ON builds(status);",
	/*
	 * 4: generations.  A re-committed layer (build --force) or a
	 * re-exported image goes in beside the old one, under the next
	 * generation, and the row switches to it in one statement: the row
	 * never names missing or half-replaced data.  Generation 0 is the
	 * plain name (layers/<key>, images/<id>.ext4), g > 0 adds ".g".
	 */
	"ALTER TABLE layers ADD COLUMN gen INTEGER NOT NULL DEFAULT 0;"
	"ALTER TABLE images ADD COLUMN gen INTEGER NOT NULL DEFAULT 0;",
	/*
	 * 5: an image's data digest (lib/hash.h: what verify checks, in the
	 * time its content takes to read; ext4_sha256, the whole file's, is
	 * then made when first asked for and may be ''), and its compact
	 * forms (the .zst stream, the bmap), made once from the file of the
	 * image's generation and kept beside it
	 * (images/<id>[.<gen>].ext4.<kind>); gone with the image.
	 */
	"ALTER TABLE images ADD COLUMN data_digest TEXT NOT NULL DEFAULT '';"
	"CREATE TABLE image_artifacts ("
	"  image_id TEXT NOT NULL REFERENCES images(id) ON DELETE CASCADE,"
	"  kind TEXT NOT NULL,"
	"  gen INTEGER NOT NULL,"
	"  sha256 TEXT NOT NULL,"
	"  bytes INTEGER NOT NULL,"
	"  PRIMARY KEY (image_id, kind));",
	/*
	 * 6: which tree digest a layer's row holds (layer/tree.h): 1 for
	 * layers indexed before 0.1.5 (contents hashed byte for byte), 2 since
	 * (zero runs counted, holes never read).
	 */
	"ALTER TABLE layers ADD COLUMN digest_version INTEGER NOT NULL DEFAULT 1;",
};

int ib_cache__db_error(sqlite3 *db, const char *what)
{
	return ib_error_set("%s: %s", what, sqlite3_errmsg(db));
}

int ib_cache__exec(sqlite3 *db, const char *sql)
{
	char *msg = NULL;

	if (sqlite3_exec(db, sql, NULL, NULL, &msg) != SQLITE_OK) {
		ib_error_set("cache index: %s", msg ? msg : sqlite3_errmsg(db));
		sqlite3_free(msg);
		return IB_ERROR;
	}
	return 0;
}

static int migrate(sqlite3 *db)
{
	sqlite3_stmt *st = NULL;
	int version, err = 0;
	size_t n = sizeof(migrations) / sizeof(migrations[0]);

	if (ib_cache__exec(db, "BEGIN IMMEDIATE") < 0)
		return IB_ERROR;
	if (sqlite3_prepare_v2(db, "PRAGMA user_version", -1, &st, NULL) != SQLITE_OK ||
	    sqlite3_step(st) != SQLITE_ROW) {
		err = ib_cache__db_error(db, "cannot read the cache index version");
		goto out;
	}
	version = sqlite3_column_int(st, 0);
	if (version < 0 || (size_t)version > n) {
		err = ib_error_set("cache index version %d is newer than this imagebuilder (%zu)", version, n);
		goto out;
	}
	for (size_t i = (size_t)version; i < n; i++) {
		char pragma[64];
		if ((err = ib_cache__exec(db, migrations[i])) < 0)
			goto out;
		snprintf(pragma, sizeof(pragma), "PRAGMA user_version = %zu", i + 1);
		if ((err = ib_cache__exec(db, pragma)) < 0)
			goto out;
	}
out:
	sqlite3_finalize(st);
	if (ib_cache__exec(db, err ? "ROLLBACK" : "COMMIT") < 0 && !err)
		err = IB_ERROR;
	return err;
}

/* The cache dir: mode 0700, whatever it was made with (by an older version, or by hand). */
static int restrict_mode(const char *dir)
{
	struct stat st;

	if (stat(dir, &st) < 0)
		return ib_error_set_errno(errno, "cannot stat the cache dir '%s'", dir);
	if ((st.st_mode & 07777) != 0700 && chmod(dir, 0700) < 0)
		return ib_error_set_errno(errno, "cannot make the cache dir '%s' private (mode 0700)", dir);
	return 0;
}

int ib_cache_open(ib_cache **out, const char *dir)
{
	static const char *const subdirs[] = { "layers", "images", "tmp", "locks", "logs", "apt" };
	ib_cache *c = NULL;
	char *path = NULL;
	int err = 0;

	c = ib_xcalloc(1, sizeof(*c));
	pthread_mutex_init(&c->lock, NULL);
	if ((err = ib_mkdir_p(dir, 0700)) < 0)
		goto out;
	if (!(c->dir = realpath(dir, NULL))) {
		err = ib_error_set_errno(errno, "cannot resolve the cache dir '%s'", dir);
		goto out;
	}
	dir = c->dir;
	/*
	 * Layers hold what steps made (setuid programs, devices, anything):
	 * nobody but the cache's owner may even look inside.
	 */
	if ((err = restrict_mode(dir)) < 0)
		goto out;
	for (size_t i = 0; i < sizeof(subdirs) / sizeof(subdirs[0]); i++) {
		free(path);
		path = ib_xasprintf("%s/%s", dir, subdirs[i]);
		if (mkdir(path, 0700) < 0 && errno != EEXIST) {
			err = ib_error_set_errno(errno, "cannot create '%s'", path);
			goto out;
		}
	}
	free(path);
	path = ib_xasprintf("%s/index.db", dir);
	/* sqlite makes its -wal and -shm files with the database's mode */
	{
		int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
		if (fd < 0 || fchmod(fd, 0600) < 0) {
			err = ib_error_set_errno(errno, "cannot create cache index '%s'", path);
			if (fd >= 0)
				close(fd);
			goto out;
		}
		close(fd);
	}
	if (sqlite3_open_v2(path, &c->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX,
			    NULL) != SQLITE_OK) {
		err = ib_error_set("cannot open cache index '%s': %s", path,
				   c->db ? sqlite3_errmsg(c->db) : "out of memory");
		goto out;
	}
	sqlite3_busy_timeout(c->db, 60000);
	if ((err = ib_cache__exec(c->db, "PRAGMA journal_mode=WAL; PRAGMA foreign_keys=ON; PRAGMA synchronous=FULL")) < 0)
		goto out;
	if ((err = migrate(c->db)) < 0)
		goto out;
out:
	free(path);
	if (err) {
		ib_cache_close(c);
		return err;
	}
	*out = c;
	return 0;
}

void ib_cache_close(ib_cache *c)
{
	if (!c)
		return;
	if (c->db)
		sqlite3_close(c->db);
	pthread_mutex_destroy(&c->lock);
	free(c->dir);
	free(c);
}

const char *ib_cache_dir(const ib_cache *c)
{
	return c->dir;
}

char *ib_cache__layer_dir(const ib_cache *c, const char *key, int64_t gen)
{
	if (gen)
		return ib_xasprintf("%s/layers/%s.%lld", c->dir, key, (long long)gen);
	return ib_xasprintf("%s/layers/%s", c->dir, key);
}

char *ib_cache__image_file(const ib_cache *c, const char *id, int64_t gen)
{
	if (gen)
		return ib_xasprintf("%s/images/%s.%lld.ext4", c->dir, id, (long long)gen);
	return ib_xasprintf("%s/images/%s.ext4", c->dir, id);
}

int ib_cache__row_gen(ib_cache *c, const char *table, const char *id, int64_t *out)
{
	sqlite3_stmt *st = NULL;
	char sql[96];
	int rc, ret = 0;

	snprintf(sql, sizeof(sql), "SELECT gen FROM %s WHERE %s = ?", table, strcmp(table, "layers") ? "id" : "key");
	if (sqlite3_prepare_v2(c->db, sql, -1, &st, NULL) != SQLITE_OK)
		return ib_cache__db_error(c->db, "cannot read the cache index");
	sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
	rc = sqlite3_step(st);
	if (rc == SQLITE_ROW) {
		*out = sqlite3_column_int64(st, 0);
		ret = 1;
	} else if (rc != SQLITE_DONE) {
		ret = ib_cache__db_error(c->db, "cannot read the cache index");
	}
	sqlite3_finalize(st);
	return ret;
}

/* The path of a layer or image as its row names it (generation 0 when there is no row). */
static char *indexed_path(ib_cache *c, const char *table, const char *id)
{
	int64_t gen = 0;

	pthread_mutex_lock(&c->lock);
	if (ib_cache__row_gen(c, table, id, &gen) <= 0)
		gen = 0;
	pthread_mutex_unlock(&c->lock);
	return strcmp(table, "layers") ? ib_cache__image_file(c, id, gen) : ib_cache__layer_dir(c, id, gen);
}

char *ib_cache_layer_path(ib_cache *c, const char *key)
{
	return indexed_path(c, "layers", key);
}

char *ib_cache_image_path(ib_cache *c, const char *id)
{
	return indexed_path(c, "images", id);
}

static int lock_file(const char *path, int op, int *out_fd)
{
	int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);

	if (fd < 0)
		return ib_error_set_errno(errno, "cannot open lock '%s'", path);
	while (flock(fd, op) < 0) {
		if (errno == EINTR)
			continue;
		int e = errno;
		close(fd);
		if (e == EWOULDBLOCK)
			return IB_EEXISTS;
		return ib_error_set_errno(e, "cannot lock '%s'", path);
	}
	*out_fd = fd;
	return 0;
}

int ib_cache_mktemp(ib_cache *c, char **out, int *out_lockfd)
{
	char *lock = NULL, *dir = NULL;
	int fd = -1, err = 0;

	/*
	 * The lock first, then the dir: a scratch dir never exists without a
	 * lock file, so ib_cache_clean_tmp() can tell a dead owner's.
	 */
	for (int attempt = 0; attempt < 100; attempt++) {
		unsigned char r[6];
		char name[16];
		if (getentropy(r, sizeof(r)) < 0)
			return ib_error_set_errno(errno, "cannot make a scratch name");
		ib_hex(name, r, sizeof(r));
		lock = ib_xasprintf("%s/tmp/b-%s.lock", c->dir, name);
		dir = ib_xasprintf("%s/tmp/b-%s", c->dir, name);
		fd = open(lock, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
		if (fd >= 0 && flock(fd, LOCK_EX | LOCK_NB) == 0 && mkdir(dir, 0700) == 0)
			break;
		err = errno;
		if (fd >= 0) {
			unlink(lock);
			close(fd);
		}
		fd = -1;
		free(lock);
		free(dir);
		lock = dir = NULL;
		if (err != EEXIST && err != EWOULDBLOCK)
			return ib_error_set_errno(err, "cannot create a directory in '%s/tmp'", c->dir);
	}
	free(lock);
	if (fd < 0) {
		free(dir);
		return ib_error_set("cannot find a free scratch name in '%s/tmp'", c->dir);
	}
	*out = dir;
	*out_lockfd = fd;
	return 0;
}

void ib_cache_rmtemp(char *path, int lockfd)
{
	if (path) {
		char *lock = ib_xasprintf("%s.lock", path);
		ib_rm_rf(path);
		unlink(lock);
		free(lock);
	}
	if (lockfd >= 0)
		close(lockfd);
}

int ib_cache__sweep_tmp(ib_cache *c, bool remove, unsigned *count, uint64_t *bytes)
{
	char *tmp = ib_xasprintf("%s/tmp", c->dir);
	DIR *d = opendir(tmp);
	struct dirent *de;
	int err = 0;

	if (!d) {
		err = ib_error_set_errno(errno, "cannot read '%s'", tmp);
		free(tmp);
		return err;
	}
	while ((de = readdir(d))) {
		size_t len = strlen(de->d_name);
		char *lock, *dir;
		int fd;

		if (len < 6 || strcmp(de->d_name + len - 5, ".lock"))
			continue;
		lock = ib_xasprintf("%s/%s", tmp, de->d_name);
		dir = ib_xasprintf("%s/%.*s", tmp, (int)(len - 5), de->d_name);
		if (lock_file(lock, LOCK_EX | LOCK_NB, &fd) == 0) {
			if (count)
				(*count)++;
			if (bytes)
				*bytes += ib_du(dir);
			if (remove) {
				ib_rm_rf(dir);
				unlink(lock);
			}
			close(fd);
		}
		free(lock);
		free(dir);
	}
	closedir(d);
	free(tmp);
	return err;
}

int ib_cache_clean_tmp(ib_cache *c)
{
	return ib_cache__sweep_tmp(c, true, NULL, NULL);
}

int ib_cache_lock_layer(ib_cache *c, const char *key, unsigned flags, volatile int *cancel, double deadline,
			int *out_fd, bool *out_waited)
{
	char *path = ib_xasprintf("%s/locks/%s.lock", c->dir, key);
	struct timespec pause = { 0, 50 * 1000 * 1000 };
	int op = ((flags & IB_LOCK_SHARED) ? LOCK_SH : LOCK_EX) | LOCK_NB;
	int err;

	if (out_waited)
		*out_waited = false;
	/* flock cannot be interrupted by a flag: poll it. */
	while ((err = lock_file(path, op, out_fd)) == IB_EEXISTS) {
		if (flags & IB_LOCK_NOWAIT)
			break;
		if (out_waited)
			*out_waited = true;
		if (cancel && *cancel) {
			err = IB_ECANCELED;
			ib_error_set("cancelled while waiting for layer '%.12s'", key);
			break;
		}
		if (deadline > 0 && ib_now() >= deadline) {
			err = IB_ETIMEOUT;
			ib_error_set("timed out waiting for layer '%.12s'", key);
			break;
		}
		nanosleep(&pause, NULL);
	}
	free(path);
	return err;
}

int ib_cache_share_lock(int fd)
{
	while (flock(fd, LOCK_SH) < 0) {
		if (errno != EINTR)
			return ib_error_set_errno(errno, "cannot downgrade a layer lock");
	}
	return 0;
}

static void copy_col(char *dst, size_t size, sqlite3_stmt *st, int col)
{
	const unsigned char *s = sqlite3_column_text(st, col);

	snprintf(dst, size, "%s", s ? (const char *)s : "");
}

const char *const ib_cache__artifact_suffix[] = { [IB_ARTIFACT_ZST] = ".zst", [IB_ARTIFACT_BMAP] = ".bmap" };
static const char *const artifact_kind[] = { [IB_ARTIFACT_ZST] = "zst", [IB_ARTIFACT_BMAP] = "bmap" };

void ib_cache__unlink_image_files(const char *file)
{
	unlink(file);
	for (size_t k = 0; k < IB_ARTIFACT_COUNT; k++) {
		char *a = ib_xasprintf("%s%s", file, ib_cache__artifact_suffix[k]);
		unlink(a);
		free(a);
	}
}

/* The artifact's row: 1 and its digest and size (of the generation gen), 0 none, <0 error.  c->lock held. */
static int artifact_row(ib_cache *c, const char *id, ib_artifact kind, int64_t gen, char sha[IB_SHA256_HEX],
			uint64_t *bytes)
{
	sqlite3_stmt *st = NULL;
	int rc, ret = 0;

	if (sqlite3_prepare_v2(c->db, "SELECT sha256, bytes FROM image_artifacts WHERE image_id = ? AND kind = ?"
				      " AND gen = ?", -1, &st, NULL) != SQLITE_OK)
		return ib_cache__db_error(c->db, "cannot read the cache index");
	sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
	sqlite3_bind_text(st, 2, artifact_kind[kind], -1, SQLITE_STATIC);
	sqlite3_bind_int64(st, 3, gen);
	rc = sqlite3_step(st);
	if (rc == SQLITE_ROW) {
		copy_col(sha, IB_SHA256_HEX, st, 0);
		*bytes = (uint64_t)sqlite3_column_int64(st, 1);
		ret = 1;
	} else if (rc != SQLITE_DONE) {
		ret = ib_cache__db_error(c->db, "cannot read the cache index");
	}
	sqlite3_finalize(st);
	return ret;
}

int ib_cache_image_artifact(ib_cache *c, const char *id, ib_artifact kind, ib_artifact_info *out)
{
	char *file = NULL, *path = NULL, *scratch = NULL, *made = NULL, *images = NULL;
	ib_artifact_info info = { 0 };
	sqlite3_stmt *st = NULL;
	int64_t gen = 0;
	int err, r, lockfd = -1, tmplock = -1;

	/* one maker at a time; the others wait and find it made */
	if ((err = ib_cache__lock_image(c, id, false, &lockfd)) < 0)
		return err;
	pthread_mutex_lock(&c->lock);
	if ((r = ib_cache__row_gen(c, "images", id, &gen)) == 1)
		r = artifact_row(c, id, kind, gen, info.sha256, &info.bytes);
	else if (r == 0) {
		ib_error_set("no image '%s' in the cache", id);
		r = IB_ENOTFOUND;
	}
	pthread_mutex_unlock(&c->lock);
	if (r < 0) {
		err = r;
		goto out;
	}
	file = ib_cache__image_file(c, id, gen);
	path = ib_xasprintf("%s%s", file, ib_cache__artifact_suffix[kind]);
	if (r == 1 && access(path, F_OK) == 0)
		goto done;
	/* made in a scratch dir, renamed beside the image, then its row */
	if ((err = ib_cache_mktemp(c, &scratch, &tmplock)) < 0)
		goto out;
	made = ib_xasprintf("%s/artifact", scratch);
	err = kind == IB_ARTIFACT_ZST ? ib_zstd_write(file, made, 0, &info.bytes) : ib_bmap_write(file, made, &info.bytes);
	if (err < 0 || (err = ib_sha256_file(info.sha256, made)) < 0)
		goto out;
	if (chmod(made, 0600) < 0) {
		err = ib_error_set_errno(errno, "cannot set the mode of '%s'", made);
		goto out;
	}
	if (rename(made, path) < 0) {
		err = ib_error_set_errno(errno, "cannot move '%s' into the cache", path);
		goto out;
	}
	images = ib_xasprintf("%s/images", c->dir);
	if ((err = ib_fsync_dir(images)) < 0)
		goto out;
	IB_CRASH_POINT("artifact-commit:after-rename");
	pthread_mutex_lock(&c->lock);
	if (sqlite3_prepare_v2(c->db, "INSERT OR REPLACE INTO image_artifacts (image_id, kind, gen, sha256, bytes)"
				      " VALUES (?,?,?,?,?)", -1, &st, NULL) != SQLITE_OK) {
		err = ib_cache__db_error(c->db, "cannot update the cache index");
	} else {
		sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
		sqlite3_bind_text(st, 2, artifact_kind[kind], -1, SQLITE_STATIC);
		sqlite3_bind_int64(st, 3, gen);
		sqlite3_bind_text(st, 4, info.sha256, -1, SQLITE_STATIC);
		sqlite3_bind_int64(st, 5, (sqlite3_int64)info.bytes);
		if (sqlite3_step(st) != SQLITE_DONE)
			err = ib_cache__db_error(c->db, "cannot update the cache index");
	}
	sqlite3_finalize(st);
	pthread_mutex_unlock(&c->lock);
	if (err) {
		unlink(path);
		goto out;
	}
done:
	info.path = path;
	path = NULL;
	*out = info;
out:
	ib_cache_unlock(lockfd);
	ib_cache_rmtemp(scratch, tmplock);
	free(scratch);
	free(made);
	free(file);
	free(path);
	free(images);
	return err;
}

int ib_cache_image_digest(ib_cache *c, const char *id, char hex[IB_SHA256_HEX])
{
	sqlite3_stmt *st = NULL;
	char *file = NULL;
	int64_t gen = 0;
	int err = 0, lockfd = -1, rc;

	if ((err = ib_cache__lock_image(c, id, false, &lockfd)) < 0)
		return err;
	pthread_mutex_lock(&c->lock);
	if (sqlite3_prepare_v2(c->db, "SELECT ext4_sha256, gen FROM images WHERE id = ?", -1, &st, NULL) != SQLITE_OK) {
		err = ib_cache__db_error(c->db, "cannot read the cache index");
	} else {
		sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
		rc = sqlite3_step(st);
		if (rc == SQLITE_ROW) {
			copy_col(hex, IB_SHA256_HEX, st, 0);
			gen = sqlite3_column_int64(st, 1);
		} else {
			err = rc == SQLITE_DONE ? (ib_error_set("no image '%s' in the cache", id), IB_ENOTFOUND)
						: ib_cache__db_error(c->db, "cannot read the cache index");
		}
	}
	sqlite3_finalize(st);
	st = NULL;
	pthread_mutex_unlock(&c->lock);
	if (err || hex[0])
		goto out;
	/* made once, when first asked for: a 4 GiB image takes a few seconds */
	file = ib_cache__image_file(c, id, gen);
	if ((err = ib_sha256_file(hex, file)) < 0)
		goto out;
	pthread_mutex_lock(&c->lock);
	if (sqlite3_prepare_v2(c->db, "UPDATE images SET ext4_sha256 = ? WHERE id = ? AND gen = ?", -1, &st, NULL) !=
	    SQLITE_OK) {
		err = ib_cache__db_error(c->db, "cannot update the cache index");
	} else {
		sqlite3_bind_text(st, 1, hex, -1, SQLITE_STATIC);
		sqlite3_bind_text(st, 2, id, -1, SQLITE_STATIC);
		sqlite3_bind_int64(st, 3, gen);
		if (sqlite3_step(st) != SQLITE_DONE)
			err = ib_cache__db_error(c->db, "cannot update the cache index");
	}
	sqlite3_finalize(st);
	pthread_mutex_unlock(&c->lock);
out:
	ib_cache_unlock(lockfd);
	free(file);
	return err;
}

int ib_cache__artifact_indexed(ib_cache *c, const char *id, ib_artifact kind, int64_t gen)
{
	char sha[IB_SHA256_HEX];
	uint64_t bytes;

	return artifact_row(c, id, kind, gen, sha, &bytes);
}

void ib_artifact_info_clear(ib_artifact_info *info)
{
	if (!info)
		return;
	free(info->path);
	memset(info, 0, sizeof(*info));
}

int ib_cache__lock_image(ib_cache *c, const char *id, bool nowait, int *out_fd)
{
	char *path = ib_xasprintf("%s/locks/image-%s.lock", c->dir, id);
	int err = lock_file(path, LOCK_EX | (nowait ? LOCK_NB : 0), out_fd);

	free(path);
	return err;
}

void ib_cache_unlock(int fd)
{
	if (fd >= 0)
		close(fd);
}


static int path_is_dir(const char *path)
{
	struct stat st;

	return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

static int path_is_file(const char *path)
{
	struct stat st;

	return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

int ib_cache_layer_get(ib_cache *c, const char *key, ib_layer_info *info)
{
	sqlite3_stmt *st = NULL;
	char *path = NULL;
	int rc, ret = 0;

	pthread_mutex_lock(&c->lock);
	if (sqlite3_prepare_v2(c->db, "SELECT key, parent, digest, kind, bytes, files, seconds, gen"
				      " FROM layers WHERE key = ?", -1, &st, NULL) != SQLITE_OK) {
		ret = ib_cache__db_error(c->db, "cannot read the cache index");
		goto out;
	}
	sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
	rc = sqlite3_step(st);
	if (rc == SQLITE_DONE)
		goto out;
	if (rc != SQLITE_ROW) {
		ret = ib_cache__db_error(c->db, "cannot read the cache index");
		goto out;
	}
	path = ib_cache__layer_dir(c, key, sqlite3_column_int64(st, 7));
	if (!path_is_dir(path))
		goto out;
	ret = 1;
	if (info) {
		copy_col(info->key, sizeof(info->key), st, 0);
		copy_col(info->parent, sizeof(info->parent), st, 1);
		copy_col(info->digest, sizeof(info->digest), st, 2);
		copy_col(info->kind, sizeof(info->kind), st, 3);
		info->bytes = (uint64_t)sqlite3_column_int64(st, 4);
		info->files = (uint64_t)sqlite3_column_int64(st, 5);
		info->seconds = sqlite3_column_double(st, 6);
	}
out:
	sqlite3_finalize(st);
	pthread_mutex_unlock(&c->lock);
	free(path);
	return ret;
}

int ib_cache__delete_layer_row(ib_cache *c, const char *key)
{
	sqlite3_stmt *st = NULL;
	int err = 0;

	if (sqlite3_prepare_v2(c->db, "DELETE FROM layers WHERE key = ?", -1, &st, NULL) != SQLITE_OK) {
		err = ib_cache__db_error(c->db, "cannot update the cache index");
		goto out;
	}
	sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
	if (sqlite3_step(st) != SQLITE_DONE)
		err = ib_cache__db_error(c->db, "cannot update the cache index");
out:
	sqlite3_finalize(st);
	return err;
}

/* Move path out of the way into tmp/ and remove it there. */
int ib_cache__discard_dir(ib_cache *c, const char *path)
{
	char *trash = NULL;
	int fd = -1, err;

	if ((err = ib_cache_mktemp(c, &trash, &fd)) < 0)
		return err;
	char *dst = ib_xasprintf("%s/old", trash);
	if (rename(path, dst) < 0 && errno != ENOENT)
		err = ib_error_set_errno(errno, "cannot move '%s' aside", path);
	else
		IB_CRASH_POINT("layer-discard:after-move");
	free(dst);
	ib_cache_rmtemp(trash, fd);
	free(trash);
	return err;
}

int ib_cache_layer_seal(const char *tmpdir, const ib_walk_opts *opts, ib_layer_seal *seal)
{
	int fd, err;

	memset(seal, 0, sizeof(*seal));
	seal->version = IB_TREE_DIGEST_CURRENT;
	if ((err = ib_tree_digest(seal->digest, tmpdir, seal->version, opts, &seal->bytes, &seal->files)) < 0)
		return err;

	/* The content must be on disk before a row can point at it. */
	fd = open(tmpdir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0)
		return ib_error_set_errno(errno, "cannot open '%s'", tmpdir);
	if (syncfs(fd) < 0) {
		err = ib_error_set_errno(errno, "cannot sync '%s'", tmpdir);
		close(fd);
		return err;
	}
	close(fd);
	return 0;
}

int ib_cache_layer_commit(ib_cache *c, const char *key, const char *parent, const char *kind,
			  const char *step, const char *tmpdir, double seconds, ib_layer_info *out_info)
{
	ib_layer_seal seal;
	int err;

	if ((err = ib_cache_layer_seal(tmpdir, NULL, &seal)) < 0)
		return err;
	return ib_cache_layer_commit_sealed(c, key, parent, kind, step, tmpdir, seconds, &seal, out_info);
}

int ib_cache_layer_commit_sealed(ib_cache *c, const char *key, const char *parent, const char *kind,
				 const char *step, const char *tmpdir, double seconds, const ib_layer_seal *seal,
				 ib_layer_info *out_info)
{
	const char *digest = seal->digest;
	uint64_t bytes = seal->bytes, files = seal->files;
	char *path = NULL, *old = NULL, *layers = NULL;
	sqlite3_stmt *st = NULL;
	int64_t now = (int64_t)time(NULL), gen = 0;
	int err = 0, renamed = 0, r;
	bool recommit;

	layers = ib_xasprintf("%s/layers", c->dir);
	pthread_mutex_lock(&c->lock);
	if ((r = ib_cache__row_gen(c, "layers", key, &gen)) < 0) {
		err = r;
		goto out;
	}
	/*
	 * A layer already indexed (build --force) goes in beside the old one,
	 * under the next generation; the row switches in one statement and
	 * the old directory leaves afterwards.
	 */
	recommit = r == 1;
	if (recommit)
		old = ib_cache__layer_dir(c, key, gen++);
	path = ib_cache__layer_dir(c, key, gen);
	/* what a crash left where this one goes: no row names it, and we hold the layer's lock */
	if (path_is_dir(path) && (err = ib_cache__discard_dir(c, path)) < 0)
		goto out;
	if (rename(tmpdir, path) < 0) {
		err = ib_error_set_errno(errno, "cannot move layer into '%s'", path);
		goto out;
	}
	renamed = 1;
	if ((err = ib_fsync_dir(layers)) < 0)
		goto out;
	IB_CRASH_POINT(recommit ? "layer-recommit:after-rename" : "layer-commit:after-rename");

	if (sqlite3_prepare_v2(c->db, recommit ? "UPDATE layers SET parent = ?, kind = ?, step = ?, digest = ?,"
						 " bytes = ?, files = ?, seconds = ?, created = ?, last_used = ?,"
						 " gen = ?, digest_version = ? WHERE key = ?"
					       : "INSERT INTO layers (parent, kind, step, digest, bytes, files, seconds,"
						 " created, last_used, gen, digest_version, key)"
						 " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
			       -1, &st, NULL) != SQLITE_OK) {
		err = ib_cache__db_error(c->db, "cannot update the cache index");
		goto out;
	}
	sqlite3_bind_text(st, 1, parent ? parent : "", -1, SQLITE_STATIC);
	sqlite3_bind_text(st, 2, kind, -1, SQLITE_STATIC);
	sqlite3_bind_text(st, 3, step, -1, SQLITE_STATIC);
	sqlite3_bind_text(st, 4, digest, -1, SQLITE_STATIC);
	sqlite3_bind_int64(st, 5, (sqlite3_int64)bytes);
	sqlite3_bind_int64(st, 6, (sqlite3_int64)files);
	sqlite3_bind_double(st, 7, seconds);
	sqlite3_bind_int64(st, 8, now);
	sqlite3_bind_int64(st, 9, now);
	sqlite3_bind_int64(st, 10, gen);
	sqlite3_bind_int(st, 11, seal->version ? seal->version : IB_TREE_DIGEST_CURRENT);
	sqlite3_bind_text(st, 12, key, -1, SQLITE_STATIC);
	if (sqlite3_step(st) != SQLITE_DONE) {
		err = ib_cache__db_error(c->db, "cannot update the cache index");
		goto out;
	}
	IB_CRASH_POINT(recommit ? "layer-recommit:after-row" : "layer-commit:after-row");
	/* the row names the new directory: the old one is no one's */
	if (recommit && path_is_dir(old))
		ib_cache__discard_dir(c, old);
out:
	sqlite3_finalize(st);
	if (err && renamed && rename(path, tmpdir) < 0)
		ib_rm_rf(path);
	pthread_mutex_unlock(&c->lock);
	if (!err && out_info) {
		memset(out_info, 0, sizeof(*out_info));
		snprintf(out_info->key, sizeof(out_info->key), "%s", key);
		snprintf(out_info->parent, sizeof(out_info->parent), "%s", parent ? parent : "");
		snprintf(out_info->digest, sizeof(out_info->digest), "%s", digest);
		snprintf(out_info->kind, sizeof(out_info->kind), "%s", kind);
		out_info->bytes = bytes;
		out_info->files = files;
		out_info->seconds = seconds;
	}
	free(path);
	free(old);
	free(layers);
	return err;
}

int ib_cache_layer_remove(ib_cache *c, const char *key)
{
	char *path = NULL;
	int64_t gen = 0;
	int err;

	/* the row first: a crash after it leaves a directory no row names, which gc collects */
	pthread_mutex_lock(&c->lock);
	if ((err = ib_cache__row_gen(c, "layers", key, &gen)) >= 0) {
		path = ib_cache__layer_dir(c, key, gen);
		err = ib_cache__delete_layer_row(c, key);
	}
	pthread_mutex_unlock(&c->lock);
	if (!err) {
		IB_CRASH_POINT("layer-remove:after-row");
		pthread_mutex_lock(&c->lock);
		err = ib_cache__discard_dir(c, path);
		pthread_mutex_unlock(&c->lock);
	}
	free(path);
	return err;
}

void ib_image_info_clear(ib_image_info *info)
{
	if (!info)
		return;
	ib_image_meta_free(info->meta);
	if (info->layers)
		for (size_t i = 0; i < info->nlayers; i++)
			free(info->layers[i]);
	free(info->layers);
	memset(info, 0, sizeof(*info));
}

static int load_image_layers(ib_cache *c, ib_image_info *info)
{
	sqlite3_stmt *st = NULL;
	int rc, err = 0;

	if (sqlite3_prepare_v2(c->db, "SELECT key FROM image_layers WHERE image_id = ? ORDER BY idx",
			       -1, &st, NULL) != SQLITE_OK)
		return ib_cache__db_error(c->db, "cannot read the cache index");
	sqlite3_bind_text(st, 1, info->id, -1, SQLITE_STATIC);
	while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
		info->layers = ib_xrealloc(info->layers, (info->nlayers + 2) * sizeof(char *));
		info->layers[info->nlayers++] = ib_xstrdup((const char *)sqlite3_column_text(st, 0));
		info->layers[info->nlayers] = NULL;
	}
	if (rc != SQLITE_DONE)
		err = ib_cache__db_error(c->db, "cannot read the cache index");
	sqlite3_finalize(st);
	return err;
}

static int image_from_row(ib_image_info *info, sqlite3_stmt *st)
{
	int err;

	memset(info, 0, sizeof(*info));
	copy_col(info->id, sizeof(info->id), st, 0);
	copy_col(info->top_key, sizeof(info->top_key), st, 1);
	copy_col(info->arch, sizeof(info->arch), st, 2);
	copy_col(info->ext4_sha256, sizeof(info->ext4_sha256), st, 3);
	copy_col(info->data_digest, sizeof(info->data_digest), st, 8);
	info->ext4_bytes = (uint64_t)sqlite3_column_int64(st, 4);
	info->created = sqlite3_column_int64(st, 6);
	if ((err = ib_image_meta_parse(&info->meta, (const char *)sqlite3_column_text(st, 5))) < 0)
		ib_error_prefix("image '%s' in the cache index", info->id);
	return err;
}

#define IMAGE_COLS "id, top_key, arch, ext4_sha256, ext4_bytes, meta, created, gen, data_digest"

int ib_cache_image_get(ib_cache *c, const char *id, ib_image_info *info)
{
	sqlite3_stmt *st = NULL;
	ib_image_info tmp;
	char *path = NULL;
	int rc, ret = 0;

	pthread_mutex_lock(&c->lock);
	if (sqlite3_prepare_v2(c->db, "SELECT " IMAGE_COLS " FROM images WHERE id = ?", -1, &st, NULL) !=
	    SQLITE_OK) {
		ret = ib_cache__db_error(c->db, "cannot read the cache index");
		goto out;
	}
	sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
	rc = sqlite3_step(st);
	if (rc == SQLITE_DONE)
		goto out;
	if (rc != SQLITE_ROW) {
		ret = ib_cache__db_error(c->db, "cannot read the cache index");
		goto out;
	}
	path = ib_cache__image_file(c, id, sqlite3_column_int64(st, 7));
	if (!path_is_file(path))
		goto out;
	ret = 1;
	if (info) {
		if ((ret = image_from_row(&tmp, st)) < 0 || (ret = load_image_layers(c, &tmp)) < 0) {
			ib_image_info_clear(&tmp);
			goto out;
		}
		ret = 1;
		*info = tmp;
	}
out:
	sqlite3_finalize(st);
	pthread_mutex_unlock(&c->lock);
	free(path);
	return ret;
}

int ib_cache_image_commit(ib_cache *c, const ib_image_info *info, const char *ext4_tmp)
{
	char *path = NULL, *old = NULL, *images = ib_xasprintf("%s/images", c->dir);
	char *meta = ib_image_meta_dump(info->meta);
	sqlite3_stmt *st = NULL;
	int err = 0, in_tx = 0, lockfd = -1, fd, r;
	int64_t now = (int64_t)time(NULL), gen = 0;
	bool again;

	fd = open(ext4_tmp, O_RDONLY | O_CLOEXEC);
	if (fd < 0 || fsync(fd) < 0) {
		err = ib_error_set_errno(errno, "cannot sync '%s'", ext4_tmp);
		if (fd >= 0)
			close(fd);
		goto out_nolock;
	}
	close(fd);
	/* one commit of an image at a time; the orphan sweep leaves a locked one alone */
	if ((err = ib_cache__lock_image(c, info->id, false, &lockfd)) < 0)
		goto out_nolock;

	pthread_mutex_lock(&c->lock);
	if ((r = ib_cache__row_gen(c, "images", info->id, &gen)) < 0) {
		err = r;
		goto out;
	}
	/* exported again: the new file goes in beside the old one, and the row switches to it */
	again = r == 1;
	if (again)
		old = ib_cache__image_file(c, info->id, gen++);
	path = ib_cache__image_file(c, info->id, gen);
	if (chmod(ext4_tmp, 0600) < 0) {
		err = ib_error_set_errno(errno, "cannot set the mode of '%s'", ext4_tmp);
		goto out;
	}
	if (rename(ext4_tmp, path) < 0) {
		err = ib_error_set_errno(errno, "cannot move image into '%s'", path);
		goto out;
	}
	if ((err = ib_fsync_dir(images)) < 0)
		goto out;
	IB_CRASH_POINT(again ? "image-reexport:after-rename" : "image-commit:after-rename");
	if ((err = ib_cache__exec(c->db, "BEGIN IMMEDIATE")) < 0)
		goto out;
	in_tx = 1;
	if (sqlite3_prepare_v2(c->db, "INSERT INTO images (id, top_key, arch, ext4_sha256, ext4_bytes, meta, created,"
				      " last_used, gen, data_digest) VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE"
				      " SET top_key = excluded.top_key, arch = excluded.arch,"
				      " ext4_sha256 = excluded.ext4_sha256, ext4_bytes = excluded.ext4_bytes,"
				      " meta = excluded.meta, created = excluded.created,"
				      " last_used = excluded.last_used, gen = excluded.gen,"
				      " data_digest = excluded.data_digest",
			       -1, &st, NULL) != SQLITE_OK) {
		err = ib_cache__db_error(c->db, "cannot update the cache index");
		goto out;
	}
	sqlite3_bind_text(st, 1, info->id, -1, SQLITE_STATIC);
	sqlite3_bind_text(st, 2, info->top_key, -1, SQLITE_STATIC);
	sqlite3_bind_text(st, 3, info->arch, -1, SQLITE_STATIC);
	sqlite3_bind_text(st, 4, info->ext4_sha256, -1, SQLITE_STATIC);
	sqlite3_bind_int64(st, 5, (sqlite3_int64)info->ext4_bytes);
	sqlite3_bind_text(st, 6, meta, -1, SQLITE_STATIC);
	sqlite3_bind_int64(st, 7, now);
	sqlite3_bind_int64(st, 8, now);
	sqlite3_bind_int64(st, 9, gen);
	sqlite3_bind_text(st, 10, info->data_digest, -1, SQLITE_STATIC);
	if (sqlite3_step(st) != SQLITE_DONE) {
		err = ib_cache__db_error(c->db, "cannot update the cache index");
		goto out;
	}
	sqlite3_finalize(st);
	st = NULL;
	/* the compact forms were of the old file */
	if (sqlite3_prepare_v2(c->db, "DELETE FROM image_artifacts WHERE image_id = ?", -1, &st, NULL) != SQLITE_OK) {
		err = ib_cache__db_error(c->db, "cannot update the cache index");
		goto out;
	}
	sqlite3_bind_text(st, 1, info->id, -1, SQLITE_STATIC);
	if (sqlite3_step(st) != SQLITE_DONE) {
		err = ib_cache__db_error(c->db, "cannot update the cache index");
		goto out;
	}
	sqlite3_finalize(st);
	st = NULL;
	if (sqlite3_prepare_v2(c->db, "DELETE FROM image_layers WHERE image_id = ?", -1, &st, NULL) != SQLITE_OK) {
		err = ib_cache__db_error(c->db, "cannot update the cache index");
		goto out;
	}
	sqlite3_bind_text(st, 1, info->id, -1, SQLITE_STATIC);
	if (sqlite3_step(st) != SQLITE_DONE) {
		err = ib_cache__db_error(c->db, "cannot update the cache index");
		goto out;
	}
	sqlite3_finalize(st);
	st = NULL;
	if (sqlite3_prepare_v2(c->db, "INSERT INTO image_layers (image_id, idx, key) VALUES (?,?,?)", -1, &st,
			       NULL) != SQLITE_OK) {
		err = ib_cache__db_error(c->db, "cannot update the cache index");
		goto out;
	}
	for (size_t i = 0; i < info->nlayers; i++) {
		sqlite3_reset(st);
		sqlite3_bind_text(st, 1, info->id, -1, SQLITE_STATIC);
		sqlite3_bind_int64(st, 2, (sqlite3_int64)i);
		sqlite3_bind_text(st, 3, info->layers[i], -1, SQLITE_STATIC);
		if (sqlite3_step(st) != SQLITE_DONE) {
			err = ib_cache__db_error(c->db, "cannot update the cache index");
			goto out;
		}
	}
out:
	sqlite3_finalize(st);
	st = NULL;
	if (in_tx) {
		if (ib_cache__exec(c->db, err ? "ROLLBACK" : "COMMIT") < 0 && !err)
			err = IB_ERROR;
		if (!err)
			IB_CRASH_POINT(again ? "image-reexport:after-row" : "image-commit:after-row");
	}
	if (err && path)
		unlink(path);
	/* the row names the new file: the old one is no one's (a download already open keeps reading it) */
	if (!err && old)
		ib_cache__unlink_image_files(old);
	pthread_mutex_unlock(&c->lock);
	ib_cache_unlock(lockfd);
out_nolock:
	free(meta);
	free(path);
	free(old);
	free(images);
	return err;
}

void ib_cache_touch_image(ib_cache *c, const char *id)
{
	sqlite3_stmt *st = NULL;

	pthread_mutex_lock(&c->lock);
	if (sqlite3_prepare_v2(c->db, "UPDATE images SET last_used = ? WHERE id = ?", -1, &st, NULL) == SQLITE_OK) {
		sqlite3_bind_int64(st, 1, (sqlite3_int64)time(NULL));
		sqlite3_bind_text(st, 2, id, -1, SQLITE_STATIC);
		sqlite3_step(st);
	}
	sqlite3_finalize(st);
	pthread_mutex_unlock(&c->lock);
}

int ib_cache_image_add_source(ib_cache *c, const char *id, const char *source, const char *commit, const char *path)
{
	sqlite3_stmt *st = NULL;
	int err = 0;

	pthread_mutex_lock(&c->lock);
	if (sqlite3_prepare_v2(c->db, "INSERT OR REPLACE INTO image_sources (image_id, source, commit_id, path, warmed)"
				      " VALUES (?,?,?,?,?)", -1, &st, NULL) != SQLITE_OK) {
		err = ib_cache__db_error(c->db, "cannot update the cache index");
		goto out;
	}
	sqlite3_bind_text(st, 1, id, -1, SQLITE_STATIC);
	sqlite3_bind_text(st, 2, source, -1, SQLITE_STATIC);
	sqlite3_bind_text(st, 3, commit, -1, SQLITE_STATIC);
	sqlite3_bind_text(st, 4, path, -1, SQLITE_STATIC);
	sqlite3_bind_int64(st, 5, (sqlite3_int64)time(NULL));
	if (sqlite3_step(st) != SQLITE_DONE)
		err = ib_cache__db_error(c->db, "cannot update the cache index");
out:
	sqlite3_finalize(st);
	pthread_mutex_unlock(&c->lock);
	return err;
}

/* Run a query with one text parameter and hand each row's text columns to a callback. */
static int foreach_row(ib_cache *c, const char *sql, const char *param, int ncols,
		       int (*row)(const char *const *cols, sqlite3_int64 last, void *arg), void *arg)
{
	sqlite3_stmt *st = NULL;
	char ***rows = NULL;
	sqlite3_int64 *lasts = NULL;
	size_t n = 0;
	int rc, err = 0;

	/* collect first: the callback may use the cache */
	pthread_mutex_lock(&c->lock);
	if (sqlite3_prepare_v2(c->db, sql, -1, &st, NULL) != SQLITE_OK) {
		err = ib_cache__db_error(c->db, "cannot read the cache index");
		pthread_mutex_unlock(&c->lock);
		return err;
	}
	sqlite3_bind_text(st, 1, param, -1, SQLITE_STATIC);
	while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
		rows = ib_xrealloc(rows, (n + 1) * sizeof(*rows));
		lasts = ib_xrealloc(lasts, (n + 1) * sizeof(*lasts));
		rows[n] = ib_xcalloc((size_t)ncols, sizeof(char *));
		for (int i = 0; i < ncols; i++) {
			const unsigned char *t = sqlite3_column_text(st, i);
			rows[n][i] = ib_xstrdup(t ? (const char *)t : "");
		}
		lasts[n++] = sqlite3_column_int64(st, ncols);
	}
	if (rc != SQLITE_DONE)
		err = ib_cache__db_error(c->db, "cannot read the cache index");
	sqlite3_finalize(st);
	pthread_mutex_unlock(&c->lock);
	for (size_t i = 0; i < n; i++) {
		if (!err)
			err = row((const char *const *)rows[i], lasts[i], arg);
		for (int k = 0; k < ncols; k++)
			free(rows[i][k]);
		free(rows[i]);
	}
	free(rows);
	free(lasts);
	return err;
}

struct source_arg {
	ib_cache_source_cb cb;
	void *arg;
};

static int source_row(const char *const *cols, sqlite3_int64 last, void *arg)
{
	struct source_arg *a = arg;

	return a->cb(cols[0], cols[1], cols[2], (int64_t)last, a->arg);
}

int ib_cache_image_sources(ib_cache *c, const char *id, ib_cache_source_cb cb, void *arg)
{
	struct source_arg a = { cb, arg };

	return foreach_row(c, "SELECT source, commit_id, path, warmed FROM image_sources WHERE image_id = ?"
			      " ORDER BY warmed, source, path", id, 3, source_row, &a);
}

struct child_arg {
	ib_cache_child_cb cb;
	void *arg;
};

static int child_row(const char *const *cols, sqlite3_int64 last, void *arg)
{
	struct child_arg *a = arg;

	(void)last;
	return a->cb(cols[0], cols[1], cols[2], a->arg);
}

int ib_cache_layer_children(ib_cache *c, const char *parent, ib_cache_child_cb cb, void *arg)
{
	struct child_arg a = { cb, arg };

	return foreach_row(c, "SELECT key, kind, step, last_used FROM layers WHERE parent = ? ORDER BY last_used DESC",
			   parent, 3, child_row, &a);
}

void ib_cache_touch_layer(ib_cache *c, const char *key)
{
	sqlite3_stmt *st = NULL;

	pthread_mutex_lock(&c->lock);
	if (sqlite3_prepare_v2(c->db, "UPDATE layers SET last_used = ? WHERE key = ?", -1, &st, NULL) == SQLITE_OK) {
		sqlite3_bind_int64(st, 1, (sqlite3_int64)time(NULL));
		sqlite3_bind_text(st, 2, key, -1, SQLITE_STATIC);
		sqlite3_step(st);
	}
	sqlite3_finalize(st);
	pthread_mutex_unlock(&c->lock);
}

int ib_cache_images_foreach(ib_cache *c, ib_cache_image_cb cb, void *arg)
{
	sqlite3_stmt *st = NULL;
	ib_image_info *rows = NULL;
	size_t n = 0;
	int rc, err = 0;

	/* Collect first: the callback may use the cache itself. */
	pthread_mutex_lock(&c->lock);
	if (sqlite3_prepare_v2(c->db, "SELECT " IMAGE_COLS " FROM images ORDER BY created DESC, id", -1, &st,
			       NULL) != SQLITE_OK) {
		err = ib_cache__db_error(c->db, "cannot read the cache index");
		pthread_mutex_unlock(&c->lock);
		return err;
	}
	while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
		rows = ib_xrealloc(rows, (n + 1) * sizeof(*rows));
		err = image_from_row(&rows[n], st);
		n++;
		if (err < 0 || (err = load_image_layers(c, &rows[n - 1])) < 0)
			break;
	}
	if (!err && rc != SQLITE_DONE)
		err = ib_cache__db_error(c->db, "cannot read the cache index");
	sqlite3_finalize(st);
	pthread_mutex_unlock(&c->lock);
	for (size_t i = 0; i < n && !err; i++)
		err = cb(&rows[i], arg);
	for (size_t i = 0; i < n; i++)
		ib_image_info_clear(&rows[i]);
	free(rows);
	return err;
}

/* Cache eviction: see ib_cache_gc() in cache.h. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cache/cache-internal.h"
#include "lib/crash.h"
#include "lib/util.h"

struct gc_image {
	char id[IB_SHA256_HEX];
	int64_t last_used;
	uint64_t bytes;
	bool gone;
};

struct gc_layer {
	char key[IB_SHA256_HEX];
	int64_t last_used;
	uint64_t bytes;
	unsigned refs; /* remaining images that need it */
	bool gone;
	bool busy;     /* in use: left alone */
};

struct gc {
	ib_cache *c;
	const ib_gc_opts *opts;
	ib_gc_report_cb report;
	void *arg;
	ib_gc_result res;
	struct gc_image *images;
	size_t nimages;
	struct gc_layer *layers;
	size_t nlayers;
	/* image i needs layers links[i][0..nlinks[i]) (indexes into layers) */
	size_t **links;
	size_t *nlinks;
	uint64_t total;
};

static int cmp_layer_key(const void *a, const void *b)
{
	return strcmp(((const struct gc_layer *)a)->key, ((const struct gc_layer *)b)->key);
}

static struct gc_layer *find_layer(struct gc *g, const char *key)
{
	struct gc_layer probe;

	snprintf(probe.key, sizeof(probe.key), "%s", key);
	return bsearch(&probe, g->layers, g->nlayers, sizeof(*g->layers), cmp_layer_key);
}

static uint64_t file_blocks(const char *path)
{
	struct stat st;

	return stat(path, &st) == 0 ? (uint64_t)st.st_blocks * 512 : 0;
}

static int load(struct gc *g)
{
	ib_cache *c = g->c;
	sqlite3_stmt *st = NULL;
	int rc, err = 0;

	pthread_mutex_lock(&c->lock);
	if (sqlite3_prepare_v2(c->db, "SELECT key, last_used, bytes FROM layers ORDER BY key", -1, &st, NULL) !=
	    SQLITE_OK) {
		err = ib_cache__db_error(c->db, "cannot read the cache index");
		goto out;
	}
	while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
		g->layers = ib_xrealloc(g->layers, (g->nlayers + 1) * sizeof(*g->layers));
		struct gc_layer *l = &g->layers[g->nlayers++];
		memset(l, 0, sizeof(*l));
		snprintf(l->key, sizeof(l->key), "%s", (const char *)sqlite3_column_text(st, 0));
		l->last_used = sqlite3_column_int64(st, 1);
		l->bytes = (uint64_t)sqlite3_column_int64(st, 2);
		g->total += l->bytes;
	}
	sqlite3_finalize(st);
	st = NULL;
	if (sqlite3_prepare_v2(c->db, "SELECT id, last_used FROM images ORDER BY last_used, id", -1, &st, NULL) !=
	    SQLITE_OK) {
		err = ib_cache__db_error(c->db, "cannot read the cache index");
		goto out;
	}
	while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
		g->images = ib_xrealloc(g->images, (g->nimages + 1) * sizeof(*g->images));
		struct gc_image *im = &g->images[g->nimages++];
		memset(im, 0, sizeof(*im));
		snprintf(im->id, sizeof(im->id), "%s", (const char *)sqlite3_column_text(st, 0));
		im->last_used = sqlite3_column_int64(st, 1);
	}
	sqlite3_finalize(st);
	st = NULL;
	g->links = ib_xcalloc(g->nimages + 1, sizeof(*g->links));
	g->nlinks = ib_xcalloc(g->nimages + 1, sizeof(*g->nlinks));
	if (sqlite3_prepare_v2(c->db, "SELECT key FROM image_layers WHERE image_id = ?", -1, &st, NULL) != SQLITE_OK) {
		err = ib_cache__db_error(c->db, "cannot read the cache index");
		goto out;
	}
	for (size_t i = 0; i < g->nimages; i++) {
		sqlite3_reset(st);
		sqlite3_bind_text(st, 1, g->images[i].id, -1, SQLITE_STATIC);
		while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
			struct gc_layer *l = find_layer(g, (const char *)sqlite3_column_text(st, 0));
			if (!l)
				continue;
			g->links[i] = ib_xrealloc(g->links[i], (g->nlinks[i] + 1) * sizeof(size_t));
			g->links[i][g->nlinks[i]++] = (size_t)(l - g->layers);
			l->refs++;
		}
	}
out:
	sqlite3_finalize(st);
	pthread_mutex_unlock(&c->lock);
	if (!err) {
		for (size_t i = 0; i < g->nimages; i++) {
			char *path = ib_cache_image_path(c, g->images[i].id);
			/* the image and its compact forms, which go with it */
			g->images[i].bytes = file_blocks(path);
			for (int k = 0; k < IB_ARTIFACT_COUNT; k++) {
				char *a = ib_xasprintf("%s%s", path, ib_cache__artifact_suffix[k]);
				g->images[i].bytes += file_blocks(a);
				free(a);
			}
			g->total += g->images[i].bytes;
			free(path);
		}
	}
	return err;
}

static int evict_image(struct gc *g, struct gc_image *im)
{
	ib_cache *c = g->c;
	sqlite3_stmt *st = NULL;
	char *path;
	int err = 0;

	if (!g->opts->dry_run) {
		int64_t gen = 0;
		/* the row first: a crash after it leaves a file no row points at, which gc collects */
		pthread_mutex_lock(&c->lock);
		if ((err = ib_cache__row_gen(c, "images", im->id, &gen)) < 0) {
			pthread_mutex_unlock(&c->lock);
			return err;
		}
		path = ib_cache__image_file(c, im->id, gen);
		err = 0;
		if (sqlite3_prepare_v2(c->db, "DELETE FROM images WHERE id = ?", -1, &st, NULL) != SQLITE_OK) {
			err = ib_cache__db_error(c->db, "cannot update the cache index");
		} else {
			sqlite3_bind_text(st, 1, im->id, -1, SQLITE_STATIC);
			if (sqlite3_step(st) != SQLITE_DONE)
				err = ib_cache__db_error(c->db, "cannot update the cache index");
		}
		sqlite3_finalize(st);
		pthread_mutex_unlock(&c->lock);
		if (err) {
			free(path);
			return err;
		}
		IB_CRASH_POINT("gc:after-image-row");
		ib_cache__unlink_image_files(path);
		free(path);
		if (err)
			return err;
	}
	im->gone = true;
	g->total -= im->bytes;
	g->res.freed += im->bytes;
	g->res.images++;
	if (g->report)
		g->report("image", im->id, im->bytes, im->last_used, g->arg);
	return 0;
}

/* Remove a layer unless it is in use; 1 removed, 0 in use, <0 error. */
static int evict_layer(struct gc *g, struct gc_layer *l)
{
	ib_cache *c = g->c;
	int fd = -1, err;

	err = ib_cache_lock_layer(c, l->key, IB_LOCK_NOWAIT, NULL, 0, &fd, NULL);
	if (err == IB_EEXISTS) {
		l->busy = true;
		g->res.in_use++;
		return 0;
	}
	if (err < 0)
		return err;
	if (!g->opts->dry_run)
		err = ib_cache_layer_remove(c, l->key);
	ib_cache_unlock(fd);
	if (err)
		return err;
	l->gone = true;
	g->total -= l->bytes;
	g->res.freed += l->bytes;
	g->res.layers++;
	if (g->report)
		g->report("layer", l->key, l->bytes, l->last_used, g->arg);
	return 1;
}

/* An image and then the layers no remaining image needs. */
static int evict_image_and_layers(struct gc *g, size_t i)
{
	int err = evict_image(g, &g->images[i]);

	if (err)
		return err;
	for (size_t k = 0; k < g->nlinks[i]; k++) {
		struct gc_layer *l = &g->layers[g->links[i][k]];
		if (--l->refs == 0 && !l->gone && !l->busy && (err = evict_layer(g, l)) < 0)
			return err;
	}
	return 0;
}

static bool over(const struct gc *g)
{
	return g->opts->has_max && g->total > g->opts->max_bytes;
}

int ib_cache_gc(ib_cache *c, const ib_gc_opts *opts, ib_gc_report_cb report, void *arg, ib_gc_result *out)
{
	struct gc g = { .c = c, .opts = opts, .report = report, .arg = arg };
	int64_t now = (int64_t)time(NULL);
	int err;

	if ((err = load(&g)) < 0)
		goto out;
	g.res.bytes_before = g.total;

	/* Too old to keep, whatever the budget. */
	if (opts->keep_days >= 0) {
		for (size_t i = 0; i < g.nimages; i++) {
			if (g.images[i].last_used >= now - opts->keep_days * 86400)
				continue;
			if ((err = evict_image_and_layers(&g, i)) < 0)
				goto out;
		}
	}
	while (over(&g)) {
		struct gc_layer *lru = NULL;
		size_t img = g.nimages;

		/* layers no image needs, least recently used first */
		for (size_t i = 0; i < g.nlayers; i++) {
			struct gc_layer *l = &g.layers[i];
			if (!l->gone && !l->busy && l->refs == 0 && (!lru || l->last_used < lru->last_used))
				lru = l;
		}
		if (lru) {
			if ((err = evict_layer(&g, lru)) < 0)
				goto out;
			continue;
		}
		/* then the least recently used image (images are sorted by last use) */
		for (size_t i = 0; i < g.nimages && img == g.nimages; i++)
			if (!g.images[i].gone)
				img = i;
		if (img == g.nimages)
			break;
		if ((err = evict_image_and_layers(&g, img)) < 0)
			goto out;
	}
	/* what no row names: a crash's leftovers (in gc, a commit, a build), then gone for good */
	{
		ib_orphans orph = { 0 };
		if ((err = ib_cache_orphans(c, !opts->dry_run, NULL, NULL, &orph)) < 0)
			goto out;
		g.res.orphans = orph.count;
		g.res.freed += orph.bytes;
		if (g.total >= orph.bytes && !opts->dry_run)
			g.total -= orph.bytes;
		if (report && orph.count)
			report("orphans", "", orph.bytes, 0, arg);
	}
	g.res.bytes_after = g.total;
	if (out)
		*out = g.res;
out:
	for (size_t i = 0; i < g.nimages; i++)
		free(g.links ? g.links[i] : NULL);
	free(g.links);
	free(g.nlinks);
	free(g.images);
	free(g.layers);
	return err;
}

#ifndef IB_CACHE_INTERNAL_H
#define IB_CACHE_INTERNAL_H

/* Shared by the files of cache/ only. */

#include <pthread.h>
#include <sqlite3.h>

#include <stdbool.h>
#include <stdint.h>

#include "cache/cache.h"

struct ib_cache {
	char *dir;
	sqlite3 *db;
	pthread_mutex_t lock; /* one connection, shared by the server's threads */
};

int ib_cache__db_error(sqlite3 *db, const char *what);
int ib_cache__exec(sqlite3 *db, const char *sql);
/* Remove a layer's row (caller holds c->lock). */
int ib_cache__delete_layer_row(ib_cache *c, const char *key);
/* Move a directory aside into tmp/ and remove it there. */
int ib_cache__discard_dir(ib_cache *c, const char *path);

/* Where generation gen of a layer or an image lives (see migration 4). */
char *ib_cache__layer_dir(const ib_cache *c, const char *key, int64_t gen);
char *ib_cache__image_file(const ib_cache *c, const char *id, int64_t gen);

/* The generation a row names: 1 and *out, 0 no row, <0 error (caller holds c->lock). */
int ib_cache__row_gen(ib_cache *c, const char *table, const char *id, int64_t *out);

/*
 * An image's lock (locks/image-<id>.lock, exclusive): held while its file
 * and row are committed, taken with nowait by the orphan sweep.
 */
int ib_cache__lock_image(ib_cache *c, const char *id, bool nowait, int *out_fd);

/* ".zst", ".bmap": what an artifact adds to its image file's name */
extern const char *const ib_cache__artifact_suffix[];

/* Is the artifact of generation gen indexed?  1, 0, <0 (c->lock held). */
int ib_cache__artifact_indexed(ib_cache *c, const char *id, ib_artifact kind, int64_t gen);

/* Remove an image file and its artifacts. */
void ib_cache__unlink_image_files(const char *file);

/* Scratch dirs in tmp/ whose owner is gone: counted, and removed when asked. */
int ib_cache__sweep_tmp(ib_cache *c, bool remove, unsigned *count, uint64_t *bytes);

#endif

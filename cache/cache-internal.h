#ifndef IB_CACHE_INTERNAL_H
#define IB_CACHE_INTERNAL_H

/* Shared by the files of cache/ only. */

#include <pthread.h>
#include <sqlite3.h>

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

#endif

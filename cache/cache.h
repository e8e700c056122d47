#ifndef IB_CACHE_H
#define IB_CACHE_H

#include <stdbool.h>
#include <stdint.h>

#include "layer/meta.h"
#include "layer/walk.h"
#include "lib/hash.h"

/*
 * The cache: a sqlite index (WAL) beside a content store.
 *
 *   DIR/index.db            layers, images, builds
 *   DIR/layers/<key>/       one overlayfs upper dir per committed layer
 *   DIR/images/<id>.ext4    exported images
 *   DIR/tmp/                scratch for builds in progress (removed on failure)
 *   DIR/locks/<key>.lock    per-layer build locks (flock), shared with any
 *                           other process using the same DIR
 *   DIR/logs/<build>.log    build logs
 *   DIR/apt/<arch>/         apt lists, archives and binary caches shared by apt steps
 *   DIR/downloads/          python archives, one per digest
 *   DIR/git/                bare mirrors of the repositories warm reads specs from
 *
 * Invariant: a row exists only for data that is complete and was verified
 * when committed; files are renamed into place before their row is
 * inserted, and rows are deleted before their files.
 */
typedef struct ib_cache ib_cache;

/*
 * Open (creating when missing) the cache in dir.  A relative dir is taken
 * from the current directory once, here: the cache works with its absolute
 * path from then on (mounts and children need one).  The index's schema,
 * with its migrations, is in cache.c, also for tables that other modules
 * keep there (the service's build records).
 */
int ib_cache_open(ib_cache **out, const char *dir);
void ib_cache_close(ib_cache *cache);

const char *ib_cache_dir(const ib_cache *cache);

/*
 * Where a layer's directory and an image's file are, as the index names
 * them (owned by the caller).  Hold the layer's lock (shared) while using
 * the directory: a forced rebuild replaces it by another generation.
 */
char *ib_cache_layer_path(ib_cache *cache, const char *key);
char *ib_cache_image_path(ib_cache *cache, const char *image_id);

/*
 * A fresh, empty scratch directory under tmp/, owned by the caller, with a
 * lock held on it (*out_lockfd) so that ib_cache_clean_tmp() in another
 * process leaves it alone while this one lives.  ib_cache_rmtemp() removes
 * the directory and releases the lock; both accept NULL / -1.
 */
int ib_cache_mktemp(ib_cache *cache, char **out, int *out_lockfd);
void ib_cache_rmtemp(char *path, int lockfd);

/* Committed layer's row. */
typedef struct ib_layer_info {
	char key[IB_SHA256_HEX];
	char parent[IB_SHA256_HEX]; /* "" for a base */
	char digest[IB_SHA256_HEX]; /* tree digest of the content */
	char kind[32];
	uint64_t bytes;
	uint64_t files;
	double seconds;
} ib_layer_info;

/*
 * Is the layer committed (row present and its directory there)?  Returns 1
 * yes, 0 no, <0 error.  info may be NULL.
 */
int ib_cache_layer_get(ib_cache *cache, const char *key, ib_layer_info *info);

/*
 * Commit a finished layer: tmpdir (already normalised) is hashed, renamed
 * to layers/<key>, then its row is inserted.  On failure nothing of the
 * layer is left in the store (tmpdir is the caller's to remove).  A layer
 * already present is replaced (a forced rebuild).
 */
int ib_cache_layer_commit(ib_cache *cache, const char *key, const char *parent,
			  const char *kind, const char *step, const char *tmpdir,
			  double seconds, ib_layer_info *out_info);

/*
 * The two halves of ib_cache_layer_commit, for a builder that hashes one
 * layer while the next step already runs on it.  ib_cache_layer_seal hashes
 * tmpdir and syncs its file system (what must happen before a row may point
 * at it); it only reads the tree and touches no cache state, so it may run
 * on another thread.  ib_cache_layer_commit_sealed then renames and indexes
 * tmpdir, which must not have changed since it was sealed.
 */
typedef struct ib_layer_seal {
	char digest[IB_SHA256_HEX];
	int version; /* of the digest: IB_TREE_DIGEST_* */
	uint64_t bytes, files;
} ib_layer_seal;

/* opts (may be NULL): the deadline and cancel flag the walk stops at. */
int ib_cache_layer_seal(const char *tmpdir, const ib_walk_opts *opts, ib_layer_seal *seal);
int ib_cache_layer_commit_sealed(ib_cache *cache, const char *key, const char *parent,
				 const char *kind, const char *step, const char *tmpdir,
				 double seconds, const ib_layer_seal *seal, ib_layer_info *out_info);

/* Remove a layer's row, then its directory. */
int ib_cache_layer_remove(ib_cache *cache, const char *key);

/*
 * Per-layer locks (DIR/locks/<key>.lock, flock, shared with every process
 * on the same cache dir).  Exclusive: building the layer, or gc removing
 * it.  Shared: the layer is in use (a lower layer of a running step, part
 * of an export); gc leaves it alone.  A builder that committed a layer
 * downgrades its exclusive lock to shared with ib_cache_share_lock().
 *
 * Waits while the lock is taken the other way; the wait ends with
 * IB_ECANCELED when *cancel becomes non-zero and IB_ETIMEOUT at deadline
 * (an ib_now() value; 0: none); cancel may be NULL.  *out_waited (may be
 * NULL) says whether it had to wait.  With nowait, a taken lock is
 * IB_EEXISTS at once.
 */
#define IB_LOCK_SHARED 0x1
#define IB_LOCK_NOWAIT 0x2

int ib_cache_lock_layer(ib_cache *cache, const char *key, unsigned flags, volatile int *cancel, double deadline,
			int *out_fd, bool *out_waited);
int ib_cache_share_lock(int fd);
void ib_cache_unlock(int fd);

/* An image's row. */
typedef struct ib_image_info {
	char id[IB_SHA256_HEX];
	char top_key[IB_SHA256_HEX];
	char ext4_sha256[IB_SHA256_HEX]; /* the file's SHA-256; "" until ib_cache_image_digest() made it */
	char data_digest[IB_SHA256_HEX]; /* what verify checks (lib/hash.h); "" for images of 0.1 */
	uint64_t ext4_bytes;
	char arch[16];
	int64_t created;
	ib_image_meta *meta; /* image.json, parsed (owned) */
	char **layers; /* keys bottom first, NULL-terminated (owned) */
	size_t nlayers;
} ib_image_info;

void ib_image_info_clear(ib_image_info *info);

/* 1 found (and its ext4 present), 0 not, <0 error.  info may be NULL. */
int ib_cache_image_get(ib_cache *cache, const char *id, ib_image_info *info);

/*
 * Commit an exported image: ext4_tmp is renamed to images/<id>.ext4, then
 * the row (with the layer list, metadata and data digest; ext4_sha256 may
 * be "") is inserted.
 */
int ib_cache_image_commit(ib_cache *cache, const ib_image_info *info, const char *ext4_tmp);

/*
 * An image's compact forms for transfer (layer/compact.h): the zstd stream
 * and bmaptool's block map of its file.  Made on first use from the
 * image's current file, kept beside it and indexed (with their SHA-256,
 * the ETag they are served with), gone with the image (gc, a re-export).
 * Concurrent askers wait for the one that makes it.
 */
typedef enum ib_artifact {
	IB_ARTIFACT_ZST,
	IB_ARTIFACT_BMAP,
	IB_ARTIFACT_COUNT,
} ib_artifact;

typedef struct ib_artifact_info {
	char *path;                 /* its file (owned) */
	char sha256[IB_SHA256_HEX];
	uint64_t bytes;
} ib_artifact_info;

/* IB_ENOTFOUND when the image is not in the cache. */
int ib_cache_image_artifact(ib_cache *cache, const char *image_id, ib_artifact kind, ib_artifact_info *out);
void ib_artifact_info_clear(ib_artifact_info *info);

/*
 * The image file's SHA-256 (its ETag, GetImage's ext4_sha256): kept in the
 * index, made from the file when first asked for (reading only its data:
 * about a second per GiB of file).  IB_ENOTFOUND when there is no image.
 */
int ib_cache_image_digest(ib_cache *cache, const char *image_id, char hex[IB_SHA256_HEX]);

/* Mark an image or layer used now (gc's LRU clock). */
void ib_cache_touch_image(ib_cache *cache, const char *id);
void ib_cache_touch_layer(ib_cache *cache, const char *key);

/*
 * Eviction.  Images unused for more than keep_days days go first (when
 * keep_days >= 0); then, while the cache (layers and images, as allocated
 * on disk) is over max_bytes (when has_max): layers no image needs, least
 * recently used first, then least recently used images, each with the
 * layers only it needed.  A layer in use (a build or export holds its
 * lock) is never removed.  Rows go before files, so a crash at any point
 * leaves an index that points only at intact data; what such a crash left
 * without a row (and every other orphan, see ib_cache_orphans) is removed
 * by the next gc, and counted in freed.
 */
typedef struct ib_gc_opts {
	bool has_max;
	uint64_t max_bytes;
	int64_t keep_days; /* < 0: no age limit */
	bool dry_run;
} ib_gc_opts;

typedef struct ib_gc_result {
	uint64_t bytes_before;
	uint64_t bytes_after;
	uint64_t freed;
	unsigned images;
	unsigned layers;
	unsigned in_use; /* layers left alone because they were in use */
	unsigned orphans; /* what no row named (a crash's leftovers), removed */
} ib_gc_result;

/* report: "image" or "layer", its id, bytes freed, last use (unix time). */
typedef void (*ib_gc_report_cb)(const char *what, const char *id, uint64_t bytes, int64_t last_used, void *arg);

int ib_cache_gc(ib_cache *cache, const ib_gc_opts *opts, ib_gc_report_cb report, void *arg, ib_gc_result *out);

/* Record where an image was warmed from (a git URL, a commit, a path in it). */
int ib_cache_image_add_source(ib_cache *cache, const char *id, const char *source, const char *commit,
			      const char *path);

typedef int (*ib_cache_source_cb)(const char *source, const char *commit, const char *path, int64_t warmed,
				  void *arg);
int ib_cache_image_sources(ib_cache *cache, const char *id, ib_cache_source_cb cb, void *arg);

/* The committed layers whose parent is key: their kind and canonical step. */
typedef int (*ib_cache_child_cb)(const char *key, const char *kind, const char *step, void *arg);
int ib_cache_layer_children(ib_cache *cache, const char *parent, ib_cache_child_cb cb, void *arg);

/* Iterate images newest first. */
typedef int (*ib_cache_image_cb)(const ib_image_info *info, void *arg);
int ib_cache_images_foreach(ib_cache *cache, ib_cache_image_cb cb, void *arg);

/*
 * What no row names: layer directories and image files (a crash between a
 * file operation and its row, in a commit or in gc), scratch dirs of dead
 * builds in tmp/, partial downloads of dead processes.  Each is reported
 * (report may be NULL) with its allocated bytes; with remove, removed.  An
 * item being committed right now is locked and left alone.
 */
typedef struct ib_orphans {
	unsigned count;
	uint64_t bytes;
} ib_orphans;

typedef void (*ib_cache_report_cb)(const char *what, const char *msg, bool problem, void *arg);
int ib_cache_orphans(ib_cache *cache, bool remove, ib_cache_report_cb report, void *arg, ib_orphans *out);

/*
 * Re-hash every layer and image and check every row points at intact data;
 * report() is called once per problem (problem true) and per note (orphans,
 * what a repair did).  With repair: rows whose data is missing or altered
 * are removed with their data (an image with them, and every image that
 * needs such a layer; a layer in use by a build is left alone), and
 * orphans are removed.  Nothing that verifies is touched.
 */
typedef struct ib_verify_opts {
	bool repair;
} ib_verify_opts;

typedef struct ib_verify_result {
	unsigned problems;      /* what does not verify (found before any repair) */
	unsigned repaired;      /* layers and images removed by the repair */
	unsigned orphans;       /* found (and with repair, removed) */
	uint64_t orphan_bytes;  /* their allocated bytes */
} ib_verify_result;

int ib_cache_verify(ib_cache *cache, const ib_verify_opts *opts, ib_cache_report_cb report, void *arg,
		    ib_verify_result *out);

/* Remove scratch directories left by builds that died (called on open by builders). */
int ib_cache_clean_tmp(ib_cache *cache);

#endif

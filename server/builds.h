#ifndef IB_BUILDS_H
#define IB_BUILDS_H

#include <stdbool.h>
#include <stdint.h>

#include "lib/limits.h"
#include "cache/cache.h"

/*
 * The service's build records: the `builds` table of the cache index, so
 * that a build's status, steps and error outlive the daemon that ran it.
 *
 * The store keeps its own sqlite connection (the cache's one serialises
 * layer commits, which fsync; a status poll must not wait behind them).
 * Every function is safe to call from any thread.
 *
 * A record moves QUEUED -> BUILDING -> one final status (READY, FAILED,
 * CANCELLED, TIMEOUT), or QUEUED -> a final status.  A daemon that dies
 * leaves records that are not final; ib_builds_recover() finishes them.
 */
typedef struct ib_builds ib_builds;

typedef struct ib_build_record {
	char id[IB_BUILD_ID_MAX];
	char image_id[IB_SHA256_HEX];
	char status[16];      /* "QUEUED", "BUILDING", "READY", ... */
	char *spec;           /* canonical spec document (owned) */
	int64_t created;      /* unix seconds */
	int64_t started;      /* 0: not started */
	int64_t finished;     /* 0: not finished */
	bool force;
	bool cached;          /* the image was in the cache when the build ran */
	int64_t timeout_s;
	char *steps;          /* JSON array of the steps, or NULL (owned) */
	int error_step;       /* layer index of the failure, -1 when none */
	char *error;          /* error message, or NULL (owned) */
	char *log_tail;       /* end of the failing step's output, or NULL (owned) */
} ib_build_record;

/* Free what a record owns; the record itself is the caller's. */
void ib_build_record_clear(ib_build_record *rec);

/* Open the store of an open cache; the cache must outlive it. */
int ib_builds_open(ib_builds **out, ib_cache *cache);
void ib_builds_close(ib_builds *builds);

/* Insert a new record (any status); IB_EEXISTS when the id is taken. */
int ib_builds_insert(ib_builds *builds, const ib_build_record *rec);

/* QUEUED -> BUILDING, with its start time and the steps as planned. */
int ib_builds_start(ib_builds *builds, const char *id, int64_t started, const char *steps);

/*
 * Record the outcome: status (final), finished, cached, steps, error_step,
 * error and log_tail are taken from rec.  Only a record that is not final
 * yet changes: IB_ENOTFOUND when there is none such.
 */
int ib_builds_finish(ib_builds *builds, const ib_build_record *rec);

/* 1 and *out filled, 0 no such build, <0 error.  out may be NULL. */
int ib_builds_get(ib_builds *builds, const char *id, ib_build_record *out);

/*
 * The newest READY build of an image: 1 and its id in out, 0 none, <0
 * error.
 */
int ib_builds_last_ready(ib_builds *builds, const char *image_id, char out[IB_BUILD_ID_MAX]);

/*
 * After a crash: every record that is not final becomes FAILED with the
 * error message reason.  cb (may be NULL) sees each one first and may
 * return its log tail (malloc'd, or NULL) to keep in the record.
 * *out_count (may be NULL) receives how many there were.  Only the daemon
 * that owns the cache dir may call it (see ib_server_start).
 */
typedef char *(*ib_builds_recover_cb)(const ib_build_record *rec, void *arg);
int ib_builds_recover(ib_builds *builds, const char *reason, ib_builds_recover_cb cb, void *arg,
		      unsigned *out_count);

/* Is s a final status? */
bool ib_build_status_final(const char *s);

#endif

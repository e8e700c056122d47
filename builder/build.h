#ifndef IB_BUILD_H
#define IB_BUILD_H

#include <stdbool.h>
#include <stdint.h>

#include "builder/config.h"
#include "builder/runner.h"
#include "cache/cache.h"
#include "spec/plan.h"

/*
 * A build: the plan of a spec (spec/plan.h) and what happened to each of
 * its layers.  ib_build_new() plans (reading the base's definition and the
 * python table), ib_build_run() builds or finds the image; other threads
 * follow a running build through ib_build_status_get().
 */
typedef struct ib_build ib_build;

typedef enum ib_layer_state {
	IB_LAYER_PENDING,
	IB_LAYER_RUNNING,
	IB_LAYER_CACHED,
	IB_LAYER_DONE,
	IB_LAYER_FAILED,
} ib_layer_state;

/* "pending", "running", "cached", "done", "failed" */
const char *ib_layer_state_name(ib_layer_state s);

/*
 * Plan spec with cfg (both borrowed: they must outlive the build); nothing
 * runs.  A python version the table lacks is IB_EINVALID.
 */
int ib_build_new(ib_build **out, const ib_spec *spec, const ib_config *cfg);
void ib_build_free(ib_build *b);

/* The plan: keys, kinds, image id.  Never changes. */
const ib_plan *ib_build_plan(const ib_build *b);

/* Where a layer of a build came from. */
typedef enum ib_layer_source {
	IB_SOURCE_NONE,   /* not there yet */
	IB_SOURCE_BUILT,  /* built by this build */
	IB_SOURCE_CACHE,  /* found in the local cache */
	IB_SOURCE_REMOTE, /* pulled from the remote */
} ib_layer_source;

/* "built", "cache", "remote"; NULL for none */
const char *ib_layer_source_name(ib_layer_source s);

typedef struct ib_build_layer_status {
	ib_layer_state state;
	ib_layer_source source;
	bool cached;
	double seconds;
} ib_build_layer_status;

/*
 * A snapshot of a build's results, consistent at one moment, for the
 * reader to keep: layers[] parallels the plan's layers.
 */
typedef struct ib_build_status {
	size_t nlayers;
	ib_build_layer_status *layers;
	bool cached;                      /* the image was in the cache already */
	char ext4_sha256[IB_SHA256_HEX];  /* "" until known (ib_cache_image_digest() makes it) */
	uint64_t ext4_bytes;
	int failed_layer;                 /* -1 when none */
	char *error;                      /* NULL unless the build failed */
	char *log_tail;                   /* the end of the failing step's output, or NULL */
} ib_build_status;

/* Take a snapshot (any thread, any time); release it with ib_build_status_clear(). */
void ib_build_status_get(ib_build *b, ib_build_status *out);
void ib_build_status_clear(ib_build_status *s);

typedef struct ib_build_opts {
	bool force;              /* rebuild every step's layer (not the base) even when cached */
	double timeout;          /* seconds for the whole build; 0: the default */
	const char *output;      /* also write the ext4 image here, or NULL */
	int log_fd;              /* build log (step output and progress), or -1 */
	ib_output_cb progress;   /* progress lines and step output, or NULL */
	void *progress_arg;
	volatile int *cancel;    /* set non-zero to cancel */
	const ib_runner_ops *runner; /* NULL: the namespace runner */
	const ib_limits *limits; /* NULL: the configuration's */
	bool push;               /* the remote must end up with every layer and the image: a push that fails,
	                            or no remote, fails the build (warm --push) */
} ib_build_opts;

/*
 * Build (or find) the image.  Returns 0, IB_ETIMEOUT, IB_ECANCELED or
 * IB_ERROR; the status's error and failed_layer say what failed.  Whatever
 * happens, the cache is left as sound as before: only complete layers are
 * committed.  Run a build once.
 */
int ib_build_run(ib_build *b, ib_cache *cache, const ib_build_opts *opts);

#endif

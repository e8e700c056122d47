#ifndef IB_BUILD_H
#define IB_BUILD_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "cache/cache.h"
#include "runner.h"
#include "spec.h"

/* SOURCE_DATE_EPOCH when unset: 2023-06-10T00:00:00Z, Debian 12's release day. */
#define IB_DEFAULT_EPOCH 1686355200LL

/* The epoch in force: SOURCE_DATE_EPOCH if set and valid, else the default. */
int ib_build_epoch(int64_t *out);

typedef enum ib_layer_state {
	IB_LAYER_PENDING,
	IB_LAYER_RUNNING,
	IB_LAYER_CACHED,
	IB_LAYER_DONE,
	IB_LAYER_FAILED,
} ib_layer_state;

const char *ib_layer_state_name(ib_layer_state s);

typedef struct ib_build_layer {
	int index;
	const char *kind;  /* "base", "python", "apt_install", ... (static) */
	const ib_step *step; /* the spec's step; NULL for the base and python layers */
	char key[IB_SHA256_HEX];
	char *canonical;   /* canonical step (for a base: its definition) */
	ib_layer_state state;
	bool cached;
	double seconds;
} ib_build_layer;

/*
 * A build: the layers a spec needs, with their keys, and what happened to
 * each.  Made by ib_build_plan(), filled by ib_build_run().
 */
typedef struct ib_build {
	/*
	 * Guards the results below (layer states and seconds, cached,
	 * ext4_*, failed_layer, error, log_tail) for readers on other
	 * threads; the plan (keys, kinds) never changes after ib_build_plan.
	 */
	pthread_mutex_t mu;
	const ib_spec *spec; /* borrowed */
	char *arch;          /* Debian architecture of the base */
	char *machine;       /* its uname -m: "x86_64", "aarch64" */
	struct ib_python_pin *python; /* the pinned python, or NULL */
	int64_t epoch;
	char image_id[IB_SHA256_HEX];
	size_t nlayers;
	ib_build_layer *layers;
	json_t *env;         /* the image's env: every env step merged in order */
	/* results */
	bool cached;         /* the image was in the cache already */
	char ext4_sha256[IB_SHA256_HEX];
	uint64_t ext4_bytes;
	int failed_layer;    /* -1 when none */
	char *error;         /* message when the build failed */
	char *log_tail;      /* the end of the failing step's output */
} ib_build;

/* Hold mu to read a running build's results from another thread. */
void ib_build_lock(ib_build *b);
void ib_build_unlock(ib_build *b);

/* Compute keys and the image id for spec (nothing runs). */
int ib_build_plan(ib_build **out, const ib_spec *spec);
void ib_build_free(ib_build *b);

typedef struct ib_build_opts {
	bool force;              /* rebuild every step's layer (not the base) even when cached */
	double timeout;          /* seconds for the whole build; 0: the default */
	const char *output;      /* also write the ext4 image here, or NULL */
	int log_fd;              /* build log (step output and progress), or -1 */
	ib_output_cb progress;   /* progress lines and step output, or NULL */
	void *progress_arg;
	volatile int *cancel;    /* set non-zero to cancel */
	const char *apt_mirror;  /* NULL: the host's apt sources */
	const char *pip_index_url;
	const ib_runner_ops *runner; /* NULL: the namespace runner */
} ib_build_opts;

/*
 * Build (or find) the image.  Returns 0, IB_ETIMEOUT, IB_ECANCELED or
 * IB_ERROR; b->error and b->failed_layer say what failed.  Whatever
 * happens, the cache is left as sound as before: only complete layers are
 * committed.
 */
int ib_build_run(ib_build *b, ib_cache *cache, const ib_build_opts *opts);

/* The image.json document for a planned build (owned by the caller). */
char *ib_build_image_json(const ib_build *b);

/*
 * Export an image from its layers: ext4 (tar == false) or tar.  Adds the
 * metadata layer (/etc/imagebuilder/image.json, /etc/environment, and the
 * init when the image has none).  *out_meta (may be NULL) receives the
 * image.json the image holds (with the "init" it got).
 */
int ib_build_export(ib_cache *cache, const ib_image_info *img, const char *out_path, bool tar, char **out_meta);

#endif

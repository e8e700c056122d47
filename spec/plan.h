#ifndef IB_PLAN_H
#define IB_PLAN_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "spec/basedef.h"
#include "spec/pytable.h"
#include "spec/spec.h"

/*
 * The plan of a build: every layer a spec needs, bottom first, with its
 * canonical form and key, and the image id.  A pure function of the spec,
 * the base's definition, the python pin and the epoch: no file is read and
 * nothing runs, so the same inputs give the same ids on every machine.
 *
 *   layer 0          the base: its definition and the epoch
 *   layer 1          the pinned python, when the spec pins one
 *   then             one layer per step of the spec
 */

/* SOURCE_DATE_EPOCH when unset: 2023-06-10T00:00:00Z, Debian 12's release day. */
#define IB_DEFAULT_EPOCH 1686355200LL

/* Installed with a pinned python: decorated functions run through it. */
#define IB_PYTHON_RUNTIME_PACKAGE "cloudpickle"

typedef struct ib_plan_layer {
	const char *kind;     /* "base", "python", or the step kind's name (static) */
	const ib_step *step;  /* the spec's step; NULL for the base and python layers */
	char *canonical;      /* what the key covers (for the base: definition and epoch) */
	char key[IB_SHA256_HEX];
} ib_plan_layer;

typedef struct ib_plan {
	const ib_spec *spec;  /* borrowed: must outlive the plan */
	char *arch;           /* Debian architecture of the base: "amd64" */
	char *machine;        /* its uname -m: "x86_64" */
	ib_python_pin *python; /* a copy of the pin, or NULL when not pinned */
	int64_t epoch;
	char image_id[IB_SHA256_HEX];
	size_t nlayers;
	ib_plan_layer *layers;
	json_t *env;          /* the image's env: every env step merged in order */
} ib_plan;

/*
 * Plan spec on base.  python is the pin of spec->python_version (required
 * when the spec pins one, ignored otherwise).  The caller frees the plan.
 */
int ib_plan_make(ib_plan **out, const ib_spec *spec, const ib_basedef *base, const ib_python_pin *python,
		 int64_t epoch);
void ib_plan_free(ib_plan *plan);

/*
 * What the step at layer index runs with, on top of the fixed build
 * variables: every env step below it merged in order (a new object, the
 * caller's).
 */
json_t *ib_plan_env_below(const ib_plan *plan, size_t index);

#endif

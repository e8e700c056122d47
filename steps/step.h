#ifndef IB_STEP_H
#define IB_STEP_H

#include <jansson.h>

#include "lib/util.h"

/*
 * One step kind.  Each kind lives in one file in steps/ and registers its
 * ops in steps/registry.c.
 */

/* What a step needs to know about where it runs. */
typedef struct ib_step_ctx {
	const char *arch;          /* Debian architecture: "amd64", "arm64" */
	const char *pip_index_url; /* IMAGEBUILDER_PIP_INDEX_URL or NULL */
	const char *python;        /* python3 to use for pip ("python3" on PATH) */
	bool apt_lists_fresh;      /* this build already fetched the package lists */
} ib_step_ctx;

/*
 * The commands a step runs in the sandbox, in order; the first that exits
 * non-zero fails the step.  Every command is an argv; only run_commands
 * passes a shell line, as the argument of /bin/sh -c.
 */
typedef struct ib_step_plan {
	size_t ncmds;
	ib_strv *cmds;
	unsigned flags;
	/*
	 * KEY=VALUE for every command of the step, on top of (and winning
	 * over) the image's env: DEBIAN_FRONTEND for apt, PIP_* for pip.
	 */
	ib_strv env;
} ib_step_plan;

#define IB_STEP_PLAN_INIT { 0, NULL, 0, IB_STRV_INIT }

#define IB_PLAN_APT_CACHE 0x1 /* mount the shared apt lists/archives */

/* Append a copy of argv (argv->v[0] is the program) as the next command. */
void ib_step_plan_add(ib_step_plan *plan, const ib_strv *argv);
/* Release everything; the plan is IB_STEP_PLAN_INIT afterwards.  NULL is fine. */
void ib_step_plan_free(ib_step_plan *plan);

/*
 * Check the argument of a kind that takes a list of strings: an array of
 * 1 to IB_STEP_MAX_ITEMS strings, each non-empty, at most max bytes, without
 * NUL, and accepted by item_ok.  what names one item in messages ("package
 * name").  item_ok gets the item's own field ("steps[0].apt_install[2]")
 * and sets the message itself.
 */
int ib_step_check_list(const json_t *arg, const char *field, const char *what, size_t max,
		       int (*item_ok)(const char *s, size_t len, const char *field));

/*
 * What the build needs to know about a kind, beyond its commands.
 *
 * IB_STEP_ENV: the argument is an object of variables that every later
 * step runs with and the image records (/etc/environment, image.json).
 *
 * IB_STEP_APT_LISTS: the kind runs nothing but apt-get with the shared
 * package lists, so after it succeeds the lists are as current as the
 * image's sources make them; a later apt step of the same build may skip
 * its update.  Any other kind that runs commands may change the sources.
 */
#define IB_STEP_ENV		0x1
#define IB_STEP_APT_LISTS	0x2

typedef struct ib_step_ops {
	const char *name; /* the spec key: "apt_install" */
	unsigned flags;   /* IB_STEP_* */
	/*
	 * Check the argument.  field is the path used in messages
	 * ("steps[2].apt_install"); on failure return IB_EINVALID with a
	 * message that starts with the field (or an element of it).
	 */
	int (*validate)(const json_t *arg, const char *field);
	/*
	 * Commands to run for the step, for a validated arg, into *out, which
	 * is IB_STEP_PLAN_INIT.  An empty plan (env) runs nothing and gives an
	 * empty layer.  On failure (a bad ctx) *out is left empty.
	 */
	int (*plan)(ib_step_plan *out, const json_t *arg, const ib_step_ctx *ctx);
} ib_step_ops;

extern const ib_step_ops ib_step_apt_install;
extern const ib_step_ops ib_step_pip_install;
extern const ib_step_ops ib_step_run_commands;
extern const ib_step_ops ib_step_env;

/* Look a step kind up by its spec key; NULL when unknown. */
const ib_step_ops *ib_step_lookup(const char *name);

/* Names of all kinds, for messages: "apt_install, pip_install, ..." */
const char *ib_step_kinds(void);

#endif

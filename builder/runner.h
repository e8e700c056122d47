#ifndef IB_RUNNER_H
#define IB_RUNNER_H

#include <stddef.h>

#include "lib/util.h"
#include "steps/step.h"

/*
 * A runner executes one step's commands on top of a layer stack and leaves
 * what they changed in an empty upper directory.  The namespace runner
 * (sandbox.c) is the one in use; a throwaway-VM runner implements the same
 * ops later.
 */

typedef struct ib_run_req {
	const char *const *lowers; /* layer directories, bottom first */
	size_t nlowers;
	const char *upper;  /* empty directory that receives the changes */
	const char *scratch; /* private directory on upper's file system, for work dirs */
	const ib_step_plan *plan;
	const char *const *env;     /* KEY=VALUE, NULL-terminated */
	const char *apt_lists;      /* host directories bound in for IB_PLAN_APT_CACHE */
	const char *apt_cache;      /* bound over /var/cache/apt (archives, binary caches) */
	const char *resolv_conf;    /* host file bound at /etc/resolv.conf, or NULL */
	double deadline;            /* ib_now() value after which the step is killed; 0: none */
	volatile int *cancel;       /* non-zero: kill the step now; may be NULL */
	ib_output_cb output;        /* may be NULL */
	void *output_arg;
} ib_run_req;

typedef struct ib_runner_ops {
	const char *name;
	/*
	 * Run every command of req->plan in order.  Returns 0 when all
	 * exited 0; IB_ETIMEOUT or IB_ECANCELED after killing the step's
	 * whole process tree; IB_ERROR with a message naming the command
	 * and its exit status otherwise.
	 */
	int (*run)(const ib_run_req *req);
} ib_runner_ops;

extern const ib_runner_ops ib_runner_namespace;

#endif

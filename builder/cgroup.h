#ifndef IB_CGROUP_H
#define IB_CGROUP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "builder/config.h"

/*
 * A build's cgroup: memory (swap off), pids and cpu limits for every
 * process of its steps.  On a pure cgroup v2 host it is
 * /sys/fs/cgroup/imagebuilder/<name> (memory.max, memory.swap.max,
 * pids.max, cpu.max; the controllers enabled on the way down); on a
 * hybrid or v1 host, one group per controller hierarchy under this
 * process's own group there (memory.limit_in_bytes and
 * memory.memsw.limit_in_bytes, pids.max, cpu.cfs_quota_us).
 */

typedef struct ib_cgroup {
	char *dirs[4];    /* the group in each hierarchy it lives in, NULL-terminated */
	char *memory;     /* the dir with the memory controller, or NULL */
	char *pids;       /* the dir with the pids controller, or NULL */
	bool v2;
	uint64_t oom_base; /* OOM kills counted when it was made */
} ib_cgroup;

/* Make the group name with lim's limits (those that are set).  Error: no cgroup can be made here. */
int ib_cgroup_create(ib_cgroup *cg, const char *name, const ib_limits *lim);

/* Kill what is left in it and remove it. */
void ib_cgroup_destroy(ib_cgroup *cg);

/* The kernel's OOM killer killed in it since it was made (a step ran out of memory). */
bool ib_cgroup_oom(const ib_cgroup *cg);

/* A fork in it failed at pids.max since it was made (pids.events "max"). */
bool ib_cgroup_pids_hit(const ib_cgroup *cg);

#endif

#ifndef IB_RUNNER_H
#define IB_RUNNER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "builder/config.h"
#include "lib/util.h"
#include "steps/step.h"

/*
 * A runner executes one step's commands on top of a layer stack and leaves
 * what they changed in an empty upper directory: the namespace runner
 * (sandbox.c) in namespaces on the host's kernel, the VM runner (vm.c) in a
 * throwaway VM that serves every step of one build.
 */

/* The address a step's resolver asks; pasta forwards it to the host's first nameserver. */
#define IB_SANDBOX_DNS "169.254.1.1"

/* What the sandbox is made of, the same for every step of a build. */
typedef struct ib_sandbox_cfg {
	uint32_t uid, gid;          /* host ids that root in the step maps to (IB_IDMAP_COUNT of them) */
	const char *helper;         /* ib-sandbox, the step's PID 1 */
	const char *pasta;          /* the user-mode network; NULL: "pasta" on PATH */
	const uint16_t *ports;      /* host loopback TCP ports a step may reach (package indexes) */
	size_t nports;
	const char *const *cgroups; /* cgroup dirs the step's processes go in (NULL-terminated), or NULL */
	/* the VM runner's */
	const char *arch;           /* the image's Debian architecture */
	const char *cache_dir;      /* the guest kernel is kept below it */
	const char *vm_kernel;      /* IMAGEBUILDER_VM_KERNEL, or NULL */
	const char *vm_init;        /* ib-init for the host's machine: the guest agent; NULL: none found */
	const char *vm_dir;         /* the build's own directory for the VM's disks and console log */
	const ib_limits *limits;    /* the build's: the VM's memory, vCPUs and scratch disk */
	int64_t epoch;
} ib_sandbox_cfg;

/* What a runner keeps from one step of a build to the next (the VM); its own type. */
typedef struct ib_runner_session ib_runner_session;

typedef struct ib_run_req {
	const char *const *lowers; /* layer directories, bottom first */
	size_t nlowers;
	const char *upper;  /* empty directory that receives the changes */
	const char *scratch; /* private directory on upper's file system, for work dirs */
	const ib_step_plan *plan;
	const char *const *env;     /* KEY=VALUE, NULL-terminated */
	const char *apt_lists;      /* IB_PLAN_APT_CACHE: the shared lists, read-only ... */
	const char *apt_private;    /* ... under this build's own upper/ (with work/) */
	const char *resolv_conf;    /* file bound (read-only) at /etc/resolv.conf, or NULL */
	const ib_sandbox_cfg *sandbox;
	double deadline;            /* ib_now() value after which the step is killed; 0: none */
	volatile int *cancel;       /* non-zero: kill the step now; may be NULL */
	ib_output_cb output;        /* may be NULL */
	void *output_arg;
	ib_runner_session **session; /* the build's, NULL until the runner makes one; may be NULL */
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
	/* The build is over: end what its session holds (NULL: nothing to end). */
	void (*finish)(ib_runner_session *session);
} ib_runner_ops;

extern const ib_runner_ops ib_runner_namespace;
extern const ib_runner_ops ib_runner_vm;

/*
 * Can the VM runner build for arch here?  It runs VMs of the host's
 * architecture only; a build for another one runs its steps in the
 * namespace runner, through qemu-user.
 */
bool ib_vm_runs(const char *arch);

/* The runner of that kind. */
const ib_runner_ops *ib_runner_of(ib_runner_kind kind);

/*
 * A command of plan failed, as its runner reported it (cmd, a wait status):
 * IB_ERROR with the message naming the command and how it ended.
 */
int ib_runner_failed(const ib_step_plan *plan, int cmd, int wstatus);

#endif

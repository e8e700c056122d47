#ifndef IB_SANDBOX_PROTO_H
#define IB_SANDBOX_PROTO_H

/*
 * What the builder (builder/sandbox.c) and the sandbox's PID 1
 * (init/ib-sandbox.c, a static program exec'd fresh inside the step's
 * namespaces) say to each other.  Header only: the helper links nothing
 * of the builder.
 *
 * The helper's descriptors:
 *   0  an empty pipe (EOF)           the steps' stdin
 *   1  the output pipe               the steps' stdout and stderr, and the
 *   2  the output pipe               helper's own messages
 *   3  the plan (a sealed memfd)     read once, then closed
 *   4  the status socket             (SOCK_SEQPACKET) close-on-exec, so no
 *                                    step holds it: first one byte
 *                                    IB_SANDBOX_MSG_LISTENER with the seccomp
 *                                    filter's listener (SCM_RIGHTS), last one
 *                                    struct ib_sandbox_status
 *
 * The listener's notifications are a step's IPv4 and IPv6 socket() calls:
 * the builder attaches the step's network at the first one, and lets each
 * call go on (SECCOMP_USER_NOTIF_FLAG_CONTINUE).
 *
 * The plan: a header, then the seccomp program (filter_len struct
 * sock_filter), then ncmds commands, each a u32 argc and argc strings,
 * then nenv strings (KEY=VALUE); a string is a u32 length and its bytes.
 */

#include <stdint.h>

#define IB_SANDBOX_MAGIC	"ibsbx01"
#define IB_SANDBOX_FD_PLAN	3
#define IB_SANDBOX_FD_STATUS	4
#define IB_SANDBOX_PLAN_MAX	(64u << 20)
#define IB_SANDBOX_HOSTNAME	"imagebuilder"
#define IB_SANDBOX_MSG_LISTENER	'L'


struct ib_sandbox_plan_hdr {
	char magic[8];
	uint32_t filter_len;	/* instructions of the seccomp program */
	uint32_t ncmds;
	uint32_t nenv;
	uint32_t reserved;
	uint64_t keep_caps;	/* capabilities a step keeps (bit n: capability n) */
};

struct ib_sandbox_status {
	int32_t setup_failed;	/* 1: msg says why the sandbox could not start */
	int32_t cmd;		/* index of the failing command, -1 when none */
	int32_t wstatus;	/* its wait status */
	char msg[1024];
};

#endif

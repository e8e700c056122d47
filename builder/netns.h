#ifndef IB_NETNS_H
#define IB_NETNS_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "lib/util.h"

/*
 * A build step's network: its own network namespace, connected to the
 * outside by pasta (Debian's passt), a user-mode TCP/IP stack that makes
 * the step's connections from the host's sockets.  What the step can reach:
 * what the host reaches (the mirror, the index), but not the host's
 * loopback, except the loopback ports named (package indexes), each
 * forwarded on its own; no link-local address (cloud metadata services);
 * DNS through one forwarded address.  IPv4 only.
 */

/* In the namespace, with privilege over it: bring lo up. */
int ib_netns_lo_up(void);

/*
 * In the namespace, before pasta: policy rules that make 169.254.0.0/16
 * unreachable, but for dns (the address pasta forwards to the host's
 * resolver), looked up in the main table (pasta's default route).  Rules
 * come before every table, so no route pasta adds gets around them.
 */
int ib_netns_close_link_local(const char *dns);

typedef struct ib_pasta {
	pid_t pid;     /* the daemon, once started; -1 */
	char *pidfile;
	char *log;
} ib_pasta;

void ib_pasta_init(ib_pasta *p);

/*
 * Attach pasta to the network namespace open as netns_fd and configure
 * it (address, routes, as the host's), forwarding the host loopback TCP
 * ports[0..nports) and dns; returns once the namespace is ready.  Its
 * messages go to scratch/pasta.log, quoted in the error when it fails.
 */
int ib_pasta_start(ib_pasta *p, const char *pasta, int netns_fd, const char *scratch, const uint16_t *ports,
		   size_t nports, const char *dns);

/* Stop it (it also ends when the namespace does). */
void ib_pasta_stop(ib_pasta *p);

#endif

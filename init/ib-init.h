#ifndef IB_INIT_H
#define IB_INIT_H

/*
 * What ib-init's two roles share: the init of a booted image (ib-init.c)
 * and the guest agent of the VM runner (agent.c), one static binary.
 */

#include <sys/types.h>

/* "ib-init: <message>[: strerror(errnum)]" on stderr (the console). */
void say(int errnum, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

void mount_one(const char *src, const char *dir, const char *type, unsigned long flags, const char *data);

void loopback_up(void);

/* Up to max bytes of a file, NUL-terminated, the caller's; its length, or -1. */
ssize_t read_file(char **out, const char *path, size_t max);

/* ip= (the kernel's nfsroot syntax): address, link, default route; hostname and address as set. */
void configure_ip(const char *ip, char hostname[65], char address[64]);

/*
 * The guest agent (ib.agent=1): serves the builder's steps until it is
 * told to power off; ports (ib.ports=, comma-separated) are the package
 * indexes' on host loopback.  Never returns.
 */
void agent_main(const char *ip, const char *ports) __attribute__((noreturn));

#endif

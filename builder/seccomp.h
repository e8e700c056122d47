#ifndef IB_SECCOMP_H
#define IB_SECCOMP_H

#include <stddef.h>

/*
 * The seccomp program every build step runs under (made once per process
 * with libseccomp, for the host's architectures): a classic BPF program of
 * *out_len bytes (a multiple of 8, struct sock_filter), which the
 * sandbox's PID 1 loads once, for itself and every command, asking for a
 * listener: an IPv4 or IPv6 socket() is a user notification, which the
 * builder answers by attaching the step's network and letting the call go
 * on.  The list is in seccomp.c and the README's Security section.
 */
int ib_seccomp_program(const char **out, size_t *out_len);

#endif

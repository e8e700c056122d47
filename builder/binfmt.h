#ifndef IB_BINFMT_H
#define IB_BINFMT_H

/*
 * Foreign architectures run through qemu-user via binfmt_misc.  The host's
 * machine (uname -m) runs natively; any other machine needs a qemu
 * registration with the F flag (the interpreter opened at registration, so
 * it works inside the sandbox's chroot).
 */

/* The host's machine, as uname -m says it ("x86_64"). */
const char *ib_binfmt_host_machine(void);

/*
 * Make sure binaries for machine ("aarch64") run here: nothing to do for
 * the host's own; else mount binfmt_misc if needed, register qemu from
 * Debian's /usr/lib/binfmt.d/qemu-<machine>.conf when it is not, and check
 * the registration is enabled with the F flag.  Fails with a message naming
 * the missing package or setting.
 */
int ib_binfmt_ensure(const char *machine);

#endif

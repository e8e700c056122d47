#include "builder/seccomp.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <seccomp.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "lib/util.h"

/*
 * The usual container deny list (what Docker's and podman's default
 * profiles refuse a container without CAP_SYS_ADMIN), as a filter that
 * allows the rest: a step gets EPERM, never a kill, so a tool that probes
 * (say, for io_uring) falls back as it would in any container.
 */
static const char *const denied[] = {
	/* another way into the host's files */
	"open_by_handle_at", "name_to_handle_at",
	/* the kernel itself */
	"kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "create_module",
	"bpf", "perf_event_open", "userfaultfd", "lookup_dcookie", "iopl", "ioperm", "swapon", "swapoff",
	"reboot", "syslog", "acct", "quotactl", "quotactl_fd", "nfsservctl", "get_kernel_syms", "query_module",
	"uselib", "_sysctl", "vm86", "vm86old", "modify_ldt", "kcmp",
	/* keys are not namespaced */
	"keyctl", "add_key", "request_key",
	/* mounts: the sandbox makes its own, a step makes none */
	"mount", "umount", "umount2", "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount", "fspick",
	"mount_setattr", "pivot_root",
	/* time and names are the host's */
	"settimeofday", "stime", "clock_settime", "clock_settime64", "clock_adjtime", "clock_adjtime64",
	"adjtimex", "sethostname", "setdomainname", "vhangup",
	/* other namespaces; new ones are refused below (clone, unshare) */
	"setns",
	/* a large attack surface that builds do not need */
	"io_uring_setup", "io_uring_enter", "io_uring_register",
};

/* Namespace flags a step may not ask clone or unshare for. */
#define NS_FLAGS \
	((scmp_datum_t)(CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | \
			CLONE_NEWNET | CLONE_NEWCGROUP | 0x00000080 /* CLONE_NEWTIME */))

static const scmp_datum_t ns_flags[] = {
	CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET, CLONE_NEWCGROUP,
	0x00000080 /* CLONE_NEWTIME */,
};

/* The rules, for the architectures of ctx. */
static int add_rules(scmp_filter_ctx ctx, bool vsock, const char **what)
{
	int rc;

	/* a denied syscall fails with EPERM; names this libseccomp or architecture lacks are skipped */
	for (size_t i = 0; i < sizeof(denied) / sizeof(denied[0]); i++) {
		int nr = seccomp_syscall_resolve_name(denied[i]);
		if (nr == __NR_SCMP_ERROR)
			continue;
		if ((rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), nr, 0)) < 0 && rc != -EDOM) {
			*what = denied[i];
			return rc;
		}
	}
	/* no new namespace: clone and unshare by flag; clone3 keeps its flags in memory, so it is
	 * "not implemented" and the C library falls back to clone */
	for (size_t i = 0; i < sizeof(ns_flags) / sizeof(ns_flags[0]); i++) {
		if ((rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(unshare), 1,
					   SCMP_A0(SCMP_CMP_MASKED_EQ, ns_flags[i], ns_flags[i]))) < 0 ||
		    (rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(clone), 1,
					   SCMP_A0(SCMP_CMP_MASKED_EQ, ns_flags[i], ns_flags[i]))) < 0) {
			*what = "clone/unshare";
			return rc;
		}
	}
	if ((rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(ENOSYS), SCMP_SYS(clone3), 0)) < 0 && rc != -EDOM) {
		*what = "clone3";
		return rc;
	}
	/*
	 * The step's first IPv4 or IPv6 socket asks the builder (user
	 * notification) to attach the network; the call then goes on as it
	 * was.  Steps that never open one never pay for pasta.
	 */
	for (size_t i = 0; i < 2; i++) {
		scmp_datum_t family = i ? AF_INET6 : AF_INET;
		if ((rc = seccomp_rule_add(ctx, SCMP_ACT_NOTIFY, SCMP_SYS(socket), 1, SCMP_A0(SCMP_CMP_EQ, family))) < 0) {
			*what = "socket";
			return rc;
		}
	}
	/*
	 * vsock reaches the hypervisor and the host whatever the network
	 * namespace (Docker denies it too).  Not where socket() is multiplexed
	 * (x86-32's socketcall: the family is in memory, out of reach).
	 */
	if (vsock &&
	    (rc = seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(socket), 1, SCMP_A0(SCMP_CMP_EQ, AF_VSOCK))) < 0) {
		*what = "socket(AF_VSOCK)";
		return rc;
	}
	/* 32-bit x86: socket(2) through socketcall(SYS_SOCKET, args), whose family is out of reach */
	if ((rc = seccomp_rule_add(ctx, SCMP_ACT_NOTIFY, SCMP_SYS(socketcall), 1, SCMP_A0(SCMP_CMP_EQ, 1))) < 0 &&
	    rc != -EDOM) {
		*what = "socketcall";
		return rc;
	}
	return 0;
}

/*
 * 32-bit programs in the image are filtered too, not left to the bad-arch
 * action: each compatible architecture gets the rules in a filter of its
 * own, merged into ctx (x86-32 without the vsock rule, see above).
 */
static int add_compat(scmp_filter_ctx ctx, const char **what)
{
	uint32_t native = seccomp_arch_native(), compat[2] = { 0, 0 };
	int rc = 0;

	if (native == SCMP_ARCH_X86_64) {
		compat[0] = SCMP_ARCH_X86;
		compat[1] = SCMP_ARCH_X32;
	} else if (native == SCMP_ARCH_AARCH64) {
		compat[0] = SCMP_ARCH_ARM;
	}
	for (size_t i = 0; i < 2 && compat[i] && rc == 0; i++) {
		scmp_filter_ctx c = seccomp_init(SCMP_ACT_ALLOW);

		*what = "add an architecture";
		if (!c)
			return -ENOMEM;
		if ((rc = seccomp_arch_add(c, compat[i])) == 0 && (rc = seccomp_arch_remove(c, SCMP_ARCH_NATIVE)) == 0 &&
		    (rc = add_rules(c, compat[i] != SCMP_ARCH_X86, what)) == 0 && (rc = seccomp_merge(ctx, c)) == 0)
			continue; /* merged: ctx owns it */
		seccomp_release(c);
	}
	return rc;
}


static int build(char **out, size_t *out_len)
{
	scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ALLOW);
	int rc = 0, fd = -1, err = 0;
	const char *what = "";
	off_t size;

	if (!ctx)
		return ib_error_set("seccomp: cannot start a filter");
	if ((rc = add_rules(ctx, true, &what)) < 0)
		goto fail;
	if ((rc = add_compat(ctx, &what)) < 0)
		goto fail;
	fd = memfd_create("ib-seccomp", MFD_CLOEXEC);
	if (fd < 0) {
		err = ib_error_set_errno(errno, "seccomp: cannot create a memfd");
		goto out;
	}
	if ((rc = seccomp_export_bpf(ctx, fd)) < 0) {
		what = "export the program";
		goto fail;
	}
	size = lseek(fd, 0, SEEK_END);
	if (size <= 0 || size % 8) {
		err = ib_error_set("seccomp: the exported program has %lld bytes", (long long)size);
		goto out;
	}
	*out = ib_xmalloc((size_t)size);
	if (pread(fd, *out, (size_t)size, 0) != size) {
		err = ib_error_set_errno(errno, "seccomp: cannot read the exported program");
		free(*out);
		*out = NULL;
		goto out;
	}
	*out_len = (size_t)size;
	goto out;
fail:
	err = ib_error_set("seccomp: cannot %s: %s", what, strerror(-rc));
out:
	if (fd >= 0)
		close(fd);
	seccomp_release(ctx);
	return err;
}

static pthread_mutex_t once_mu = PTHREAD_MUTEX_INITIALIZER;
static char *program;
static size_t program_len;

int ib_seccomp_program(const char **out, size_t *out_len)
{
	int err = 0;

	pthread_mutex_lock(&once_mu);
	if (!program)
		err = build(&program, &program_len);
	if (!err) {
		*out = program;
		*out_len = program_len;
	}
	pthread_mutex_unlock(&once_mu);
	return err;
}

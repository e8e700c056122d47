/*
 * The VM runner: a build's steps run in a throwaway qemu VM, one per build,
 * booted at its first step and reused for the rest (builder/vm-proto.h has
 * the protocol and the disks).  The guest has its own kernel (Debian's
 * cloud kernel, builder/vmkernel.c) and ib-init as its agent; the host
 * never mounts a file system the guest wrote: it reads each step's upper
 * directory from the scratch disk with libext2fs (layer/ext4read.c) into
 * the step's upper, and the build normalises, seals and commits it as the
 * namespace runner's.
 *
 * Process shape:
 *
 *   builder ── Q (own process group; joins the build's cgroups; a network
 *                 namespace of its own that pasta connects, as a step's;
 *                 then an unprivileged uid, and exec qemu)
 *
 * qemu's user-mode network (slirp) makes the guest's connections from
 * that namespace: the guest reaches what a step in the namespace runner
 * reaches, and its gateway's "host" is the namespace's own loopback, where
 * only pasta's forwards of the package-index ports are.  qemu dies with
 * the builder (PR_SET_PDEATHSIG), at a timeout or a cancel (SIGKILL to its
 * group), and at the build's end; the VM's files are in the build's
 * scratch, which goes with it.
 */
#include "builder/runner.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "builder/netns.h"
#include "builder/proc.h"
#include "builder/vm-proto.h"
#include "builder/vmkernel.h"
#include "layer/ext4read.h"
#include "layer/writer.h"
#include "lib/util.h"

/* The disks' apparent sizes, fixed when qemu opens them: what the guest sees as their capacity. */
#define LOWER_DISK_BYTES (1ULL << 40)
#define SCRATCH_DEFAULT_BYTES (64ULL << 30)
/* guest memory without a --memory limit, and what qemu itself is left of one */
#define MEMORY_DEFAULT (2ULL << 30)
#define MEMORY_QEMU_MAX (256ULL << 20)
#define MEMORY_MIN (256ULL << 20)
/* how long the agent has to say hello after qemu starts, without a deadline */
#define BOOT_TIMEOUT 600.0
/* a resolv.conf passed to the guest */
#define RESOLV_MAX 4096
/* the id the disks' file systems derive UUIDs from (nothing sees them) */
#define DISK_ID "1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b1b"
/* the console is emptied when it grows past this: the guest writes it at will */
#define CONSOLE_MAX (4u << 20)
/* what the guest may send in one frame of each kind */
#define HELLO_MAX 256u
#define STATUS_MAX (16u + 4096u)

struct ib_runner_session {
	pid_t qemu;       /* Q, then qemu; -1 once reaped */
	int ctl;          /* our end of the control port */
	int lower_fd, lists_fd; /* the builder writes them before a step */
	int scratch_fd;   /* the builder reads each step's upper from it */
	int console_fd;   /* the builder's, to read and to keep short */
	/* qemu's own: the disks (read-only ones read-only) and the console, as -add-fd fd sets */
	int q_lower, q_scratch, q_lists, q_console;
	char *dir;        /* the VM's files (root's: qemu reads, it writes nothing there by name) */
	char *console;
	char *release;    /* the guest's kernel */
	ib_pasta pasta;
	unsigned steps;
	bool broken;      /* a step was killed, or the VM stopped: no more steps */
	ib_buf in;        /* bytes read from ctl; frames from in_off on not yet taken */
	size_t in_off;
};

static const char *qemu_binary(const char *arch)
{
	return !strcmp(arch, "amd64") ? "qemu-system-x86_64" : !strcmp(arch, "arm64") ? "qemu-system-aarch64" : NULL;
}

static const char *host_arch(void)
{
#if defined(__x86_64__)
	return "amd64";
#elif defined(__aarch64__)
	return "arm64";
#else
	return "";
#endif
}

/* The tail of the VM's console, for messages: the last few lines, printable. */
static char *console_tail(const struct ib_runner_session *s)
{
	char *data = NULL, *p;
	size_t len = 0, start, lines = 0;

	if (s->console_fd < 0 || ib_read_file(&data, &len, s->console, CONSOLE_MAX * 2) < 0 || !len) {
		free(data);
		ib_error_clear();
		return ib_xstrdup("(the console is empty)");
	}
	for (start = len; start > 0; start--)
		if (data[start - 1] == '\n' && ++lines > 8)
			break;
	p = ib_xstrdup(data + start);
	for (char *c = p; *c; c++)
		if ((unsigned char)*c < 0x20 && *c != '\n')
			*c = ' ';
	free(data);
	return p;
}

static void kill_qemu(struct ib_runner_session *s)
{
	if (s->qemu <= 0)
		return;
	kill(-s->qemu, SIGKILL);
	kill(s->qemu, SIGKILL);
	while (waitpid(s->qemu, NULL, 0) < 0 && errno == EINTR)
		;
	s->qemu = -1;
}

/* ---- frames ---- */

static void put32(ib_buf *b, uint32_t v)
{
	unsigned char c[4] = { (unsigned char)v, (unsigned char)(v >> 8), (unsigned char)(v >> 16),
			       (unsigned char)(v >> 24) };
	ib_buf_add(b, c, 4);
}

static void put_str(ib_buf *b, const char *str, size_t len)
{
	put32(b, (uint32_t)len);
	ib_buf_add(b, str, len);
}

static uint32_t get32(const unsigned char *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/*
 * A frame to the guest.  A guest that stops reading its port fills the
 * socket: the write waits only until the deadline or a cancel.
 */
static int send_frame(struct ib_runner_session *s, char type, const ib_buf *payload, double deadline,
		      volatile int *cancel)
{
	ib_buf f = IB_BUF_INIT;
	size_t off = 0;
	int err = 0;

	ib_buf_add(&f, &type, 1);
	put32(&f, (uint32_t)(payload ? payload->len : 0));
	if (payload && payload->len)
		ib_buf_add(&f, payload->ptr, payload->len);
	while (off < f.len && !err) {
		ssize_t n = send(s->ctl, f.ptr + off, f.len - off, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n > 0) {
			off += (size_t)n;
			continue;
		}
		if (n < 0 && errno != EAGAIN && errno != EINTR) {
			err = ib_error_set("cannot talk to the VM: it stopped");
			break;
		}
		if (cancel && *cancel) {
			err = IB_ECANCELED;
		} else if (deadline > 0 && ib_now() >= deadline) {
			err = IB_ETIMEOUT;
		} else {
			struct pollfd p = { s->ctl, POLLOUT, 0 };
			poll(&p, 1, 100);
		}
	}
	ib_buf_free(&f);
	return err;
}

/* The guest writes its console at will: past CONSOLE_MAX it starts again. */
static void trim_console(struct ib_runner_session *s)
{
	struct stat st;

	if (s->console_fd >= 0 && fstat(s->console_fd, &st) == 0 && st.st_size > (off_t)CONSOLE_MAX &&
	    ftruncate(s->console_fd, 0) < 0)
		ib_error_clear();
}

/* The most a frame of this type may carry from the guest; 0: the guest sends no such frame. */
static size_t frame_max(char type)
{
	switch (type) {
	case IB_VM_MSG_HELLO:
		return HELLO_MAX;
	case IB_VM_MSG_OUTPUT:
		return IB_VM_OUTPUT_CHUNK;
	case IB_VM_MSG_STATUS:
		return STATUS_MAX;
	default:
		return 0;
	}
}

/*
 * The next frame from the guest: its type, its payload in *payload (owned,
 * NUL-terminated for convenience).  Waits until the deadline or a cancel,
 * and notices qemu's end.
 */
static int recv_frame(struct ib_runner_session *s, double deadline, volatile int *cancel, char *type,
		      char **payload, size_t *len)
{
	char buf[65536];

	for (;;) {
		size_t avail = s->in.len - s->in_off;
		if (avail >= 5) {
			const char *h = s->in.ptr + s->in_off;
			uint32_t n = get32((const unsigned char *)h + 1);
			if (!frame_max(h[0]) || n > frame_max(h[0]))
				return ib_error_set("the VM sent a frame it may not ('%c', %u bytes)",
						    h[0] > 0x20 && h[0] < 0x7f ? h[0] : '?', n);
			if (avail >= 5 + (size_t)n) {
				*type = h[0];
				*payload = ib_xmalloc((size_t)n + 1);
				memcpy(*payload, h + 5, n);
				(*payload)[n] = '\0';
				*len = n;
				s->in_off += 5 + n;
				return 0;
			}
		}
		/* what was taken goes once per read, not once per frame */
		if (s->in_off) {
			memmove(s->in.ptr, s->in.ptr + s->in_off, s->in.len - s->in_off);
			s->in.len -= s->in_off;
			s->in_off = 0;
		}
		trim_console(s);
		if (cancel && *cancel)
			return IB_ECANCELED;
		if (deadline > 0 && ib_now() >= deadline)
			return IB_ETIMEOUT;
		struct pollfd p = { s->ctl, POLLIN, 0 };
		int r = poll(&p, 1, 100);
		if (r < 0 && errno != EINTR)
			return ib_error_set_errno(errno, "cannot wait for the VM");
		if (r <= 0)
			continue;
		ssize_t got = read(s->ctl, buf, sizeof(buf));
		if (got < 0 && (errno == EINTR || errno == EAGAIN))
			continue;
		if (got <= 0) {
			char *tail = console_tail(s);
			ib_error_set("the VM stopped; its console ends:\n%s", tail);
			free(tail);
			return IB_ERROR;
		}
		ib_buf_add(&s->in, buf, (size_t)got);
	}
}

/* ---- starting the VM ---- */

/* An empty ext4 of size bytes at path (no lost+found: nothing checks it). */
static int empty_disk(const char *path, const char *empty_dir, uint64_t size, int64_t epoch)
{
	const char *layers[] = { empty_dir };
	ib_export_opts eo = { .image_id = DISK_ID, .epoch = epoch, .size = size, .no_lost_found = true };

	return ib_ext4_write(path, layers, 1, &eo, NULL);
}

/* A file the VM sees as a disk: root's, of size bytes (sparse), open read-write. */
static int disk_file(const char *path, uint64_t size, int *out_fd)
{
	int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);

	if (fd < 0)
		return ib_error_set_errno(errno, "cannot create '%s'", path);
	if (ftruncate(fd, (off_t)size) < 0) {
		close(fd);
		return ib_error_set_errno(errno, "cannot size '%s'", path);
	}
	*out_fd = fd;
	return 0;
}

static int open_for_qemu(const char *path, int flags, int *out)
{
	*out = open(path, flags | O_NOFOLLOW | O_CLOEXEC);
	if (*out < 0)
		return ib_error_set_errno(errno, "cannot open '%s'", path);
	return 0;
}

static unsigned vcpus(const ib_limits *lim)
{
	long online = sysconf(_SC_NPROCESSORS_ONLN);
	uint64_t n = lim && lim->cpus ? (lim->cpus + 999) / 1000 : (uint64_t)(online > 0 ? online : 1);

	return n < 1 ? 1 : n > 64 ? 64 : (unsigned)n;
}

static uint64_t guest_memory(const ib_limits *lim)
{
	uint64_t m = MEMORY_DEFAULT;

	if (lim && lim->memory) {
		uint64_t keep = lim->memory / 4 < MEMORY_QEMU_MAX ? lim->memory / 4 : MEMORY_QEMU_MAX;
		m = lim->memory - keep;
	}
	if (m < MEMORY_MIN)
		m = MEMORY_MIN;
	return m >> 20 << 20;
}

static bool kvm_usable(void)
{
	int fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);

	if (fd < 0)
		return false;
	close(fd);
	return true;
}

/* The TSC's rate: microvm under emulation cannot calibrate it. */
static unsigned long tsc_khz(void)
{
	char *info = NULL, *p;
	size_t len;
	unsigned long khz = 0;

	if (ib_read_file(&info, &len, "/proc/cpuinfo", 4 << 20) < 0) {
		ib_error_clear();
		return 0;
	}
	if ((p = strstr(info, "cpu MHz")) && (p = strchr(p, ':')))
		khz = (unsigned long)(strtod(p + 1, NULL) * 1000);
	free(info);
	return khz;
}

static void collect(const char *data, size_t len, void *arg)
{
	ib_buf_add(arg, data, len);
}

/* Does this qemu have the microvm machine?  Else q35, virtio over PCI.  Asked once a process. */
static bool has_microvm(const char *qemu)
{
	static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
	static int asked;
	static bool yes;
	bool r;

	pthread_mutex_lock(&mu);
	if (!asked) {
		const char *argv[] = { qemu, "-M", "help", NULL };
		ib_buf out = IB_BUF_INIT;
		ib_proc_opts po = { .output = collect, .output_arg = &out, .deadline = ib_now() + 30 };

		if (ib_proc_run(argv, &po) == 0) {
			ib_buf_add(&out, "", 1);
			yes = strstr(out.ptr, "\nmicrovm ") != NULL;
		}
		ib_error_clear();
		ib_buf_free(&out);
		asked = 1;
	}
	r = yes;
	pthread_mutex_unlock(&mu);
	return r;
}

/*
 * qemu's command line.  The kernel and initrd are named relative to the
 * VM's dir, its working directory; the disks and the console are the
 * descriptors the builder opened (fd sets), so qemu opens nothing there
 * for writing by name.
 */
static void qemu_argv(ib_strv *argv, const struct ib_runner_session *s, const ib_sandbox_cfg *sb, int ctl_fd)
{
	bool kvm = kvm_usable(), micro = has_microvm(qemu_binary(sb->arch));
	/* microvm's devices hang off virtio-mmio; q35's are PCI */
	const char *bus = micro ? "device" : "pci";
	unsigned long khz = kvm || !micro ? 0 : tsc_khz();
	ib_buf append = IB_BUF_INIT;
	const struct {
		int fd;
		const char *serial;
		bool ro;
	} disks[] = {
		{ s->q_lower, IB_VM_SERIAL_LOWER, true },
		{ s->q_scratch, IB_VM_SERIAL_SCRATCH, false },
		{ s->q_lists, IB_VM_SERIAL_LISTS, true },
	};

	ib_strv_push(argv, qemu_binary(sb->arch));
	ib_strv_push(argv, "-M");
	ib_strv_push(argv, micro ? "microvm" : "q35");
	ib_strv_push(argv, "-accel");
	ib_strv_push(argv, kvm ? "kvm" : "tcg");
	ib_strv_push(argv, "-cpu");
	ib_strv_push(argv, kvm ? "host" : "max");
	ib_strv_push(argv, "-m");
	ib_strv_pushf(argv, "%llu", (unsigned long long)(guest_memory(sb->limits) >> 20));
	ib_strv_push(argv, "-smp");
	ib_strv_pushf(argv, "%u", vcpus(sb->limits));
	ib_strv_push(argv, "-nodefaults");
	ib_strv_push(argv, "-no-user-config");
	ib_strv_push(argv, "-nographic");
	ib_strv_push(argv, "-no-reboot");
	/* qemu's own seccomp filter: no new privileges, no processes, no resource changes */
	ib_strv_push(argv, "-sandbox");
	ib_strv_push(argv, "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny");
	ib_strv_push(argv, "-add-fd");
	ib_strv_pushf(argv, "fd=%d,set=4", s->q_console);
	ib_strv_push(argv, "-serial");
	ib_strv_push(argv, "file:/dev/fdset/4");
	ib_strv_push(argv, "-kernel");
	ib_strv_push(argv, "vmlinuz");
	ib_strv_push(argv, "-initrd");
	ib_strv_push(argv, "initrd");
	ib_buf_puts(&append, "console=ttyS0 quiet loglevel=4 panic=-1 ib.agent=1 ip=10.0.2.15::10.0.2.2:255.255.255.0");
	if (khz)
		ib_buf_printf(&append, " tsc_early_khz=%lu", khz);
	for (size_t i = 0; i < sb->nports; i++)
		ib_buf_printf(&append, "%s%u", i ? "," : " ib.ports=", (unsigned)sb->ports[i]);
	ib_strv_push(argv, "-append");
	ib_strv_push(argv, append.ptr);
	ib_buf_free(&append);
	for (size_t i = 0; i < sizeof(disks) / sizeof(disks[0]); i++) {
		ib_strv_push(argv, "-add-fd");
		ib_strv_pushf(argv, "fd=%d,set=%zu", disks[i].fd, i + 1);
		/* qemu opens a writable disk read-only too, at times */
		if (!disks[i].ro) {
			ib_strv_push(argv, "-add-fd");
			ib_strv_pushf(argv, "fd=%d,set=%zu", s->scratch_fd, i + 1);
		}
		ib_strv_push(argv, "-drive");
		ib_strv_pushf(argv, "id=d%zu,file=/dev/fdset/%zu,format=raw,if=none,cache=writeback%s", i, i + 1,
			      disks[i].ro ? ",readonly=on" : "");
		ib_strv_push(argv, "-device");
		ib_strv_pushf(argv, "virtio-blk-%s,drive=d%zu,serial=%s", bus, i, disks[i].serial);
	}
	ib_strv_push(argv, "-netdev");
	ib_strv_push(argv, "user,id=n0,ipv6=off,net=10.0.2.0/24,host=10.0.2.2,dns=10.0.2.3");
	ib_strv_push(argv, "-device");
	ib_strv_pushf(argv, "virtio-net-%s,netdev=n0", bus);
	ib_strv_push(argv, "-chardev");
	ib_strv_pushf(argv, "socket,id=c0,fd=%d", ctl_fd);
	ib_strv_push(argv, "-device");
	ib_strv_pushf(argv, "virtio-serial-%s", bus);
	ib_strv_push(argv, "-device");
	ib_strv_push(argv, "virtserialport,chardev=c0,name=" IB_VM_PORT);
}

struct child_fds {
	int dir, ctl, sync_w, go_r;
	int pass[5]; /* the fd sets' */
};

/* Q, after the fork: only async-signal-safe calls until exec (the builder may have threads). */
static void __attribute__((noreturn)) qemu_child(const ib_sandbox_cfg *sb, char **argv, const struct child_fds *f,
						 pid_t builder)
{
	struct rlimit nocore = { 0, 0 };
	char c = 'n';
	int null;

	setpgid(0, 0);
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (getppid() != builder)
		_exit(3);
	for (const char *const *cg = sb->cgroups; cg && *cg; cg++) {
		char path[4096];
		int fd;
		snprintf(path, sizeof(path), "%s/cgroup.procs", *cg);
		fd = open(path, O_WRONLY | O_CLOEXEC);
		if (fd < 0 || write(fd, "0\n", 2) != 2)
			_exit(4);
		close(fd);
	}
	if (unshare(CLONE_NEWNET) < 0 || ib_netns_lo_up() < 0 || ib_netns_close_link_local(IB_SANDBOX_DNS) < 0)
		_exit(5);
	if (write(f->sync_w, &c, 1) != 1)
		_exit(6);
	while (read(f->go_r, &c, 1) < 0 && errno == EINTR)
		;
	if (c != 'g')
		_exit(6);
	/* a guest that crashes qemu leaves no core of its memory */
	setrlimit(RLIMIT_CORE, &nocore);
	/* qemu runs as nobody in particular: the build's unprivileged ids, no capabilities */
	if (setgroups(0, NULL) < 0 || setresgid(sb->gid, sb->gid, sb->gid) < 0 ||
	    setresuid(sb->uid, sb->uid, sb->uid) < 0)
		_exit(7);
	/* the VM's dir is readable to it; the directories above it need not be */
	if (fchdir(f->dir) < 0)
		_exit(9);
	/* a change of credentials cleared it */
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (getppid() != builder)
		_exit(3);
	prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
	null = open("/dev/null", O_RDONLY | O_CLOEXEC);
	/* qemu's own messages go to the console log, for the builder's errors */
	if (null < 0 || dup2(null, 0) < 0 || dup2(f->pass[3], 1) < 0 || dup2(f->pass[3], 2) < 0)
		_exit(8);
	/* nothing the builder holds (another build's files, sockets) crosses the exec but what qemu is given */
	if (close_range(3, ~0U, CLOSE_RANGE_CLOEXEC) < 0 || fcntl(f->ctl, F_SETFD, 0) < 0)
		_exit(8);
	for (size_t i = 0; i < sizeof(f->pass) / sizeof(f->pass[0]); i++)
		if (fcntl(f->pass[i], F_SETFD, 0) < 0)
			_exit(8);
	execvp(argv[0], argv);
	_exit(127);
}

/* Wait for one byte from fd (the VM's process), until the deadline or a cancel. */
static int wait_byte(int fd, double deadline, volatile int *cancel, char *out)
{
	for (;;) {
		struct pollfd p = { fd, POLLIN, 0 };
		ssize_t n;

		if (cancel && *cancel)
			return IB_ECANCELED;
		if (deadline > 0 && ib_now() >= deadline)
			return IB_ETIMEOUT;
		if (poll(&p, 1, 100) <= 0)
			continue;
		n = read(fd, out, 1);
		if (n == 1)
			return 0;
		if (n == 0 || (errno != EINTR && errno != EAGAIN))
			return IB_ERROR;
	}
}

static int boot(struct ib_runner_session *s, const ib_run_req *req)
{
	const ib_sandbox_cfg *sb = req->sandbox;
	ib_vm_kernel k;
	ib_strv argv = IB_STRV_INIT;
	char *path = NULL, *empty = NULL, *payload = NULL, type;
	int sv[2] = { -1, -1 }, sync_p[2] = { -1, -1 }, go_p[2] = { -1, -1 }, netns = -1, dir_fd = -1;
	int err;
	size_t len;
	double t0 = ib_now(), deadline = req->deadline;
	pid_t builder = getpid();

	memset(&k, 0, sizeof(k));
	if (!sb->vm_init)
		return ib_error_set("the VM runner needs ib-init for this machine (make builds it beside the program)");
	if (!ib_proc_available(qemu_binary(sb->arch)))
		return ib_error_set("the VM runner needs %s (Debian's qemu-system-x86)", qemu_binary(sb->arch));
	if ((err = ib_vm_kernel_get(&k, sb->cache_dir, sb->arch, sb->vm_kernel, deadline)) < 0)
		return err;
	s->dir = ib_xasprintf("%s/vm", sb->vm_dir);
	s->console = ib_xasprintf("%s/console.log", s->dir);
	empty = ib_xasprintf("%s/empty", sb->vm_dir);
	/* root's: qemu may search it and read the kernel, and write nothing in it */
	if (mkdir(s->dir, 0711) < 0 || chmod(s->dir, 0711) < 0 || mkdir(empty, 0755) < 0) {
		err = ib_error_set_errno(errno, "cannot create '%s'", s->dir);
		goto out;
	}
	path = ib_xasprintf("%s/vmlinuz", s->dir);
	if ((err = ib_copy_sparse(k.vmlinuz, path, 0644)) < 0)
		goto out;
	free(path);
	path = ib_xasprintf("%s/initrd", s->dir);
	if ((err = ib_vm_initramfs(&k, sb->vm_init, path)) < 0)
		goto out;
	if (chmod(path, 0644) < 0) {
		err = ib_error_set_errno(errno, "cannot make '%s' readable to the VM", path);
		goto out;
	}
	free(path);
	path = ib_xasprintf("%s/scratch.img", s->dir);
	if ((err = empty_disk(path, empty,
			      sb->limits && sb->limits->disk ? sb->limits->disk >> 12 << 12 : SCRATCH_DEFAULT_BYTES,
			      sb->epoch)) < 0 ||
	    (err = open_for_qemu(path, O_RDWR, &s->q_scratch)) < 0 || (err = open_for_qemu(path, O_RDONLY, &s->scratch_fd)) < 0)
		goto out;
	if (fchmod(s->scratch_fd, 0600) < 0) {
		err = ib_error_set_errno(errno, "cannot make '%s' private", path);
		goto out;
	}
	free(path);
	path = ib_xasprintf("%s/lower.img", s->dir);
	if ((err = disk_file(path, LOWER_DISK_BYTES, &s->lower_fd)) < 0 || (err = open_for_qemu(path, O_RDONLY, &s->q_lower)) < 0)
		goto out;
	free(path);
	path = ib_xasprintf("%s/lists.img", s->dir);
	if ((err = disk_file(path, LOWER_DISK_BYTES, &s->lists_fd)) < 0 || (err = open_for_qemu(path, O_RDONLY, &s->q_lists)) < 0)
		goto out;
	s->console_fd = open(s->console, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
	if (s->console_fd < 0) {
		err = ib_error_set_errno(errno, "cannot create '%s'", s->console);
		goto out;
	}
	if ((err = open_for_qemu(s->console, O_WRONLY | O_APPEND, &s->q_console)) < 0)
		goto out;
	dir_fd = open(s->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dir_fd < 0 || socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0 || pipe2(sync_p, O_CLOEXEC) < 0 ||
	    pipe2(go_p, O_CLOEXEC) < 0) {
		err = ib_error_set_errno(errno, "cannot make the VM's channels");
		goto out;
	}
	qemu_argv(&argv, s, sb, sv[1]);
	{
		struct child_fds f = { dir_fd, sv[1], sync_p[1], go_p[0], { s->q_lower, s->q_scratch, s->q_lists, s->q_console, s->scratch_fd } };
		s->qemu = fork();
		if (s->qemu == 0)
			qemu_child(sb, argv.v, &f, builder);
	}
	if (s->qemu < 0) {
		err = ib_error_set_errno(errno, "cannot start qemu");
		goto out;
	}
	setpgid(s->qemu, s->qemu);
	close(sv[1]);
	sv[1] = -1;
	close(sync_p[1]);
	sync_p[1] = -1;
	s->ctl = sv[0];
	sv[0] = -1;
	{
		char c = 0, nspath[64];

		if ((err = wait_byte(sync_p[0], deadline, req->cancel, &c)) < 0) {
			if (err == IB_ERROR)
				ib_error_set("the VM's process could not set up its network namespace");
			goto out;
		}
		snprintf(nspath, sizeof(nspath), "/proc/%ld/ns/net", (long)s->qemu);
		netns = open(nspath, O_RDONLY | O_CLOEXEC);
		if (netns < 0) {
			err = ib_error_set_errno(errno, "cannot open the VM's network namespace");
			goto out;
		}
		if ((err = ib_pasta_start(&s->pasta, sb->pasta, netns, sb->vm_dir, sb->ports, sb->nports,
					  IB_SANDBOX_DNS)) < 0)
			goto out;
		c = 'g';
		if (write(go_p[1], &c, 1) != 1) {
			err = ib_error_set_errno(errno, "cannot start qemu");
			goto out;
		}
	}
	if (deadline <= 0 || deadline > t0 + BOOT_TIMEOUT)
		deadline = t0 + BOOT_TIMEOUT;
	err = recv_frame(s, deadline, req->cancel, &type, &payload, &len);
	if (err == IB_ETIMEOUT && (req->deadline <= 0 || ib_now() < req->deadline)) {
		char *tail = console_tail(s);
		err = ib_error_set("the VM did not boot in %.0f s; its console ends:\n%s", BOOT_TIMEOUT, tail);
		free(tail);
	}
	if (err < 0)
		goto out;
	if (type != IB_VM_MSG_HELLO || len < 4 || get32((unsigned char *)payload) != len - 4) {
		err = ib_error_set("the VM's agent did not say hello (a frame '%c' of %zu bytes)", type, len);
		goto out;
	}
	s->release = ib_xstrdup(payload + 4);
	for (char *c = s->release; *c; c++)
		if ((unsigned char)*c < 0x20 || (unsigned char)*c > 0x7e)
			*c = '?';
	if (req->output) {
		char line[512];
		int n = snprintf(line, sizeof(line), "vm: %s booted in %.1f s (%s, %u vCPUs, %llu MiB)\n", s->release,
				 ib_now() - t0, kvm_usable() ? "kvm" : "software emulation", vcpus(sb->limits),
				 (unsigned long long)(guest_memory(sb->limits) >> 20));
		req->output(line, (size_t)n < sizeof(line) ? (size_t)n : sizeof(line) - 1, req->output_arg);
	}
out:
	if (err < 0)
		s->broken = true;
	for (size_t i = 0; i < 2; i++) {
		if (sv[i] >= 0)
			close(sv[i]);
		if (sync_p[i] >= 0)
			close(sync_p[i]);
		if (go_p[i] >= 0)
			close(go_p[i]);
	}
	if (dir_fd >= 0)
		close(dir_fd);
	if (netns >= 0)
		close(netns);
	ib_strv_free(&argv);
	ib_vm_kernel_clear(&k);
	free(payload);
	free(path);
	free(empty);
	return err;
}

/* ---- a step ---- */

static int request(ib_buf *b, struct ib_runner_session *s, const ib_run_req *req, uint32_t flags)
{
	struct timespec now;
	uint64_t ns;
	char *resolv = NULL;
	size_t rlen = 0, nenv = 0;
	int err;

	if (req->resolv_conf && (err = ib_read_file(&resolv, &rlen, req->resolv_conf, RESOLV_MAX)) < 0)
		return err;
	clock_gettime(CLOCK_REALTIME, &now);
	ns = (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec;
	put32(b, s->steps);
	put32(b, flags);
	put32(b, (uint32_t)ns);
	put32(b, (uint32_t)(ns >> 32));
	put_str(b, resolv ? resolv : "", rlen);
	free(resolv);
	put32(b, (uint32_t)req->plan->ncmds);
	for (size_t i = 0; i < req->plan->ncmds; i++) {
		const ib_strv *c = &req->plan->cmds[i];
		put32(b, (uint32_t)c->n);
		for (size_t j = 0; j < c->n; j++)
			put_str(b, c->v[j], strlen(c->v[j]));
	}
	while (req->env && req->env[nenv])
		nenv++;
	put32(b, (uint32_t)nenv);
	for (size_t i = 0; i < nenv; i++)
		put_str(b, req->env[i], strlen(req->env[i]));
	if (b->len > IB_VM_FRAME_MAX)
		return ib_error_set("the step's commands and environment are too large for the VM (%zu bytes)", b->len);
	return 0;
}

/* Write layers as the disk open at fd, in place, keeping the size the VM saw. */
static int write_disk(int fd, const char *what, const char *const *layers, size_t n, int64_t epoch)
{
	ib_export_opts eo = { .image_id = DISK_ID, .epoch = epoch, .no_lost_found = true };
	int err = ib_ext4_write_fd(fd, what, layers, n, &eo, NULL);

	if (!err && ftruncate(fd, (off_t)LOWER_DISK_BYTES) < 0)
		err = ib_error_set_errno(errno, "cannot size the VM's %s", what);
	return err;
}

static bool is_empty_dir(const char *path)
{
	bool empty = true;
	DIR *d = opendir(path);
	struct dirent *e;

	while (d && (e = readdir(d)))
		if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
			empty = false;
	if (d)
		closedir(d);
	return empty;
}

static int vm_run(const ib_run_req *req)
{
	struct ib_runner_session *s;
	ib_buf b = IB_BUF_INIT;
	char *payload = NULL, *src = NULL, type;
	size_t len;
	uint32_t flags = 0;
	int err;

	if (!req->session)
		return ib_error_set("the VM runner needs a build's session");
	if (!*req->session) {
		s = ib_xcalloc(1, sizeof(*s));
		s->qemu = -1;
		s->ctl = s->lower_fd = s->lists_fd = s->scratch_fd = s->console_fd = -1;
		s->q_lower = s->q_scratch = s->q_lists = s->q_console = -1;
		ib_pasta_init(&s->pasta);
		*req->session = s;
		if ((err = boot(s, req)) < 0)
			goto out_kill;
	}
	s = *req->session;
	if (s->broken)
		return ib_error_set("the build's VM is gone after an earlier failure");
	if (!is_empty_dir(req->upper))
		return ib_error_set("the VM runner starts a step from an empty upper directory only");
	if ((err = write_disk(s->lower_fd, "lower layers", req->lowers, req->nlowers, req->sandbox->epoch)) < 0)
		return err;
	if ((req->plan->flags & IB_PLAN_APT_CACHE) && req->apt_lists) {
		const char *lists[] = { req->apt_lists };
		if ((err = write_disk(s->lists_fd, "apt lists", lists, 1, req->sandbox->epoch)) < 0)
			return err;
		flags |= IB_VM_RUN_APT_LISTS;
	}
	if ((err = request(&b, s, req, flags)) < 0 || (err = send_frame(s, IB_VM_MSG_RUN, &b, req->deadline, req->cancel)) < 0)
		goto out_kill;
	for (;;) {
		free(payload);
		payload = NULL;
		if ((err = recv_frame(s, req->deadline, req->cancel, &type, &payload, &len)) < 0)
			goto out_kill;
		if (type == IB_VM_MSG_OUTPUT) {
			if (req->output && len)
				req->output(payload, len, req->output_arg);
			continue;
		}
		if (type != IB_VM_MSG_STATUS || len < 16 || get32((unsigned char *)payload + 12) != len - 16) {
			err = ib_error_set("the VM sent a frame it may not ('%c', %zu bytes)", type, len);
			goto out_kill;
		}
		break;
	}
	{
		const unsigned char *p = (const unsigned char *)payload;
		uint32_t what = get32(p);
		int32_t cmd = (int32_t)get32(p + 4), ws = (int32_t)get32(p + 8);
		char *msg = payload + 16;

		for (char *c = msg; *c; c++)
			if ((unsigned char)*c < 0x20 || (unsigned char)*c > 0x7e)
				*c = '?';
		if (what == IB_VM_DONE_SETUP) {
			err = ib_error_set("the VM could not run the step: %s", msg);
			goto out_kill;
		}
		if (what == IB_VM_DONE_FAILED) {
			err = ib_runner_failed(req->plan, cmd, ws);
			goto out_kill;
		}
		if (what != IB_VM_DONE_OK) {
			err = ib_error_set("the VM reported an unknown outcome %u", what);
			goto out_kill;
		}
	}
	src = ib_xasprintf("/s%u/upper", s->steps);
	s->steps++;
	{
		ib_ext4_extract_opts xo = {
			.max_bytes = req->sandbox->limits ? req->sandbox->limits->disk : 0,
			.deadline = req->deadline,
			.cancel = req->cancel,
		};
		/* the guest's word that the disk is still is not enough: it is stopped while it is read */
		kill(-s->qemu, SIGSTOP);
		err = ib_ext4_extract_fd(s->scratch_fd, "the VM's scratch disk", src, req->upper, &xo);
		kill(-s->qemu, SIGCONT);
		if (err < 0) {
			ib_error_prefix("the step's changes in the VM");
			goto out_kill;
		}
	}
	free(src);
	free(payload);
	ib_buf_free(&b);
	return 0;
out_kill:
	/* no step runs in a VM that failed one: the next build boots its own */
	kill_qemu(*req->session);
	(*req->session)->broken = true;
	free(src);
	free(payload);
	ib_buf_free(&b);
	return err;
}

static void vm_finish(ib_runner_session *s)
{
	if (!s)
		return;
	if (s->qemu > 0 && !s->broken && s->ctl >= 0 && send_frame(s, IB_VM_MSG_QUIT, NULL, ib_now() + 1, NULL) == 0) {
		/* a clean power-off; then no waiting */
		for (int t = 0; t < 50; t++) {
			if (waitpid(s->qemu, NULL, WNOHANG) == s->qemu) {
				s->qemu = -1;
				break;
			}
			struct timespec tick = { 0, 20 * 1000 * 1000 };
			nanosleep(&tick, NULL);
		}
	}
	ib_error_clear();
	kill_qemu(s);
	ib_pasta_stop(&s->pasta);
	if (s->ctl >= 0)
		close(s->ctl);
	if (s->lower_fd >= 0)
		close(s->lower_fd);
	{
		int fds[] = { s->lists_fd, s->scratch_fd, s->console_fd, s->q_lower, s->q_scratch, s->q_lists, s->q_console };
		for (size_t i = 0; i < sizeof(fds) / sizeof(fds[0]); i++)
			if (fds[i] >= 0)
				close(fds[i]);
	}
	if (s->dir)
		ib_rm_rf(s->dir);
	free(s->dir);
	free(s->console);
	free(s->release);
	ib_buf_free(&s->in);
	free(s);
}

const ib_runner_ops ib_runner_vm = {
	.name = "vm",
	.run = vm_run,
	.finish = vm_finish,
};

bool ib_vm_runs(const char *arch)
{
	return !strcmp(arch, host_arch()) && qemu_binary(arch);
}

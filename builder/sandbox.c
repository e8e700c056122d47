/*
 * The namespace runner.  A step runs in new mount, PID, network, UTS, IPC
 * and cgroup namespaces and, inside those, a user namespace of its own in
 * which root is an unprivileged host uid (ib_config's idmap range).  Its
 * root is an overlayfs whose lower layers (the cached layers) and upper
 * directory are idmapped mounts, so files keep their real owners on disk
 * while the step sees them as its own.  Its PID 1 is ib-sandbox, exec'd
 * fresh from a sealed memfd, which runs the commands with few
 * capabilities, no_new_privs and a seccomp filter.  Its network is pasta's
 * user-mode stack: outbound traffic only, host loopback closed except the
 * ports the package indexes use, link-local addresses unreachable.
 *
 * Process shape:
 *
 *   builder ── C (own process group; joins the build's cgroups; unshares
 *                 mount, PID, net, UTS, IPC, cgroup namespaces)
 *                └─ B = PID 1 of the new PID namespace, still host root:
 *                   idmapped mounts, overlay, /proc, /sys (ro), /dev,
 *                   read-only binds, pivot_root, lo, routes; then a user
 *                   namespace (the builder writes its maps), setuid(0)
 *                   in it, and execveat(ib-sandbox)
 *
 * B and the builder talk over two pipes before the exec (sync: B's pid,
 * "set up my network", "write my maps"; go: the answers).  Killing B ends
 * the PID namespace and everything in it; killing C's process group too.
 */
#include "builder/runner.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <linux/mount.h>
#include <linux/seccomp.h>
#include <net/if.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#include "builder/netns.h"
#include "builder/sandbox-dev.h"
#include "builder/sandbox-proto.h"
#include "builder/seccomp.h"
#include "lib/util.h"

#define IDMAP_COUNT 65536u
/* the overlay's own files (work dir, whiteouts) are made as the mounter: on disk as this id */
#define MOUNTER_ID 65536u

/* Capabilities a step keeps, in its own user namespace: Docker's default set. */
#define KEEP_CAPS                                                                                           \
	((1ULL << 0) /* CHOWN */ | (1ULL << 1) /* DAC_OVERRIDE */ | (1ULL << 3) /* FOWNER */ |              \
	 (1ULL << 4) /* FSETID */ | (1ULL << 5) /* KILL */ | (1ULL << 6) /* SETGID */ | (1ULL << 7) /* SETUID */ | \
	 (1ULL << 8) /* SETPCAP */ | (1ULL << 10) /* NET_BIND_SERVICE */ | (1ULL << 13) /* NET_RAW */ |       \
	 (1ULL << 18) /* SYS_CHROOT */ | (1ULL << 27) /* MKNOD */ | (1ULL << 29) /* AUDIT_WRITE */ |          \
	 (1ULL << 31) /* SETFCAP */)

/* ---- process-wide: the mapping for idmapped mounts, the helper ---- */

static pthread_mutex_t shared_mu = PTHREAD_MUTEX_INITIALIZER;
static int idmap_fd = -1;
static uint32_t idmap_uid, idmap_gid;
static int helper_fd = -1;
static char *helper_path;

static int write_file_str(const char *path, const char *s)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC), err = 0;

	if (fd < 0)
		return -1;
	if (ib_write_all(fd, s, strlen(s)) < 0)
		err = -1;
	if (close(fd) < 0)
		err = -1;
	return err;
}

/* Write pid's uid_map and gid_map: 0..IDMAP_COUNT at uid/gid, and (mounter) MOUNTER_ID as host root. */
static int write_maps(pid_t pid, uint32_t uid, uint32_t gid, bool mounter)
{
	char path[64], map[128];

	snprintf(map, sizeof(map), "0 %u %u\n%s", uid, IDMAP_COUNT, mounter ? "65536 0 1\n" : "");
	snprintf(path, sizeof(path), "/proc/%d/uid_map", (int)pid);
	if (write_file_str(path, map) < 0)
		return ib_error_set_errno(errno, "cannot write the uid map of the sandbox (host uids %u..%u)", uid,
					  uid + IDMAP_COUNT - 1);
	snprintf(map, sizeof(map), "0 %u %u\n%s", gid, IDMAP_COUNT, mounter ? "65536 0 1\n" : "");
	snprintf(path, sizeof(path), "/proc/%d/gid_map", (int)pid);
	if (write_file_str(path, map) < 0)
		return ib_error_set_errno(errno, "cannot write the gid map of the sandbox (host gids %u..%u)", gid,
					  gid + IDMAP_COUNT - 1);
	return 0;
}

/*
 * A user namespace that only carries the mapping of the idmapped mounts:
 * on-disk id n is host id base+n for the step's ids, and on-disk
 * MOUNTER_ID is host root, so that overlayfs (mounted by host root) can
 * make its work dir and whiteouts on the idmapped upper.  Made once per
 * process by a child that unshares and waits while its maps are written.
 */
static int idmap_userns(uint32_t uid, uint32_t gid, int *out)
{
	int p[2], err = 0, fd;
	char c, path[64];
	pid_t pid;

	if (idmap_fd >= 0 && idmap_uid == uid && idmap_gid == gid) {
		*out = idmap_fd;
		return 0;
	}
	if (pipe2(p, O_CLOEXEC) < 0)
		return ib_error_set_errno(errno, "cannot create a pipe");
	pid = fork();
	if (pid < 0) {
		close(p[0]);
		close(p[1]);
		return ib_error_set_errno(errno, "cannot fork");
	}
	if (pid == 0) {
		close(p[0]);
		if (unshare(CLONE_NEWUSER) < 0)
			_exit(1);
		if (write(p[1], "u", 1) != 1)
			_exit(1);
		for (;;)
			pause();
	}
	close(p[1]);
	if (read(p[0], &c, 1) != 1)
		err = ib_error_set("cannot create a user namespace (user namespaces disabled?)");
	close(p[0]);
	if (!err)
		err = write_maps(pid, uid, gid, true);
	snprintf(path, sizeof(path), "/proc/%d/ns/user", (int)pid);
	fd = err ? -1 : open(path, O_RDONLY | O_CLOEXEC);
	if (!err && fd < 0)
		err = ib_error_set_errno(errno, "cannot open '%s'", path);
	kill(pid, SIGKILL);
	while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
		;
	if (err)
		return err;
	if (idmap_fd >= 0)
		close(idmap_fd);
	idmap_fd = *out = fd;
	idmap_uid = uid;
	idmap_gid = gid;
	return 0;
}

/* ib-sandbox in a sealed memfd: what B execs, whatever happens to the file meanwhile. */
static int helper_memfd(const char *path, int *out)
{
	char *data = NULL;
	size_t len = 0;
	int fd, err;

	if (helper_fd >= 0 && helper_path && !strcmp(helper_path, path)) {
		*out = helper_fd;
		return 0;
	}
	if ((err = ib_read_file(&data, &len, path, 64 << 20)) < 0) {
		ib_error_prefix("the sandbox's PID 1 (make builds build/ib-sandbox)");
		return err;
	}
	fd = memfd_create("ib-sandbox", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (fd < 0 || ib_write_all(fd, data, len) < 0 || fchmod(fd, 0555) < 0 ||
	    fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL) < 0) {
		err = ib_error_set_errno(errno, "cannot load '%s' into a memfd", path);
		if (fd >= 0)
			close(fd);
		free(data);
		return err;
	}
	free(data);
	if (helper_fd >= 0)
		close(helper_fd);
	free(helper_path);
	helper_path = ib_xstrdup(path);
	helper_fd = *out = fd;
	return 0;
}

/* ---- the plan for ib-sandbox ---- */

static void put_u32(ib_buf *b, uint32_t v)
{
	ib_buf_add(b, &v, sizeof(v));
}

static void put_str(ib_buf *b, const char *s)
{
	put_u32(b, (uint32_t)strlen(s));
	ib_buf_add(b, s, strlen(s));
}

static int plan_memfd(const ib_run_req *req, int *out)
{
	struct ib_sandbox_plan_hdr hdr;
	const char *prog;
	size_t prog_len, nenv = 0;
	ib_buf b = IB_BUF_INIT;
	int fd, err;

	if ((err = ib_seccomp_program(&prog, &prog_len)) < 0)
		return err;
	for (const char *const *e = req->env; e && *e; e++)
		nenv++;
	memset(&hdr, 0, sizeof(hdr));
	memcpy(hdr.magic, IB_SANDBOX_MAGIC, sizeof(IB_SANDBOX_MAGIC));
	hdr.filter_len = (uint32_t)(prog_len / 8);
	hdr.ncmds = (uint32_t)req->plan->ncmds;
	hdr.nenv = (uint32_t)nenv;
	hdr.keep_caps = KEEP_CAPS;
	ib_buf_add(&b, &hdr, sizeof(hdr));
	ib_buf_add(&b, prog, prog_len);
	for (size_t i = 0; i < req->plan->ncmds; i++) {
		const ib_strv *cmd = &req->plan->cmds[i];
		put_u32(&b, (uint32_t)cmd->n);
		for (size_t j = 0; j < cmd->n; j++)
			put_str(&b, cmd->v[j]);
	}
	for (size_t i = 0; i < nenv; i++)
		put_str(&b, req->env[i]);
	fd = memfd_create("ib-sandbox-plan", MFD_CLOEXEC | MFD_ALLOW_SEALING);
	if (fd < 0 || ib_write_all(fd, b.ptr, b.len) < 0 ||
	    fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_SEAL) < 0) {
		err = ib_error_set_errno(errno, "cannot write the sandbox plan");
		if (fd >= 0)
			close(fd);
		ib_buf_free(&b);
		return err;
	}
	ib_buf_free(&b);
	*out = fd;
	return 0;
}

/* Close every fd from 3 up but those in keep. */
static void close_all_but(const int *keep, size_t n)
{
	int lo = 3;

	for (;;) {
		int next = -1;
		for (size_t i = 0; i < n; i++)
			if (keep[i] >= lo && (next < 0 || keep[i] < next))
				next = keep[i];
		if (next < 0) {
			syscall(SYS_close_range, (unsigned)lo, ~0U, 0);
			return;
		}
		if (next > lo)
			syscall(SYS_close_range, (unsigned)lo, (unsigned)next - 1, 0);
		lo = next + 1;
	}
}

/* ---- in B: mounts ---- */

/* Everything B needs, prepared before fork so that the children allocate little. */
struct sandbox {
	const ib_run_req *req;
	char *scratch;   /* req->scratch, where the mount points are */
	int idmap_fd;
	int helper_fd, plan_fd;
	int out_w, status_w, stdin_r, sync_w, go_r;
};

static void report_setup(struct sandbox *sb, int errnum, const char *fmt, ...) IB_PRINTF(3, 4);

static void report_setup(struct sandbox *sb, int errnum, const char *fmt, ...)
{
	struct ib_sandbox_status st;
	va_list ap;
	size_t len;

	memset(&st, 0, sizeof(st));
	st.setup_failed = 1;
	st.cmd = -1;
	va_start(ap, fmt);
	vsnprintf(st.msg, sizeof(st.msg), fmt, ap);
	va_end(ap);
	len = strlen(st.msg);
	if (errnum)
		snprintf(st.msg + len, sizeof(st.msg) - len, ": %s", strerror(errnum));
	ib_write_all(sb->status_w, &st, sizeof(st));
}

/* An idmapped clone of dir, attached at at (relative to the scratch dir, B's cwd). */
static int idmapped(struct sandbox *sb, const char *dir, const char *at)
{
	struct mount_attr attr = { .attr_set = MOUNT_ATTR_IDMAP | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV,
				   .userns_fd = (uint64_t)sb->idmap_fd };
	int fd = (int)syscall(SYS_open_tree, AT_FDCWD, dir, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC);

	if (fd < 0) {
		report_setup(sb, errno, "cannot clone the mount of '%s'", dir);
		return -1;
	}
	if (syscall(SYS_mount_setattr, fd, "", AT_EMPTY_PATH, &attr, sizeof(attr)) < 0) {
		report_setup(sb, errno, "cannot make an idmapped mount of '%s' (the file system must support "
			     "idmapped mounts: ext4, xfs, btrfs, tmpfs)", dir);
		close(fd);
		return -1;
	}
	if (syscall(SYS_move_mount, fd, "", AT_FDCWD, at, MOVE_MOUNT_F_EMPTY_PATH) < 0) {
		report_setup(sb, errno, "cannot attach the idmapped mount of '%s'", dir);
		close(fd);
		return -1;
	}
	close(fd);
	return 0;
}

static int mount_at(struct sandbox *sb, const char *src, const char *rel, const char *type,
		    unsigned long flags, const char *data)
{
	char path[64];

	snprintf(path, sizeof(path), "merged/%s", rel);
	if (mount(src, path, type, flags, data) < 0) {
		report_setup(sb, errno, "cannot mount %s on '/%s' in the sandbox", type ? type : src, rel);
		return -1;
	}
	return 0;
}

/* A read-only bind of src at rel in the sandbox. */
static int bind_ro(struct sandbox *sb, const char *src, const char *rel)
{
	char path[64];

	if (mount_at(sb, src, rel, NULL, MS_BIND, NULL) < 0)
		return -1;
	snprintf(path, sizeof(path), "merged/%s", rel);
	if (mount(NULL, path, NULL, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL) < 0) {
		report_setup(sb, errno, "cannot make '/%s' read-only in the sandbox", rel);
		return -1;
	}
	return 0;
}

/* Is rel (in merged/) a directory, or a regular file, not following a symlink anywhere? */
static bool is_in(const char *rel, mode_t type)
{
	int root = open("merged", O_RDONLY | O_DIRECTORY | O_CLOEXEC), fd;
	struct stat st;
	bool yes = false;

	if (root < 0)
		return false;
	fd = ib_open_beneath(root, rel, O_PATH);
	if (fd >= 0 && fstat(fd, &st) == 0)
		yes = (st.st_mode & S_IFMT) == type;
	if (fd >= 0)
		close(fd);
	close(root);
	return yes;
}

static int setup_dev(struct sandbox *sb)
{
	char path[64];

	if (!is_in("dev", S_IFDIR)) {
		report_setup(sb, 0, "the image has no /dev directory");
		return -1;
	}
	if (mount_at(sb, "tmpfs", "dev", "tmpfs", MS_NOSUID | MS_NOEXEC, IB_DEV_TMPFS_OPTS) < 0)
		return -1;
	for (size_t i = 0; i < sizeof(ib_dev_nodes) / sizeof(ib_dev_nodes[0]); i++) {
		snprintf(path, sizeof(path), "merged/dev/%s", ib_dev_nodes[i].name);
		if (mknod(path, S_IFCHR | 0666, makedev(ib_dev_nodes[i].maj, ib_dev_nodes[i].min)) < 0) {
			report_setup(sb, errno, "cannot create /dev/%s in the sandbox", ib_dev_nodes[i].name);
			return -1;
		}
	}
	for (size_t i = 0; i < sizeof(ib_dev_links) / sizeof(ib_dev_links[0]); i++) {
		snprintf(path, sizeof(path), "merged/dev/%s", ib_dev_links[i].name);
		if (symlink(ib_dev_links[i].target, path) < 0) {
			report_setup(sb, errno, "cannot create /dev/%s in the sandbox", ib_dev_links[i].name);
			return -1;
		}
	}
	mkdir("merged/dev/pts", 0755);
	mkdir("merged/dev/shm", 01777);
	if (mount_at(sb, "devpts", "dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
		     IB_DEV_PTS_OPTS) < 0)
		return -1;
	if (mount_at(sb, "shm", "dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, IB_DEV_SHM_OPTS) < 0)
		return -1;
	return 0;
}

/* Overlay options with the lowers named l/<n> relative to the scratch dir (B's cwd), top first. */
static char *overlay_options(size_t nlowers, const char *upper, const char *work)
{
	ib_buf b = IB_BUF_INIT;

	ib_buf_puts(&b, "lowerdir=");
	for (size_t i = nlowers; i-- > 0;)
		ib_buf_printf(&b, "l/%zu%s", i, i ? ":" : "");
	ib_buf_printf(&b, ",upperdir=%s,workdir=%s,index=off,redirect_dir=off,metacopy=off", upper, work);
	return ib_buf_detach(&b);
}

static int setup_mounts(struct sandbox *sb)
{
	const ib_run_req *req = sb->req;
	char path[64], *opts;
	int rc;

	if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0) {
		report_setup(sb, errno, "cannot make mounts private");
		return -1;
	}
	if (chdir(sb->scratch) < 0) {
		report_setup(sb, errno, "cannot enter '%s'", sb->scratch);
		return -1;
	}
	/* the layers and the scratch dir (upper/, work/), idmapped */
	for (size_t i = 0; i < req->nlowers; i++) {
		snprintf(path, sizeof(path), "l/%zu", i);
		if (idmapped(sb, req->lowers[i], path) < 0)
			return -1;
	}
	if (idmapped(sb, ".", "rw") < 0)
		return -1;
	opts = overlay_options(req->nlowers, "rw/upper", "rw/work");
	rc = mount("overlay", "merged", "overlay", MS_NOSUID | MS_NODEV, opts);
	free(opts);
	if (rc < 0) {
		report_setup(sb, errno, "cannot mount the step's overlayfs");
		return -1;
	}
	if (!is_in("proc", S_IFDIR) || !is_in("sys", S_IFDIR)) {
		report_setup(sb, 0, "the image has no /proc or /sys directory");
		return -1;
	}
	if (mount_at(sb, "proc", "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0 ||
	    mount_at(sb, "sysfs", "sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, NULL) < 0 ||
	    setup_dev(sb) < 0)
		return -1;
	if (req->resolv_conf && is_in("etc/resolv.conf", S_IFREG) && bind_ro(sb, req->resolv_conf, "etc/resolv.conf") < 0)
		return -1;
	/* the build's view of the apt lists: the shared ones read-only, under its own upper */
	if ((req->plan->flags & IB_PLAN_APT_CACHE) && req->apt_lists && req->apt_private &&
	    is_in("var/lib/apt/lists", S_IFDIR)) {
		if (idmapped(sb, req->apt_lists, "al") < 0 || idmapped(sb, req->apt_private, "ap") < 0)
			return -1;
		if (mount_at(sb, "overlay", "var/lib/apt/lists", "overlay", MS_NOSUID | MS_NODEV,
			     "lowerdir=al,upperdir=ap/upper,workdir=ap/work,index=off,redirect_dir=off,metacopy=off") < 0)
			return -1;
	}
	if (sethostname(IB_SANDBOX_HOSTNAME, strlen(IB_SANDBOX_HOSTNAME)) < 0) {
		report_setup(sb, errno, "cannot set the sandbox hostname");
		return -1;
	}
	if (chdir("merged") < 0 || syscall(SYS_pivot_root, ".", ".") < 0) {
		report_setup(sb, errno, "cannot pivot into the sandbox root");
		return -1;
	}
	if (umount2(".", MNT_DETACH) < 0 || chdir("/") < 0) {
		report_setup(sb, errno, "cannot detach the host root");
		return -1;
	}
	return 0;
}

/* One byte to the builder, then one back (or EOF: the builder gave up). */
static int ask(struct sandbox *sb, char what)
{
	char c;

	if (write(sb->sync_w, &what, 1) != 1 || read(sb->go_r, &c, 1) != 1)
		return -1;
	return c == 'y' ? 0 : -1;
}

/* The first question carries B's pid on the host (B is 1 in its own namespace; /proc is still the host's). */
static int ask_with_pid(struct sandbox *sb, char what)
{
	char self[32], msg[1 + sizeof(pid_t)], c;
	ssize_t n = readlink("/proc/self", self, sizeof(self) - 1);
	pid_t pid;

	if (n <= 0)
		return -1;
	self[n] = '\0';
	pid = (pid_t)strtol(self, NULL, 10);
	msg[0] = what;
	memcpy(msg + 1, &pid, sizeof(pid));
	if (ib_write_all(sb->sync_w, msg, sizeof(msg)) < 0 || read(sb->go_r, &c, 1) != 1)
		return -1;
	return c == 'y' ? 0 : -1;
}

/* Move fd to want, keeping it open there (close-on-exec as asked). */
static int place(int fd, int want, bool cloexec)
{
	if (fd == want)
		return fcntl(fd, F_SETFD, cloexec ? FD_CLOEXEC : 0);
	return dup3(fd, want, cloexec ? O_CLOEXEC : 0) < 0 ? -1 : 0;
}

/* B: PID 1 of the step's namespaces, until it execs ib-sandbox.  Never returns. */
static void __attribute__((noreturn)) sandbox_init(struct sandbox *sb)
{
	char *const argv[] = { (char *)"ib-sandbox", NULL }, *const envp[] = { NULL };
	int fds[5], high = 100;

	prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (ask_with_pid(sb, 'p') < 0)
		_exit(2);
	umask(0);
	if (setup_mounts(sb) < 0)
		_exit(2);
	umask(022);
	if (ib_netns_lo_up() < 0) {
		report_setup(sb, 0, "%s", ib_error_last());
		_exit(2);
	}
	/* link-local stays closed whatever pasta adds; pasta itself comes at the step's first socket */
	if (ib_netns_close_link_local(IB_SANDBOX_DNS) < 0) {
		report_setup(sb, 0, "%s", ib_error_last());
		_exit(2);
	}
	/* from here on, no privilege on the host: a user namespace whose root is the idmap range */
	if (unshare(CLONE_NEWUSER) < 0) {
		report_setup(sb, errno, "cannot create the step's user namespace");
		_exit(2);
	}
	if (ask(sb, 'u') < 0) {
		report_setup(sb, 0, "the builder did not map the step's user namespace");
		_exit(2);
	}
	if (setresgid(0, 0, 0) < 0 || setgroups(0, NULL) < 0 || setresuid(0, 0, 0) < 0) {
		report_setup(sb, errno, "cannot become root in the step's user namespace");
		_exit(2);
	}
	/*
	 * New credentials clear the parent-death signal: arm it again (it
	 * survives the exec of ib-sandbox), then make sure the builder did not
	 * die meanwhile: its end of the sync pipe is the one reader, so a write
	 * fails once it is gone.  When B dies, the PID namespace dies with it.
	 */
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (write(sb->sync_w, "k", 1) != 1)
		_exit(2);
	/* fds 0..4 as ib-sandbox expects them (builder/sandbox-proto.h), nothing else open */
	fds[0] = fcntl(sb->stdin_r, F_DUPFD, high);
	fds[1] = fcntl(sb->out_w, F_DUPFD, high);
	fds[2] = fcntl(sb->out_w, F_DUPFD, high);
	fds[3] = fcntl(sb->plan_fd, F_DUPFD, high);
	fds[4] = fcntl(sb->status_w, F_DUPFD, high);
	for (int i = 0; i < 5; i++)
		if (fds[i] < 0 || place(fds[i], i, false) < 0) {
			report_setup(sb, errno, "cannot arrange the sandbox's descriptors");
			_exit(2);
		}
	{
		int h = fcntl(sb->helper_fd, F_DUPFD_CLOEXEC, high + 10);
		int keep[] = { IB_SANDBOX_FD_PLAN, IB_SANDBOX_FD_STATUS, h };
		close_all_but(keep, 3);
		syscall(SYS_execveat, h, "", argv, envp, AT_EMPTY_PATH);
		sb->status_w = IB_SANDBOX_FD_STATUS;
		report_setup(sb, errno, "cannot start the sandbox's PID 1");
	}
	_exit(2);
}

/* C: joins the cgroups, unshares the namespaces, starts B, reports B's pid, exits with B's status. */
static void __attribute__((noreturn)) sandbox_outer(struct sandbox *sb, pid_t builder)
{
	const ib_run_req *req = sb->req;
	pid_t b;
	int ws;

	prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (getppid() != builder)
		_exit(3);
	for (const char *const *cg = req->sandbox->cgroups; cg && *cg; cg++) {
		char path[4096];
		snprintf(path, sizeof(path), "%s/cgroup.procs", *cg);
		if (write_file_str(path, "0\n") < 0) {
			report_setup(sb, errno, "cannot join the build's cgroup '%s'", *cg);
			_exit(2);
		}
	}
	if (unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWCGROUP) < 0) {
		report_setup(sb, errno, "cannot create namespaces (imagebuilder needs root)");
		_exit(2);
	}
	b = fork();
	if (b < 0) {
		report_setup(sb, errno, "cannot start the sandbox");
		_exit(2);
	}
	if (b == 0)
		sandbox_init(sb);
	close_all_but(NULL, 0);
	while (waitpid(b, &ws, 0) < 0) {
		if (errno != EINTR)
			_exit(3);
	}
	_exit(WIFEXITED(ws) ? WEXITSTATUS(ws) : 3);
}

/* ---- the builder's side ---- */

static int describe_failure(const ib_run_req *req, const struct ib_sandbox_status *st)
{
	return ib_runner_failed(req->plan, st->cmd, st->wstatus);
}

struct run_state {
	const ib_run_req *req;
	pid_t c, b;
	int killed;
	int listener;  /* the step's seccomp listener, once ib-sandbox sent it */
	int netns;     /* the step's network namespace, opened while B was known alive */
	bool net_up;   /* pasta is attached */
	char *net_err; /* why it could not be (the step was killed) */
	ib_pasta pasta;
};

static bool should_stop(struct run_state *rs)
{
	const ib_run_req *req = rs->req;

	if (rs->killed)
		return true;
	if ((req->cancel && *req->cancel) || (req->deadline > 0 && ib_now() >= req->deadline)) {
		rs->killed = (req->cancel && *req->cancel) ? IB_ECANCELED : IB_ETIMEOUT;
		if (rs->b > 0)
			kill(rs->b, SIGKILL);
		kill(-rs->c, SIGKILL);
		kill(rs->c, SIGKILL);
		return true;
	}
	return false;
}

/* Read exactly len bytes from fd, watching the deadline; 0, or -1 (EOF, error, stopped). */
static int read_sync(struct run_state *rs, int fd, void *buf, size_t len)
{
	size_t got = 0;

	while (got < len) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		int r = poll(&p, 1, 100);
		ssize_t n;

		if (should_stop(rs))
			return -1;
		if (r <= 0)
			continue;
		n = read(fd, (char *)buf + got, len - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		got += (size_t)n;
	}
	return 0;
}

/*
 * One message of the status socket: the listener (0; *listener set, or
 * closed when one came already), the status (1, in *st), or nothing more
 * (-1).
 */
static int recv_status(int fd, struct ib_sandbox_status *st, int *listener)
{
	union {
		char buf[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} u;
	struct ib_sandbox_status msg;
	struct iovec iov = { &msg, sizeof(msg) };
	struct msghdr mh = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf, .msg_controllen = sizeof(u.buf) };
	struct cmsghdr *cm;
	ssize_t n;

	memset(&msg, 0, sizeof(msg));
	while ((n = recvmsg(fd, &mh, MSG_CMSG_CLOEXEC | MSG_DONTWAIT)) < 0 && errno == EINTR)
		;
	if (n <= 0)
		return -1;
	for (cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm))
		if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
			int got;
			memcpy(&got, CMSG_DATA(cm), sizeof(int));
			if (*listener < 0 && n == 1 && *(char *)&msg == IB_SANDBOX_MSG_LISTENER)
				*listener = got;
			else
				close(got);
		}
	if (n == (ssize_t)sizeof(msg)) {
		*st = msg;
		return 1;
	}
	return 0;
}

/*
 * A socket() of the step: attach the network at the first (pasta; B
 * closed link-local already), then let the call go on.  When the network cannot be
 * had, the step is killed and the build fails saying why.
 */
static void answer_notification(struct run_state *rs)
{
	const ib_run_req *req = rs->req;
	struct seccomp_notif_sizes sizes = { 0 };
	struct seccomp_notif *n;
	struct seccomp_notif_resp *resp;

	if (syscall(SYS_seccomp, SECCOMP_GET_NOTIF_SIZES, 0, &sizes) < 0)
		sizes = (struct seccomp_notif_sizes){ sizeof(*n), sizeof(*resp), 0 };
	n = ib_xcalloc(1, sizes.seccomp_notif > sizeof(*n) ? sizes.seccomp_notif : sizeof(*n));
	resp = ib_xcalloc(1, sizes.seccomp_notif_resp > sizeof(*resp) ? sizes.seccomp_notif_resp : sizeof(*resp));
	if (ioctl(rs->listener, SECCOMP_IOCTL_NOTIF_RECV, n) < 0)
		goto out; /* the caller is gone (ENOENT), or the step is */
	if (!rs->net_up && !rs->net_err) {
		int err = ib_pasta_start(&rs->pasta, req->sandbox->pasta, rs->netns, req->scratch, req->sandbox->ports,
					 req->sandbox->nports, IB_SANDBOX_DNS);
		if (err) {
			rs->net_err = ib_xstrdup(ib_error_last());
			if (rs->b > 0)
				kill(rs->b, SIGKILL);
			kill(-rs->c, SIGKILL);
			goto out;
		}
		rs->net_up = true;
	}
	resp->id = n->id;
	resp->flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE;
	if (ioctl(rs->listener, SECCOMP_IOCTL_NOTIF_SEND, resp) < 0) {
		/* ENOENT: the caller went away meanwhile */
	}
out:
	free(n);
	free(resp);
}

/*
 * Answer B's questions until it execs: 0 when it runs the step, 1 when it
 * went away (its status says why), <0 when the builder could not do its
 * part (B is told no and gives up).
 */
static int serve_sandbox(struct run_state *rs, int sync_r, int go_w)
{
	const ib_run_req *req = rs->req;
	char msg[1 + sizeof(pid_t)], c;
	int err;

	if (read_sync(rs, sync_r, msg, sizeof(msg)) < 0 || msg[0] != 'p')
		return 1;
	memcpy(&rs->b, msg + 1, sizeof(pid_t));
	{
		/* B's network namespace, held from now on: pasta gets this one, whatever becomes of the pid */
		char path[64];
		snprintf(path, sizeof(path), "/proc/%d/ns/net", (int)rs->b);
		if ((rs->netns = open(path, O_RDONLY | O_CLOEXEC)) < 0)
			return ib_error_set_errno(errno, "cannot open the step's network namespace");
	}
	if (write(go_w, "y", 1) != 1)
		return 1;
	/* user namespace */
	if (read_sync(rs, sync_r, &c, 1) < 0 || c != 'u')
		return 1;
	if ((err = write_maps(rs->b, req->sandbox->uid, req->sandbox->gid, false)) < 0) {
		if (write(go_w, "n", 1) < 0) {
			/* as above */
		}
		return err;
	}
	if (write(go_w, "y", 1) != 1)
		return 1;
	return 0;
}

static int namespace_run(const ib_run_req *req)
{
	struct sandbox sb = { .req = req, .out_w = -1, .status_w = -1, .stdin_r = -1, .sync_w = -1, .go_r = -1,
			      .plan_fd = -1, .helper_fd = -1, .idmap_fd = -1 };
	struct run_state rs = { .req = req, .c = -1, .b = -1, .listener = -1, .netns = -1 };
	struct ib_sandbox_status st;
	int out[2] = { -1, -1 }, status[2] = { -1, -1 }, in[2] = { -1, -1 }, sync[2] = { -1, -1 }, go[2] = { -1, -1 };
	int err = 0, ws = 0, setup_err = 0;
	bool have_status = false;
	pid_t builder = getpid();
	char buf[65536], *dirs[4] = { NULL }, *setup_msg = NULL;

	ib_pasta_init(&rs.pasta);
	if (!req->sandbox || !req->sandbox->helper)
		return ib_error_set("the sandbox is not configured (no ib-sandbox)");
	sb.scratch = (char *)req->scratch;
	dirs[0] = ib_xasprintf("%s/merged", req->scratch);
	dirs[1] = ib_xasprintf("%s/work", req->scratch);
	dirs[2] = ib_xasprintf("%s/l", req->scratch);
	dirs[3] = ib_xasprintf("%s/rw", req->scratch);
	for (int i = 0; i < 4; i++)
		if (mkdir(dirs[i], i == 1 ? 0700 : 0755) < 0) {
			err = ib_error_set_errno(errno, "cannot create sandbox directories in '%s'", req->scratch);
			goto out;
		}
	for (size_t i = 0; i < req->nlowers; i++) {
		char *p = ib_xasprintf("%s/l/%zu", req->scratch, i);
		int r = mkdir(p, 0755);
		free(p);
		if (r < 0) {
			err = ib_error_set_errno(errno, "cannot create sandbox directories in '%s'", req->scratch);
			goto out;
		}
	}
	if (req->plan->flags & IB_PLAN_APT_CACHE) {
		char *al = ib_xasprintf("%s/al", req->scratch), *ap = ib_xasprintf("%s/ap", req->scratch);
		int r = mkdir(al, 0755) < 0 || mkdir(ap, 0755) < 0 ? -1 : 0;
		free(al);
		free(ap);
		if (r < 0) {
			err = ib_error_set_errno(errno, "cannot create sandbox directories in '%s'", req->scratch);
			goto out;
		}
	}
	pthread_mutex_lock(&shared_mu);
	if ((err = idmap_userns(req->sandbox->uid, req->sandbox->gid, &sb.idmap_fd)) == 0)
		err = helper_memfd(req->sandbox->helper, &sb.helper_fd);
	pthread_mutex_unlock(&shared_mu);
	if (err || (err = plan_memfd(req, &sb.plan_fd)) < 0)
		goto out;
	if (pipe2(out, O_CLOEXEC) < 0 || socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, status) < 0 ||
	    pipe2(in, O_CLOEXEC) < 0 ||
	    pipe2(sync, O_CLOEXEC) < 0 || pipe2(go, O_CLOEXEC) < 0) {
		err = ib_error_set_errno(errno, "cannot create pipes");
		goto out;
	}
	sb.out_w = out[1];
	sb.status_w = status[1];
	sb.stdin_r = in[0];
	sb.sync_w = sync[1];
	sb.go_r = go[0];

	rs.c = fork();
	if (rs.c < 0) {
		err = ib_error_set_errno(errno, "cannot start the sandbox");
		goto out;
	}
	if (rs.c == 0) {
		int keep[] = { sb.out_w, sb.status_w, sb.stdin_r, sb.sync_w, sb.go_r, sb.plan_fd, sb.helper_fd,
			       sb.idmap_fd };
		setpgid(0, 0);
		/* everything but these: another thread's pipes, locks and sockets stay outside */
		close_all_but(keep, sizeof(keep) / sizeof(keep[0]));
		sandbox_outer(&sb, builder);
	}
	setpgid(rs.c, rs.c);
	close(out[1]);
	close(status[1]);
	close(in[0]);
	close(in[1]); /* the steps' stdin: an empty pipe */
	close(sync[1]);
	close(go[0]);
	out[1] = status[1] = in[0] = in[1] = sync[1] = go[0] = -1;

	setup_err = serve_sandbox(&rs, sync[0], go[1]);
	if (setup_err != 0) {
		/* B waits on the go pipe, or is gone: closing it ends the setup either way */
		close(go[1]);
		go[1] = -1;
		if (setup_err < 0)
			setup_msg = ib_xstrdup(ib_error_last());
	}
	for (;;) {
		/* the output; the status socket until the listener or the status came; the listener */
		struct pollfd p[3] = { { .fd = out[0], .events = POLLIN },
				       { .fd = have_status || rs.listener >= 0 ? -1 : status[0], .events = POLLIN },
				       { .fd = rs.listener, .events = POLLIN } };
		int r = poll(p, 3, 100);
		ssize_t n;

		should_stop(&rs);
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0) {
			err = ib_error_set_errno(errno, "cannot read the step's output");
			kill(-rs.c, SIGKILL);
			break;
		}
		if (r == 0)
			continue;
		if (p[1].revents && recv_status(status[0], &st, &rs.listener) == 1)
			have_status = true;
		if (p[2].revents & POLLIN)
			answer_notification(&rs);
		else if (p[2].revents & (POLLHUP | POLLERR | POLLNVAL)) {
			close(rs.listener);
			rs.listener = -1;
		}
		if (!p[0].revents)
			continue;
		n = read(out[0], buf, sizeof(buf));
		if (n < 0 && (errno == EINTR || errno == EAGAIN))
			continue;
		if (n <= 0)
			break;
		if (req->output)
			req->output(buf, (size_t)n, req->output_arg);
	}
	/* the step's output is closed: its PID 1 exited, or was killed; nothing may outlive it */
	if (rs.b > 0)
		kill(rs.b, SIGKILL);
	while (waitpid(rs.c, &ws, 0) < 0 && errno == EINTR)
		;
	if (err)
		goto out;
	if (rs.killed) {
		err = rs.killed == IB_ECANCELED ? (ib_error_set("step cancelled"), IB_ECANCELED)
						: (ib_error_set("step timed out"), IB_ETIMEOUT);
		goto out;
	}
	/* the builder's own failure says more than B's "the builder did not ..." */
	if (setup_err < 0) {
		err = ib_error_set("%s", setup_msg);
		goto out;
	}
	if (rs.net_err) {
		err = ib_error_set("%s", rs.net_err);
		goto out;
	}
	while (!have_status) {
		int r = recv_status(status[0], &st, &rs.listener);
		if (r < 0)
			break;
		have_status = r == 1;
	}
	if (!have_status) {
		err = ib_error_set("the sandbox ended without a status (exit %d)",
				   WIFEXITED(ws) ? WEXITSTATUS(ws) : 128 + WTERMSIG(ws));
		goto out;
	}
	st.msg[sizeof(st.msg) - 1] = '\0';
	if (st.setup_failed)
		err = ib_error_set("sandbox: %s", st.msg);
	else if (st.cmd >= 0)
		err = describe_failure(req, &st);
out:
	free(setup_msg);
	free(rs.net_err);
	if (rs.listener >= 0)
		close(rs.listener);
	if (rs.netns >= 0)
		close(rs.netns);
	ib_pasta_stop(&rs.pasta);
	for (int i = 0; i < 2; i++) {
		int *all[] = { out, status, in, sync, go };
		for (size_t j = 0; j < sizeof(all) / sizeof(all[0]); j++)
			if (all[j][i] >= 0)
				close(all[j][i]);
	}
	if (sb.plan_fd >= 0)
		close(sb.plan_fd);
	/* The overlay's work dir is the kernel's; nothing in it is ours to keep. */
	if (dirs[1])
		ib_rm_rf(dirs[1]);
	for (int i = 0; i < 4; i++) {
		if (i != 1 && dirs[i])
			ib_rm_rf(dirs[i]);
		free(dirs[i]);
	}
	{
		char *al = ib_xasprintf("%s/al", req->scratch), *ap = ib_xasprintf("%s/ap", req->scratch);
		rmdir(al);
		rmdir(ap);
		free(al);
		free(ap);
	}
	return err;
}

const ib_runner_ops ib_runner_namespace = {
	.name = "namespace",
	.run = namespace_run,
};

/*
 * Copying a directory out of an ext4 image (layer/ext4read.c).  Images are
 * made by the real mke2fs -d from a tree with every kind of entry, then
 * read back and compared with the tree property by property: ext4 with
 * 4 KiB blocks and hashed directories, ext4 with inline data, ext3 (block
 * maps).  Hostile images are made with debugfs -w (a directory linked into
 * itself, a one-link inode under two names, nanoseconds and uninitialised
 * extents) or by patching a directory block (names with '/', NUL, ".",
 * "..", empty, twice; inode numbers out of range or reserved): each is
 * refused with a message, and nothing beside dest changes.  Needs root
 * (owners, devices, trusted.* xattrs), mke2fs and debugfs.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <unistd.h>

#include <ext2fs/ext2_fs.h>

#include "layer/ext4read.h"
#include "lib/error.h"
#include "lib/limits.h"
#include "lib/util.h"
#include "tests/unit/test.h"

#define BIG_SIZE    300000
#define SPARSE_SIZE (8 * 1024 * 1024)
#define MANY        300
#define ATIME0      1600000000
#define MTIME0      1500000000

static char *root; /* the temporary directory of this run */

static void cleanup(void)
{
	if (root)
		ib_rm_rf(root);
}

static void die(const char *what)
{
	fprintf(stderr, "test-ext4read: fixture: %s: %s\n", what, strerror(errno));
	exit(1);
}

/* A fresh directory under root. */
static char *scratch(const char *name)
{
	char *p;

	if (!root) {
		char tmpl[] = "/tmp/test-ext4read.XXXXXX";

		if (!mkdtemp(tmpl))
			die("mkdtemp");
		root = ib_xstrdup(tmpl);
		atexit(cleanup);
	}
	p = ib_xasprintf("%s/%s", root, name);
	if (mkdir(p, 0755) < 0)
		die(p);
	return p;
}

/* Run a shell command (sbin on the PATH); its stdout and stderr, *status its exit code. */
static char *run(int *status, const char *fmt, ...) IB_PRINTF(2, 3);

static char *run(int *status, const char *fmt, ...)
{
	ib_buf out = IB_BUF_INIT;
	char chunk[4096], *cmd, *full;
	va_list ap;
	FILE *f;
	size_t n;
	int st;

	va_start(ap, fmt);
	if (vasprintf(&cmd, fmt, ap) < 0)
		abort();
	va_end(ap);
	full = ib_xasprintf("PATH=/usr/sbin:/sbin:$PATH; %s 2>&1", cmd);
	free(cmd);
	f = popen(full, "r");
	free(full);
	if (!f)
		abort();
	while ((n = fread(chunk, 1, sizeof(chunk), f)) > 0)
		ib_buf_add(&out, chunk, n);
	st = pclose(f);
	*status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
	return ib_buf_detach(&out);
}

/* mke2fs and debugfs are there; else the test says it skips. */
static bool tools(const char *test)
{
	int st;

	free(run(&st, "command -v mke2fs && command -v debugfs"));
	if (st != 0)
		printf("skip %s: mke2fs or debugfs is not installed (e2fsprogs)\n", test);
	return st == 0;
}

/* debugfs -w -R req img; true when it printed no complaint. */
static bool debugfs_w(const char *img, const char *req)
{
	int st;
	char *out = run(&st, "debugfs -w -R '%s' '%s'", req, img);
	bool ok = st == 0 && !strstr(out, "rror") && !strstr(out, "not found") && !strstr(out, "Usage") &&
		  !strstr(out, "usage");

	if (!ok)
		fprintf(stderr, "debugfs -w -R '%s': %s\n", req, out);
	free(out);
	return ok;
}

static char *debugfs(const char *img, const char *req)
{
	int st;

	return run(&st, "debugfs -R '%s' '%s'", req, img);
}

/* mke2fs -d src into dir/name (64 MiB); NULL on failure. */
static char *make_image(const char *dir, const char *name, const char *src, const char *opts)
{
	char *img = ib_xasprintf("%s/%s", dir, name), *out;
	int st;

	out = run(&st, "mke2fs -q -F %s -d '%s' '%s' 64M", opts, src, img);
	if (st != 0) {
		fprintf(stderr, "mke2fs %s: %s\n", opts, out);
		free(img);
		img = NULL;
	}
	free(out);
	return img;
}

/* ---- making a tree ---------------------------------------------------- */

static void put_file(const char *dir, const char *rel, const void *data, size_t len)
{
	char *p = ib_xasprintf("%s/%s", dir, rel);
	int fd = open(p, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);

	if (fd < 0 || ib_write_all(fd, data, len) < 0 || close(fd) < 0)
		die(p);
	free(p);
}

static void put_dir(const char *dir, const char *rel, mode_t mode)
{
	char *p = ib_xasprintf("%s/%s", dir, rel);

	if (mkdir(p, mode) < 0 || chmod(p, mode) < 0)
		die(p);
	free(p);
}

static void put_node(const char *dir, const char *rel, mode_t mode, dev_t dev)
{
	char *p = ib_xasprintf("%s/%s", dir, rel);

	if (mknod(p, mode, dev) < 0 || chmod(p, mode & 07777) < 0)
		die(p);
	free(p);
}

static void put_symlink(const char *dir, const char *rel, const char *target)
{
	char *p = ib_xasprintf("%s/%s", dir, rel);

	if (symlink(target, p) < 0)
		die(p);
	free(p);
}

static void put_owner(const char *dir, const char *rel, uid_t uid, gid_t gid)
{
	char *p = ib_xasprintf("%s/%s", dir, rel);

	if (lchown(p, uid, gid) < 0)
		die(p);
	free(p);
}

static void put_mode(const char *dir, const char *rel, mode_t mode)
{
	char *p = ib_xasprintf("%s/%s", dir, rel);

	if (chmod(p, mode) < 0)
		die(p);
	free(p);
}

static void put_xattr(const char *dir, const char *rel, const char *key, const void *v, size_t n)
{
	char *p = ib_xasprintf("%s/%s", dir, rel);

	if (lsetxattr(p, key, v, n, 0) < 0)
		die(p);
	free(p);
}

static void put_link(const char *dir, const char *from, const char *to)
{
	char *p = ib_xasprintf("%s/%s", dir, from), *q = ib_xasprintf("%s/%s", dir, to);

	if (link(p, q) < 0)
		die(q);
	free(p);
	free(q);
}

static void put_socket(const char *dir, const char *rel)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	char *p = ib_xasprintf("%s/%s", dir, rel);
	int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (strlen(p) >= sizeof(sa.sun_path))
		die("socket path too long");
	memcpy(sa.sun_path, p, strlen(p) + 1);
	if (s < 0 || bind(s, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		die(p);
	close(s);
	free(p);
}

/* A POSIX ACL in the kernel's xattr format: user::rwx user:1000:r-x group::r-x mask::r-x other::r-- */
static void put_acl(const char *dir, const char *rel, const char *key)
{
	static const uint16_t tags[5] = { 0x01, 0x02, 0x04, 0x10, 0x20 };
	static const uint16_t perms[5] = { 7, 5, 5, 5, 4 };
	static const uint32_t ids[5] = { 0xffffffff, 1000, 0xffffffff, 0xffffffff, 0xffffffff };
	uint32_t acl[1 + 5 * 2];

	acl[0] = 2;
	for (int i = 0; i < 5; i++) {
		acl[1 + 2 * i] = (uint32_t)tags[i] | (uint32_t)perms[i] << 16;
		acl[2 + 2 * i] = ids[i];
	}
	put_xattr(dir, rel, key, acl, sizeof(acl));
}

static unsigned char big_byte(size_t i)
{
	return (unsigned char)((i * 131 + i / 4096) & 0xff);
}

static void put_big(const char *dir, const char *rel, size_t size)
{
	unsigned char *buf = ib_xmalloc(size);

	for (size_t i = 0; i < size; i++)
		buf[i] = big_byte(i);
	put_file(dir, rel, buf, size);
	free(buf);
}

static void put_sparse(const char *dir, const char *rel)
{
	char *p = ib_xasprintf("%s/%s", dir, rel);
	int fd = open(p, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);

	if (fd < 0 || pwrite(fd, "head", 4, 0) != 4 || pwrite(fd, "middle", 6, 4 * 1024 * 1024 + 5) != 6 ||
	    pwrite(fd, "tail", 4, SPARSE_SIZE - 4) != 4 || close(fd) < 0)
		die(p);
	free(p);
}

/* Every kind of entry an upper dir holds, under upper (made here). */
static void make_tree(const char *upper)
{
	static const unsigned char cap[20] = { 0x00, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00 };
	char name[256];

	if (mkdir(upper, 0751) < 0 || chmod(upper, 0751) < 0)
		die(upper);
	put_file(upper, "file", "hello\n", 6);
	put_xattr(upper, "file", "user.note", "kept", 4);
	put_file(upper, "suid", "suid\n", 5);
	put_mode(upper, "suid", 04755);
	put_file(upper, "sgid", "sgid\n", 5);
	put_owner(upper, "sgid", 0, 50);
	put_mode(upper, "sgid", 02711);
	put_file(upper, "caps", "ping\n", 5);
	put_xattr(upper, "caps", "security.capability", cap, sizeof(cap));
	put_file(upper, "owned", "owned\n", 6);
	put_owner(upper, "owned", 1000000, 12345);
	put_mode(upper, "owned", 0640);
	put_file(upper, "empty", "", 0);
	memset(name, 'i', 100);
	put_file(upper, "inline100", name, 100);
	put_big(upper, "big.bin", BIG_SIZE);
	put_sparse(upper, "sparse.bin");
	put_file(upper, "acl", "acl\n", 4);
	put_acl(upper, "acl", "system.posix_acl_access");
	put_symlink(upper, "sl", "file");
	put_owner(upper, "sl", 1234, 5678);
	put_xattr(upper, "sl", "trusted.note", "on a link", 9);
	memset(name, 'm', 90);
	name[90] = '\0';
	put_symlink(upper, "midlink", name);
	memset(name, 'l', 200);
	memcpy(name, "/long/", 6);
	name[200] = '\0';
	put_symlink(upper, "longlink", name);
	put_node(upper, "wh", S_IFCHR | 0, makedev(0, 0));
	put_node(upper, "null", S_IFCHR | 0666, makedev(1, 3));
	put_node(upper, "sda1", S_IFBLK | 0660, makedev(8, 1));
	put_node(upper, "bigdev", S_IFCHR | 0600, makedev(300, 70000));
	put_node(upper, "fifo", S_IFIFO | 0640, 0);
	put_xattr(upper, "fifo", "security.note", "on a fifo", 9);
	put_socket(upper, "sock");
	put_dir(upper, "d", 0755);
	put_file(upper, "d/f", "in d\n", 5);
	put_file(upper, "h1", "hard link\n", 10);
	put_link(upper, "h1", "d/h2");
	put_node(upper, "d/wh2", S_IFCHR | 0, makedev(0, 0));
	put_xattr(upper, "d", "trusted.overlay.opaque", "y", 1);
	put_acl(upper, "d", "system.posix_acl_default");
	put_owner(upper, "d", 1000, 1000);
	put_mode(upper, "d", 02775);
	put_dir(upper, "sticky", 01777);
	put_dir(upper, "empty-dir", 0700);
	put_dir(upper, "deep", 0755);
	put_dir(upper, "deep/a", 0755);
	put_dir(upper, "deep/a/b", 0755);
	put_dir(upper, "deep/a/b/c", 0755);
	put_file(upper, "deep/a/b/c/leaf", "bottom\n", 7);
	put_dir(upper, "many", 0755);
	for (int i = 0; i < MANY; i++) {
		snprintf(name, sizeof(name), "many/file-with-a-longer-name-%04d", i);
		put_file(upper, name, name, strlen(name));
	}
	put_owner(upper, ".", 4242, 4343);
	put_xattr(upper, ".", "user.root", "r", 1);
}

/* ---- a tree's picture ------------------------------------------------- */

struct snap {
	char **rel;
	struct stat *st;
	size_t n, cap;
};

static int cmp_str(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Every entry below dir/rel, sorted, lstat'ed ("" is the root). */
static void snap_add(struct snap *s, const char *dir, const char *rel)
{
	char *p = *rel ? ib_xasprintf("%s/%s", dir, rel) : ib_xstrdup(dir);
	struct stat st;
	char **names = NULL;
	size_t n = 0;
	struct dirent *de;
	DIR *d;

	if (lstat(p, &st) < 0)
		die(p);
	if (s->n == s->cap) {
		s->cap = s->cap ? s->cap * 2 : 64;
		s->rel = ib_xrealloc(s->rel, s->cap * sizeof(*s->rel));
		s->st = ib_xrealloc(s->st, s->cap * sizeof(*s->st));
	}
	s->rel[s->n] = ib_xstrdup(rel);
	s->st[s->n++] = st;
	if (!S_ISDIR(st.st_mode)) {
		free(p);
		return;
	}
	if (!(d = opendir(p)))
		die(p);
	while ((de = readdir(d))) {
		if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
			continue;
		names = ib_xrealloc(names, (n + 1) * sizeof(*names));
		names[n++] = *rel ? ib_xasprintf("%s/%s", rel, de->d_name) : ib_xstrdup(de->d_name);
	}
	closedir(d);
	if (n)
		qsort(names, n, sizeof(*names), cmp_str);
	for (size_t i = 0; i < n; i++) {
		snap_add(s, dir, names[i]);
		free(names[i]);
	}
	free(names);
	free(p);
}

static void snap_free(struct snap *s)
{
	for (size_t i = 0; i < s->n; i++)
		free(s->rel[i]);
	free(s->rel);
	free(s->st);
	memset(s, 0, sizeof(*s));
}

/* Give every entry its own atime and mtime (whole seconds: mke2fs -d keeps no more). */
static void stamp(const char *dir)
{
	struct snap s = { 0 };

	snap_add(&s, dir, "");
	for (size_t i = 0; i < s.n; i++) {
		struct timespec ts[2] = { { ATIME0 + (time_t)i, 0 }, { MTIME0 + 1000 * (time_t)i, 0 } };
		char *p = *s.rel[i] ? ib_xasprintf("%s/%s", dir, s.rel[i]) : ib_xstrdup(dir);

		if (utimensat(AT_FDCWD, p, ts, AT_SYMLINK_NOFOLLOW) < 0)
			die(p);
		free(p);
	}
	snap_free(&s);
}

/* Nanoseconds (and epoch bits) set in an image with debugfs, to expect in the copy. */
struct nsec_patch {
	const char *rel;
	long atime_nsec, mtime_nsec;
	int mtime_epoch;
};

static const struct nsec_patch nsec_patches[] = {
	{ "", 7, 0, 0 },    { "file", 987654321, 123456789, 0 }, { "d", 0, 5, 1 },
	{ "sl", 0, 42, 0 }, { "sda1", 999999999, 1, 0 },
};

static bool patch_nsec(const char *img)
{
	for (size_t i = 0; i < sizeof(nsec_patches) / sizeof(nsec_patches[0]); i++) {
		const struct nsec_patch *p = &nsec_patches[i];
		char req[256];

		snprintf(req, sizeof(req), "sif /upper/%s atime_extra %lu", p->rel, (unsigned long)p->atime_nsec << 2);
		if (!debugfs_w(img, req))
			return false;
		snprintf(req, sizeof(req), "sif /upper/%s mtime_extra %lu", p->rel,
			 (unsigned long)p->mtime_nsec << 2 | (unsigned long)p->mtime_epoch);
		if (!debugfs_w(img, req))
			return false;
	}
	return true;
}

static bool same_bytes(const char *a, const char *b)
{
	char *x = NULL, *y = NULL;
	size_t xl = 0, yl = 0;
	bool same = ib_read_file(&x, &xl, a, 64 << 20) == 0 && ib_read_file(&y, &yl, b, 64 << 20) == 0 && xl == yl &&
		    !memcmp(x, y, xl);

	free(x);
	free(y);
	return same;
}

/* The sorted xattrs of path (not followed) as "name=hexvalue\n" lines. */
static char *xattr_text(const char *path)
{
	char list[65536], value[65536], hex[2 * 65536 + 1], *names[256];
	ssize_t len = llistxattr(path, list, sizeof(list));
	ib_buf out = IB_BUF_INIT;
	size_t n = 0;

	ib_buf_puts(&out, "");
	for (ssize_t off = 0; len > 0 && off < len && n < 256; off += (ssize_t)strlen(list + off) + 1)
		names[n++] = list + off;
	qsort(names, n, sizeof(*names), cmp_str);
	for (size_t i = 0; i < n; i++) {
		ssize_t vl = lgetxattr(path, names[i], value, sizeof(value));

		ib_hex(hex, (const unsigned char *)value, vl > 0 ? (size_t)vl : 0);
		ib_buf_printf(&out, "%s=%s\n", names[i], hex);
	}
	return ib_buf_detach(&out);
}

#define MISMATCH(...)                                             \
	do {                                                      \
		fprintf(stderr, "  %s: ", *rel ? rel : "(root)"); \
		fprintf(stderr, __VA_ARGS__);                     \
		fputc('\n', stderr);                              \
		bad++;                                            \
	} while (0)

/* dst against src and its picture before mke2fs (times); the number of differences, each printed. */
static int compare(const char *src, const struct snap *want, const char *dst, bool nsec)
{
	struct snap got = { 0 };
	int bad = 0;

	snap_add(&got, dst, "");
	if (got.n != want->n) {
		fprintf(stderr, "  %zu entries copied, %zu in the tree\n", got.n, want->n);
		bad++;
	}
	for (size_t i = 0; i < want->n && i < got.n; i++) {
		const char *rel = want->rel[i];
		const struct stat *w = &want->st[i], *g = &got.st[i];
		struct timespec at = w->st_atim, mt = w->st_mtim;
		char *sp = *rel ? ib_xasprintf("%s/%s", src, rel) : ib_xstrdup(src);
		char *dp = *rel ? ib_xasprintf("%s/%s", dst, rel) : ib_xstrdup(dst);
		char *sx, *dx;

		if (strcmp(rel, got.rel[i])) {
			MISMATCH("copied as '%s'", got.rel[i]);
			goto next;
		}
		for (size_t k = 0; nsec && k < sizeof(nsec_patches) / sizeof(nsec_patches[0]); k++)
			if (!strcmp(nsec_patches[k].rel, rel)) {
				at.tv_nsec = nsec_patches[k].atime_nsec;
				mt.tv_nsec = nsec_patches[k].mtime_nsec;
				mt.tv_sec += (time_t)nsec_patches[k].mtime_epoch << 32;
			}
		if ((g->st_mode & S_IFMT) != (w->st_mode & S_IFMT))
			MISMATCH("type 0%o, want 0%o", g->st_mode & S_IFMT, w->st_mode & S_IFMT);
		if ((g->st_mode & 07777) != (w->st_mode & 07777))
			MISMATCH("mode 0%o, want 0%o", g->st_mode & 07777, w->st_mode & 07777);
		if (g->st_uid != w->st_uid || g->st_gid != w->st_gid)
			MISMATCH("owner %u:%u, want %u:%u", g->st_uid, g->st_gid, w->st_uid, w->st_gid);
		if ((S_ISCHR(w->st_mode) || S_ISBLK(w->st_mode)) && g->st_rdev != w->st_rdev)
			MISMATCH("device %u:%u, want %u:%u", major(g->st_rdev), minor(g->st_rdev), major(w->st_rdev),
				 minor(w->st_rdev));
		if (!S_ISDIR(w->st_mode) && g->st_size != w->st_size)
			MISMATCH("size %lld, want %lld", (long long)g->st_size, (long long)w->st_size);
		if (g->st_mtim.tv_sec != mt.tv_sec || g->st_mtim.tv_nsec != mt.tv_nsec)
			MISMATCH("mtime %lld.%09ld, want %lld.%09ld", (long long)g->st_mtim.tv_sec, g->st_mtim.tv_nsec,
				 (long long)mt.tv_sec, mt.tv_nsec);
		if (g->st_atim.tv_sec != at.tv_sec || g->st_atim.tv_nsec != at.tv_nsec)
			MISMATCH("atime %lld.%09ld, want %lld.%09ld", (long long)g->st_atim.tv_sec, g->st_atim.tv_nsec,
				 (long long)at.tv_sec, at.tv_nsec);
		if (S_ISLNK(w->st_mode)) {
			char a[4096] = "", b[4096] = "";

			if (readlink(sp, a, sizeof(a) - 1) < 0 || readlink(dp, b, sizeof(b) - 1) < 0 || strcmp(a, b))
				MISMATCH("link target '%s', want '%s'", b, a);
		}
		if (S_ISREG(w->st_mode) && !same_bytes(sp, dp))
			MISMATCH("content differs");
		sx = xattr_text(sp);
		dx = xattr_text(dp);
		if (strcmp(sx, dx))
			MISMATCH("xattrs\n%s  want\n%s", dx, sx);
		free(sx);
		free(dx);
	next:
		free(sp);
		free(dp);
	}
	snap_free(&got);
	return bad;
}

/* ---- the round trips -------------------------------------------------- */

static char *tree_dir;   /* holds upper/ */
static struct snap tree; /* upper/ as stamped */

static const char *the_tree(void)
{
	if (!tree_dir) {
		char *upper;

		tree_dir = scratch("tree");
		upper = ib_xasprintf("%s/upper", tree_dir);
		make_tree(upper);
		stamp(upper);
		snap_add(&tree, upper, "");
		free(upper);
	}
	return tree_dir;
}

/* The tree into an image made with opts, nanoseconds patched in, copied out of it and compared. */
static int round_trip(const char *name, const char *opts, bool index_dirs, char **out_dest)
{
	const char *src = the_tree();
	char *dir = scratch(name), *upper = ib_xasprintf("%s/upper", src), *dest = ib_xasprintf("%s/dest", dir);
	char *img;
	int bad = 0, st, r;

	stamp(upper); /* mke2fs of an earlier round trip read the files: atimes moved */
	img = make_image(dir, "img", src, opts);
	if (!img)
		bad++;
	if (img && index_dirs) {
		char *out = run(&st, "e2fsck -fyD '%s'", img);

		if (st > 1) {
			fprintf(stderr, "e2fsck -fyD: %s\n", out);
			bad++;
		}
		free(out);
		out = debugfs(img, "htree /upper/many");
		if (strstr(out, "Not a hash-indexed")) {
			fprintf(stderr, "/upper/many is not hashed: %s\n", out);
			bad++;
		}
		free(out);
	}
	if (img && !patch_nsec(img))
		bad++;
	if (mkdir(dest, 0700) < 0)
		die(dest);
	if (img && (r = ib_ext4_extract(img, "/upper", dest, NULL)) != 0) {
		fprintf(stderr, "ib_ext4_extract: %d: %s\n", r, ib_error_last());
		bad++;
	}
	if (!bad)
		bad += compare(upper, &tree, dest, true);
	free(img);
	free(upper);
	free(dir);
	if (out_dest)
		*out_dest = dest;
	else
		free(dest);
	return bad;
}

/* What compare() cannot see: links as links, holes as holes. */
static int links_and_holes(const char *dest)
{
	char *a = ib_xasprintf("%s/h1", dest), *b = ib_xasprintf("%s/d/h2", dest);
	char *s = ib_xasprintf("%s/sparse.bin", dest);
	struct stat sa, sb, ss;
	int bad = 0;

	if (lstat(a, &sa) < 0 || lstat(b, &sb) < 0 || sa.st_ino != sb.st_ino || sa.st_nlink != 2) {
		fprintf(stderr, "  h1 and d/h2 are not one inode with two links\n");
		bad++;
	}
	if (lstat(s, &ss) < 0 || ss.st_size != SPARSE_SIZE || ss.st_blocks * 512 > 1024 * 1024) {
		fprintf(stderr, "  sparse.bin lost its holes (%lld bytes allocated)\n", (long long)ss.st_blocks * 512);
		bad++;
	}
	free(a);
	free(b);
	free(s);
	return bad;
}

TEST(round_trip_ext4_4k_hashed_dirs)
{
	char *dest = NULL;

	if (!tools("round_trip_ext4_4k_hashed_dirs"))
		return;
	ASSERT_INT_EQ(round_trip("ext4", "-t ext4 -b 4096", true, &dest), 0);
	ASSERT_INT_EQ(links_and_holes(dest), 0);
	free(dest);
}

TEST(round_trip_ext4_inline_data)
{
	char *dest = NULL, *img, *out;

	if (!tools("round_trip_ext4_inline_data"))
		return;
	ASSERT_INT_EQ(round_trip("inline", "-t ext4 -O inline_data", false, &dest), 0);
	ASSERT_INT_EQ(links_and_holes(dest), 0);
	/* the three kinds of inline data were there to read */
	img = ib_xasprintf("%s/inline/img", root);
	out = debugfs(img, "stat /upper/file");
	ASSERT_STR_CONTAINS(out, "Size of inline data");
	free(out);
	out = debugfs(img, "stat /upper/inline100");
	ASSERT_STR_CONTAINS(out, "Size of inline data");
	free(out);
	out = debugfs(img, "stat /upper/midlink");
	ASSERT_STR_CONTAINS(out, "Flags: 0x10000000");
	free(out);
	out = debugfs(img, "stat /upper/deep");
	ASSERT_STR_CONTAINS(out, "Size of inline data");
	free(out);
	free(img);
	free(dest);
}

TEST(round_trip_ext3_block_maps)
{
	char *dest = NULL, *img, *out;

	if (!tools("round_trip_ext3_block_maps"))
		return;
	ASSERT_INT_EQ(round_trip("ext3", "-t ext3", false, &dest), 0);
	ASSERT_INT_EQ(links_and_holes(dest), 0);
	img = ib_xasprintf("%s/ext3/img", root);
	out = debugfs(img, "stat /upper/big.bin");
	ASSERT_TRUE(!strstr(out, "EXTENTS"));
	free(out);
	free(img);
	free(dest);
}

/* An uninitialised extent reads as zeros even when its blocks hold old data; the size is kept past the data. */
TEST(uninit_extents_are_zeros)
{
	char *dir, *src, *img, *dest, *out, *line, *p;
	unsigned long long l0, l1, p0, p1;
	unsigned char *buf;
	size_t len = 0;
	int fd, found = 0;

	if (!tools("uninit_extents_are_zeros"))
		return;
	dir = scratch("uninit");
	src = ib_xasprintf("%s/src", dir);
	put_dir(dir, "src", 0755);
	put_dir(src, "upper", 0755);
	put_big(src, "upper/pre", 8192);
	img = make_image(dir, "img", src, "-t ext4 -b 1024");
	ASSERT_TRUE(img != NULL);
	ASSERT_TRUE(debugfs_w(img, "fallocate /upper/pre 20 39"));
	ASSERT_TRUE(debugfs_w(img, "sif /upper/pre size 65536"));
	out = debugfs(img, "ex /upper/pre");
	for (line = out; line && *line; line = p ? p + 1 : NULL) {
		p = strchr(line, '\n');
		if (strstr(line, "Uninit") &&
		    sscanf(line, " %*d/ %*d %*d/ %*d %llu - %llu %llu - %llu", &l0, &l1, &p0, &p1) == 4)
			found = 1;
		if (!p)
			break;
	}
	ASSERT_TRUE(found);
	free(out);
	/* old data in the preallocated blocks */
	fd = open(img, O_WRONLY | O_CLOEXEC);
	ASSERT_TRUE(fd >= 0);
	buf = ib_xmalloc((p1 - p0 + 1) * 1024);
	memset(buf, 0xaa, (p1 - p0 + 1) * 1024);
	ASSERT_INT_EQ(pwrite(fd, buf, (p1 - p0 + 1) * 1024, (off_t)(p0 * 1024)), (long long)((p1 - p0 + 1) * 1024));
	close(fd);
	free(buf);
	dest = ib_xasprintf("%s/dest", dir);
	ASSERT_INT_EQ(mkdir(dest, 0700), 0);
	ASSERT_INT_EQ(ib_ext4_extract(img, "/upper", dest, NULL), 0);
	p = ib_xasprintf("%s/pre", dest);
	ASSERT_INT_EQ(ib_read_file((char **)&buf, &len, p, 1 << 20), 0);
	ASSERT_INT_EQ(len, 65536);
	for (size_t i = 0; i < len; i++)
		if (buf[i] != (i < 8192 ? big_byte(i) : 0))
			IB_FAIL_("byte %zu of pre is 0x%02x", i, buf[i]);
	free(buf);
	free(p);
	free(dest);
	free(img);
	free(src);
	free(dir);
}

/* ---- limits and stops ------------------------------------------------- */

/* A new empty dest under dir (dir/destN); the name lives until the next call. */
static const char *fresh(const char *dir, int *n)
{
	static char d[512];

	snprintf(d, sizeof(d), "%s/dest%d", dir, (*n)++);
	if (mkdir(d, 0700) < 0)
		die(d);
	return d;
}

TEST(limits_deadline_cancel_and_bad_arguments)
{
	ib_ext4_extract_opts o = { 0 };
	volatile int cancel = 1;
	char *dir, *img, *junk;
	const char *d;
	int n = 0;

	if (!tools("limits_deadline_cancel_and_bad_arguments"))
		return;
	the_tree();
	dir = scratch("limits");
	img = make_image(dir, "img", tree_dir, "-t ext4");
	ASSERT_TRUE(img != NULL);

	o.max_bytes = 100000; /* big.bin alone is 300000 */
	ASSERT_INT_EQ(ib_ext4_extract(img, "/upper", fresh(dir, &n), &o), IB_ERROR);
	ASSERT_STR_CONTAINS(ib_error_last(), "the step wrote more than");
	ASSERT_STR_CONTAINS(ib_error_last(), "(--disk)");
	o.max_bytes = 64 << 20;
	ASSERT_INT_EQ(ib_ext4_extract(img, "/upper", fresh(dir, &n), &o), 0);

	o = (ib_ext4_extract_opts){ .deadline = 1.0 };
	ASSERT_INT_EQ(ib_ext4_extract(img, "/upper", fresh(dir, &n), &o), IB_ETIMEOUT);
	ASSERT_STR_CONTAINS(ib_error_last(), "timed out");
	o = (ib_ext4_extract_opts){ .cancel = &cancel };
	ASSERT_INT_EQ(ib_ext4_extract(img, "/upper", fresh(dir, &n), &o), IB_ECANCELED);
	o = (ib_ext4_extract_opts){ .deadline = ib_now() + 600 };
	cancel = 0;
	o.cancel = &cancel;
	ASSERT_INT_EQ(ib_ext4_extract(img, "/upper", fresh(dir, &n), &o), 0);

	ASSERT_INT_EQ(ib_ext4_extract(img, "/nowhere", fresh(dir, &n), NULL), IB_ENOTFOUND);
	ASSERT_STR_CONTAINS(ib_error_last(), "'/nowhere' is not in");
	ASSERT_INT_EQ(ib_ext4_extract(img, "/upper/file", fresh(dir, &n), NULL), IB_ERROR);
	ASSERT_STR_CONTAINS(ib_error_last(), "is not a directory");
	ASSERT_INT_EQ(ib_ext4_extract(img, "/upper/sl", fresh(dir, &n), NULL), IB_ERROR);
	ASSERT_STR_CONTAINS(ib_error_last(), "is not a directory");
	ASSERT_INT_EQ(ib_ext4_extract(img, "upper", fresh(dir, &n), NULL), IB_ERROR);
	junk = ib_xasprintf("%s/junk", dir);
	put_file(dir, "junk", "not a file system", 17);
	ASSERT_INT_EQ(ib_ext4_extract(junk, "/upper", fresh(dir, &n), NULL), IB_ERROR);
	ASSERT_STR_CONTAINS(ib_error_last(), "ext4 superblock");
	/* the whole image: lost+found is left out */
	d = fresh(dir, &n);
	ASSERT_INT_EQ(ib_ext4_extract(img, "/", d, NULL), 0);
	{
		char *lf = ib_xasprintf("%s/lost+found", d), *up = ib_xasprintf("%s/upper/many", d);

		ASSERT_TRUE(access(lf, F_OK) < 0 && access(up, F_OK) == 0);
		free(lf);
		free(up);
	}
	free(junk);
	free(img);
	free(dir);
}

/* ---- hostile images --------------------------------------------------- */

/* dest and what lies beside it: a file and a directory that must not change. */
struct beside {
	char *out, *dest, *sentinel, *victim;
};

static void beside_make(struct beside *b, const char *dir)
{
	b->out = ib_xasprintf("%s/out", dir);
	b->dest = ib_xasprintf("%s/dest", b->out);
	b->sentinel = ib_xasprintf("%s/sentinel", b->out);
	b->victim = ib_xasprintf("%s/victim", b->out);
	if (mkdir(b->out, 0755) < 0 || mkdir(b->dest, 0700) < 0 || mkdir(b->victim, 0755) < 0)
		die(b->out);
	put_file(b->out, "sentinel", "keep\n", 5);
}

/* Nothing but dest changed beside it. */
static bool beside_untouched(const struct beside *b)
{
	struct snap s = { 0 };
	char *c = NULL;
	size_t len = 0;
	bool ok;

	snap_add(&s, b->out, "");
	/* out, dest (and what it holds), sentinel, victim (empty) */
	ok = ib_read_file(&c, &len, b->sentinel, 64) == 0 && len == 5 && !memcmp(c, "keep\n", 5);
	for (size_t i = 0; i < s.n; i++)
		if (*s.rel[i] && strcmp(s.rel[i], "sentinel") && strcmp(s.rel[i], "victim") &&
		    strncmp(s.rel[i], "dest", 4)) {
			fprintf(stderr, "  '%s' appeared beside dest\n", s.rel[i]);
			ok = false;
		}
	for (size_t i = 0; i < s.n; i++)
		if (!strncmp(s.rel[i], "victim/", 7)) {
			fprintf(stderr, "  '%s' appeared in the victim dir\n", s.rel[i]);
			ok = false;
		}
	free(c);
	snap_free(&s);
	return ok;
}

static void beside_free(struct beside *b)
{
	free(b->out);
	free(b->dest);
	free(b->sentinel);
	free(b->victim);
}

/*
 * Patch the one directory entry named find in img: its name to repl (same
 * length or shorter, name_len then set to new_len), its inode to ino
 * (0: kept).  Images for this have no metadata_csum, so that the patched
 * block still reads; -1 when find is not there exactly once.
 */
static int patch_entry(const char *img, const char *find, const char *repl, size_t new_len, uint32_t ino)
{
	char *data = NULL, *hit, *again;
	size_t len = 0, flen = strlen(find);
	unsigned char *de;
	int fd, r = -1;

	if (ib_read_file(&data, &len, img, 128 << 20) < 0)
		return -1;
	hit = memmem(data, len, find, flen);
	again = hit ? memmem(hit + 1, len - (size_t)(hit + 1 - data), find, flen) : NULL;
	if (!hit || again || hit - data < 8 || (unsigned char)hit[-2] != flen) {
		fprintf(stderr, "patch_entry: '%s' found %s\n", find, !hit ? "nowhere" : "twice or not in a dirent");
		goto out;
	}
	memcpy(hit, repl, new_len);
	de = (unsigned char *)hit - 8;
	de[6] = (unsigned char)new_len;
	if (ino) {
		de[0] = (unsigned char)ino;
		de[1] = (unsigned char)(ino >> 8);
		de[2] = (unsigned char)(ino >> 16);
		de[3] = (unsigned char)(ino >> 24);
	}
	fd = open(img, O_WRONLY | O_CLOEXEC);
	if (fd >= 0 && pwrite(fd, de, 8 + flen, hit - 8 - data) == (ssize_t)(8 + flen))
		r = 0;
	if (fd >= 0)
		close(fd);
out:
	free(data);
	return r;
}

/*
 * A small hostile image: upper/ holds keep1, a directory sub/ with keep2,
 * and the names given (files with their own name as content); made with
 * extra mke2fs options.  NULL on failure.
 */
static char *small_image(const char *dir, const char *opts, const char *const *names)
{
	char *src = ib_xasprintf("%s/src", dir), *img;

	put_dir(dir, "src", 0755);
	put_dir(src, "upper", 0755);
	put_file(src, "upper/keep1", "k1", 2);
	put_dir(src, "upper/sub", 0755);
	put_file(src, "upper/sub/keep2", "k2", 2);
	for (size_t i = 0; names && names[i]; i++) {
		char *rel = ib_xasprintf("upper/%s", names[i]);

		put_file(src, rel, "x", 1);
		free(rel);
	}
	img = make_image(dir, "img", src, opts);
	free(src);
	return img;
}

/* ib_ext4_extract of img's /upper fails with a message holding what, and nothing beside dest changes. */
static int refused(const char *dir, const char *img, const char *what)
{
	struct beside b;
	int r, bad = 0;

	beside_make(&b, dir);
	r = ib_ext4_extract(img, "/upper", b.dest, NULL);
	if (r >= 0 || !strstr(ib_error_last(), what)) {
		fprintf(stderr, "  %s: ib_ext4_extract: %d '%s', want an error with '%s'\n", dir, r, ib_error_last(),
			what);
		bad++;
	}
	if (!beside_untouched(&b))
		bad++;
	beside_free(&b);
	return bad;
}

/* Patch a u32 of the superblock (little endian, as x86 and arm64 hosts are). */
static void patch_super(const char *img, size_t off, uint32_t v)
{
	int fd = open(img, O_WRONLY | O_CLOEXEC);

	if (fd < 0 || pwrite(fd, &v, sizeof(v), (off_t)(1024 + off)) != (ssize_t)sizeof(v))
		die("patch the superblock");
	close(fd);
}

/*
 * A superblock whose geometry does not fit the file, or whose group
 * descriptor table would be huge (ext2fs_open allocates and reads it
 * whole): refused before libext2fs reads a byte.
 */
TEST(crafted_geometry_refused)
{
	char *dir, *img;
	int n = 0, fd;

	if (!tools("crafted_geometry_refused"))
		return;
	the_tree();
	dir = scratch("geometry");
	img = make_image(dir, "big", tree_dir, "-t ext4 -b 4096");
	ASSERT_TRUE(img != NULL);
	patch_super(img, offsetof(struct ext2_super_block, s_blocks_count), 0x7fffffff);
	ASSERT_INT_EQ(ib_ext4_extract(img, "/upper", fresh(dir, &n), NULL), IB_ERROR);
	ASSERT_STR_CONTAINS(ib_error_last(), "more than the file holds");
	free(img);

	img = make_image(dir, "groups", tree_dir, "-t ext4 -b 4096");
	ASSERT_TRUE(img != NULL);
	fd = open(img, O_WRONLY | O_CLOEXEC);
	ASSERT_TRUE(fd >= 0 && ftruncate(fd, (off_t)64 << 30) == 0);
	close(fd);
	patch_super(img, offsetof(struct ext2_super_block, s_blocks_count), 1u << 24);
	patch_super(img, offsetof(struct ext2_super_block, s_blocks_per_group), 8);
	ASSERT_INT_EQ(ib_ext4_extract(img, "/upper", fresh(dir, &n), NULL), IB_ERROR);
	ASSERT_STR_CONTAINS(ib_error_last(), "block groups");
	free(img);
	free(dir);
}

TEST(directory_loops_refused)
{
	char *dir, *img;

	if (!tools("directory_loops_refused"))
		return;
	/* a directory linked into itself */
	dir = scratch("loop-self");
	img = small_image(dir, "-t ext4", NULL);
	ASSERT_TRUE(img && debugfs_w(img, "link /upper/sub /upper/sub/loop"));
	ASSERT_INT_EQ(refused(dir, img, "a loop or a hard-linked directory"), 0);
	free(img);
	free(dir);
	/* into its parent's sibling: a hard-linked directory */
	dir = scratch("loop-sibling");
	img = small_image(dir, "-t ext4", NULL);
	ASSERT_TRUE(img && debugfs_w(img, "mkdir /upper/other") &&
		    debugfs_w(img, "link /upper/sub /upper/other/again"));
	ASSERT_INT_EQ(refused(dir, img, "a loop or a hard-linked directory"), 0);
	free(img);
	free(dir);
	/* the image root below src */
	dir = scratch("loop-root");
	img = small_image(dir, "-t ext4", NULL);
	ASSERT_TRUE(img && debugfs_w(img, "link / /upper/sub/up"));
	ASSERT_INT_EQ(refused(dir, img, "reserved for the file system"), 0);
	free(img);
	free(dir);
}

/* debugfs ln adds a name without counting it: an inode of one link under two names. */
TEST(one_link_two_names_refused)
{
	char *dir, *img;

	if (!tools("one_link_two_names_refused"))
		return;
	dir = scratch("twonames");
	img = small_image(dir, "-t ext4", NULL);
	ASSERT_TRUE(img && debugfs_w(img, "ln /upper/keep1 /upper/sub/keep1-again"));
	ASSERT_INT_EQ(refused(dir, img, "which has one link"), 0);
	free(img);
	free(dir);
}

TEST(bad_names_refused)
{
	static const struct {
		const char *dir, *find, *repl;
		size_t len;
		const char *what;
	} cases[] = {
		{ "name-slash", "slashXname", "slash/name", 10, "it contains '/'" },
		{ "name-nul", "nulXname", "nul\0name", 8, "it contains a NUL byte" },
		{ "name-dotdot", "dotdotname", "..", 2, "a second entry of that name" },
		{ "name-dot", "dotname", ".", 1, "a second entry of that name" },
		{ "name-empty", "emptyname", "", 0, "it is empty" },
	};

	if (!tools("bad_names_refused"))
		return;
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		const char *names[] = { cases[i].find, NULL };
		char *dir = scratch(cases[i].dir), *img = small_image(dir, "-t ext4 -O ^metadata_csum", names);

		ASSERT_TRUE(img != NULL);
		ASSERT_INT_EQ(patch_entry(img, cases[i].find, cases[i].repl, cases[i].len, 0), 0);
		ASSERT_INT_EQ(refused(dir, img, cases[i].what), 0);
		free(img);
		free(dir);
	}
}

/* A name twice in a directory; and twice where the first is a symlink out of dest: nothing made through it. */
TEST(duplicate_names_refused)
{
	const char *names[] = { "dupA_name1", "dupB_name1", NULL };
	char *dir, *img, *src, *target;

	if (!tools("duplicate_names_refused"))
		return;
	dir = scratch("dup");
	img = small_image(dir, "-t ext4 -O ^metadata_csum", names);
	ASSERT_TRUE(img != NULL);
	ASSERT_INT_EQ(patch_entry(img, "dupB_name1", "dupA_name1", 10, 0), 0);
	ASSERT_INT_EQ(refused(dir, img, "a name its directory holds twice"), 0);
	free(img);
	free(dir);

	/* escA_link -> the victim dir beside dest; escB_link/ holds pwned; escB becomes escA */
	dir = scratch("dup-escape");
	src = ib_xasprintf("%s/src", dir);
	put_dir(dir, "src", 0755);
	put_dir(src, "upper", 0755);
	target = ib_xasprintf("%s/out/victim", dir);
	put_symlink(src, "upper/escA_link", target);
	put_dir(src, "upper/escB_link", 0755);
	put_file(src, "upper/escB_link/pwned", "x", 1);
	img = make_image(dir, "img", src, "-t ext4 -O ^metadata_csum");
	ASSERT_TRUE(img != NULL);
	ASSERT_INT_EQ(patch_entry(img, "escB_link", "escA_link", 9, 0), 0);
	ASSERT_INT_EQ(refused(dir, img, "a name its directory holds twice"), 0);
	free(target);
	free(src);
	free(img);
	free(dir);
}

TEST(bad_inode_numbers_refused)
{
	const char *names[] = { "farinode01", "journal001", NULL };
	char *dir, *img;

	if (!tools("bad_inode_numbers_refused"))
		return;
	dir = scratch("ino-range");
	img = small_image(dir, "-t ext4 -O ^metadata_csum", names);
	ASSERT_TRUE(img != NULL);
	ASSERT_INT_EQ(patch_entry(img, "farinode01", "farinode01", 10, 0x7fffffff), 0);
	ASSERT_INT_EQ(refused(dir, img, "out of range"), 0);
	free(img);
	free(dir);
	dir = scratch("ino-reserved");
	img = small_image(dir, "-t ext4 -O ^metadata_csum", names);
	ASSERT_TRUE(img != NULL);
	ASSERT_INT_EQ(patch_entry(img, "journal001", "journal001", 10, 8), 0);
	ASSERT_INT_EQ(refused(dir, img, "reserved for the file system"), 0);
	free(img);
	free(dir);
}

/* More directories nested than IB_TREE_DEPTH_MAX: refused, naming the limit. */
TEST(depth_limit)
{
	char *dir, *src, *img;
	ib_buf rel = IB_BUF_INIT;

	if (!tools("depth_limit"))
		return;
	dir = scratch("deep");
	src = ib_xasprintf("%s/src", dir);
	put_dir(dir, "src", 0755);
	ib_buf_puts(&rel, "upper");
	put_dir(src, rel.ptr, 0755);
	for (int i = 0; i < IB_TREE_DEPTH_MAX + 5; i++) {
		ib_buf_puts(&rel, "/d");
		put_dir(src, rel.ptr, 0755);
	}
	img = make_image(dir, "img", src, "-t ext4");
	ASSERT_TRUE(img != NULL);
	ASSERT_INT_EQ(refused(dir, img, "deeper than 256 directories (IB_TREE_DEPTH_MAX)"), 0);
	ib_buf_free(&rel);
	free(img);
	free(src);
	free(dir);
}

RUN_TESTS()

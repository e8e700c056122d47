/*
 * Exporting a layer stack: the merged view (layerfs), the ext4 writer
 * checked with the real e2fsck and debugfs, and the tar writer read back
 * with libarchive.  Needs root (device nodes, owners, trusted.* xattrs).
 *
 * The fixture is three layers, bottom first:
 *
 *   0: etc/hostname "base", hidden.txt, opq/{old1,old2}, repl/inner,
 *      merged/{a,b}, big.bin (3 MiB + 123), sparse.bin (holes),
 *      frag.bin (12 data runs: an extent tree), hl1 = hl2 (hard link),
 *      sl -> etc/hostname, longlink -> 200 bytes, fifo, null (c 1:3),
 *      sda1 (b 8:1), bigdev (c 300:70000), sock, caps (security.capability,
 *      user.test), bigxattr (2000-byte user.big), acl (POSIX ACL), owned
 *      (1234:5678), highuid (70000:70001), suid (04755), sticky/ (01777),
 *      old (mtime before the epoch), deep/d0/.../d39/leaf, many/ (2000
 *      files), htree2/ (12000 long names: two-level htree, all one inode)
 *   1: etc/hostname "layer1", hidden.txt whiteout, opq/ opaque with new,
 *      repl a file, merged/{b "upper b",c}
 *   2: merged/d, merged/a whiteout, etc/extra
 */
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdbool.h>
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

#include <archive.h>
#include <archive_entry.h>

#include "lib/error.h"
#include "layer/writer.h"
#include "layer/layerfs.h"
#include "layer/overlay.h"
#include "lib/util.h"
#include "tests/unit/test.h"

#define IMAGE_ID "0123456789abcdef0123456789abcdeffedcba9876543210fedcba9876543210"
#define EPOCH 1600000000	/* 0x5f5e1000 */
#define OLD_MTIME 1500000000	/* 0x59682f00 */
#define BIG_SIZE (3 * 1024 * 1024 + 123)
#define SPARSE_SIZE (64 * 1024 * 1024)
#define DEEP 40
#define MANY 2000
#define HTREE2 12000

static char *root;		/* the temporary directory */
static char *layer[3];
static const ib_export_opts opts = { .image_id = IMAGE_ID, .epoch = EPOCH };

/* ---- fixture helpers --------------------------------------------------- */

static void die(const char *what)
{
	fprintf(stderr, "test-export: fixture: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void put_file(const char *dir, const char *name, const char *content)
{
	char *p = ib_xasprintf("%s/%s", dir, name);
	int fd = open(p, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);

	if (fd < 0 || ib_write_all(fd, content, strlen(content)) < 0 || close(fd) < 0)
		die(p);
	free(p);
}

static void put_dir(const char *dir, const char *name, mode_t mode)
{
	char *p = ib_xasprintf("%s/%s", dir, name);

	if (mkdir(p, mode) < 0 || chmod(p, mode) < 0)
		die(p);
	free(p);
}

static void put_node(const char *dir, const char *name, mode_t mode, dev_t dev)
{
	char *p = ib_xasprintf("%s/%s", dir, name);

	if (mknod(p, mode, dev) < 0)
		die(p);
	/* mknod's mode went through the umask; whiteouts keep theirs. */
	if ((!S_ISCHR(mode) || dev) && chmod(p, mode & 07777) < 0)
		die(p);
	free(p);
}

static void put_xattr(const char *dir, const char *name, const char *key, const void *v, size_t n)
{
	char *p = ib_xasprintf("%s/%s", dir, name);

	if (lsetxattr(p, key, v, n, 0) < 0)
		die(p);
	free(p);
}

/* Bytes of big.bin: a pattern that no misplaced block can reproduce. */
static unsigned char big_byte(size_t i)
{
	return (unsigned char)((i * 131 + i / 4096) & 0xff);
}

static void put_big(const char *dir)
{
	char *p = ib_xasprintf("%s/big.bin", dir);
	unsigned char *buf = ib_xmalloc(BIG_SIZE);
	int fd = open(p, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);

	for (size_t i = 0; i < BIG_SIZE; i++)
		buf[i] = big_byte(i);
	if (fd < 0 || ib_write_all(fd, buf, BIG_SIZE) < 0 || close(fd) < 0)
		die(p);
	free(buf);
	free(p);
}

static void put_at(int fd, const char *s, off_t off)
{
	if (pwrite(fd, s, strlen(s), off) != (ssize_t)strlen(s))
		die("pwrite");
}

static void put_sparse(const char *dir)
{
	char *p = ib_xasprintf("%s/sparse.bin", dir);
	int fd = open(p, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);

	if (fd < 0)
		die(p);
	put_at(fd, "head", 0);
	put_at(fd, "middle", 10 * 1024 * 1024 + 5);
	if (ftruncate(fd, SPARSE_SIZE) < 0)
		die(p);
	put_at(fd, "tail", SPARSE_SIZE - 4);
	close(fd);
	free(p);

	/* Twelve separate data runs: more extents than fit in an inode. */
	p = ib_xasprintf("%s/frag.bin", dir);
	fd = open(p, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		die(p);
	for (int i = 0; i < 12; i++) {
		char s[32];

		snprintf(s, sizeof(s), "run %d", i);
		put_at(fd, s, (off_t)i * 1024 * 1024);
	}
	close(fd);
	free(p);
}

static void put_socket(const char *dir, const char *name)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	char *p = ib_xasprintf("%s/%s", dir, name);
	int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (strlen(p) >= sizeof(sa.sun_path))
		die("socket path too long");
	memcpy(sa.sun_path, p, strlen(p) + 1);
	if (s < 0 || bind(s, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		die(p);
	close(s);
	free(p);
}

/* A VFS POSIX ACL: user::rw- user:1000:r-- group::r-- mask::r-- other::r-- */
static void put_acl(const char *dir, const char *name)
{
	uint32_t acl[1 + 5 * 2];
	static const uint16_t tags[5] = { 0x01, 0x02, 0x04, 0x10, 0x20 };
	static const uint16_t perms[5] = { 6, 4, 4, 4, 4 };
	static const uint32_t ids[5] = { 0xffffffff, 1000, 0xffffffff, 0xffffffff, 0xffffffff };

	acl[0] = 2;	/* POSIX_ACL_XATTR_VERSION */
	for (int i = 0; i < 5; i++) {
		acl[1 + 2 * i] = (uint32_t)tags[i] | (uint32_t)perms[i] << 16;
		acl[2 + 2 * i] = ids[i];
	}
	put_xattr(dir, name, "system.posix_acl_access", acl, sizeof(acl));
}

static void cleanup(void)
{
	if (root)
		ib_rm_rf(root);
}

static void build_fixture(void)
{
	static const unsigned char cap[20] = { 0x00, 0x00, 0x00, 0x02, 0x00, 0x20, 0x00, 0x00 };
	char tmpl[] = "/tmp/test-export.XXXXXX";
	char name[300], *p, *q;
	struct timespec ts[2];

	if (!mkdtemp(tmpl))
		die("mkdtemp");
	root = ib_xstrdup(tmpl);
	atexit(cleanup);
	for (int i = 0; i < 3; i++) {
		layer[i] = ib_xasprintf("%s/l%d", root, i);
		put_dir(root, layer[i] + strlen(root) + 1, 0755);
	}

	/* Layer 0 */
	put_dir(layer[0], "etc", 0755);
	put_file(layer[0], "etc/hostname", "base\n");
	put_file(layer[0], "hidden.txt", "you should not see me\n");
	put_dir(layer[0], "opq", 0755);
	put_file(layer[0], "opq/old1", "old1\n");
	put_file(layer[0], "opq/old2", "old2\n");
	put_dir(layer[0], "repl", 0755);
	put_file(layer[0], "repl/inner", "inner\n");
	put_dir(layer[0], "merged", 0755);
	put_file(layer[0], "merged/a", "lower a\n");
	put_file(layer[0], "merged/b", "lower b\n");
	put_big(layer[0]);
	put_sparse(layer[0]);
	put_file(layer[0], "hl1", "hard link\n");
	p = ib_xasprintf("%s/hl1", layer[0]);
	q = ib_xasprintf("%s/hl2", layer[0]);
	if (link(p, q) < 0)
		die(q);
	free(p);
	free(q);
	p = ib_xasprintf("%s/sl", layer[0]);
	if (symlink("etc/hostname", p) < 0)
		die(p);
	free(p);
	memset(name, 'x', 200);
	name[200] = '\0';
	memcpy(name, "/long/", 6);
	p = ib_xasprintf("%s/longlink", layer[0]);
	if (symlink(name, p) < 0)
		die(p);
	free(p);
	put_node(layer[0], "fifo", S_IFIFO | 0640, 0);
	put_node(layer[0], "null", S_IFCHR | 0666, makedev(1, 3));
	put_node(layer[0], "sda1", S_IFBLK | 0660, makedev(8, 1));
	put_node(layer[0], "bigdev", S_IFCHR | 0600, makedev(300, 70000));
	put_socket(layer[0], "sock");
	put_file(layer[0], "caps", "ping\n");
	put_xattr(layer[0], "caps", "security.capability", cap, sizeof(cap));
	put_xattr(layer[0], "caps", "user.test", "hello", 5);
	put_file(layer[0], "bigxattr", "x\n");
	{
		char v[2000];

		memset(v, 'v', sizeof(v));
		put_xattr(layer[0], "bigxattr", "user.big", v, sizeof(v));
	}
	put_file(layer[0], "acl", "acl\n");
	put_acl(layer[0], "acl");
	put_file(layer[0], "owned", "owned\n");
	p = ib_xasprintf("%s/owned", layer[0]);
	if (chown(p, 1234, 5678) < 0)
		die(p);
	free(p);
	put_file(layer[0], "highuid", "high\n");
	p = ib_xasprintf("%s/highuid", layer[0]);
	if (chown(p, 70000, 70001) < 0)
		die(p);
	free(p);
	put_file(layer[0], "suid", "suid\n");
	p = ib_xasprintf("%s/suid", layer[0]);
	if (chmod(p, 04755) < 0)
		die(p);
	free(p);
	put_dir(layer[0], "sticky", 01777);
	put_file(layer[0], "old", "old\n");
	p = ib_xasprintf("%s/old", layer[0]);
	ts[0].tv_sec = ts[1].tv_sec = OLD_MTIME;
	ts[0].tv_nsec = ts[1].tv_nsec = 0;
	if (utimensat(AT_FDCWD, p, ts, AT_SYMLINK_NOFOLLOW) < 0)
		die(p);
	free(p);
	p = ib_xasprintf("%s/deep", layer[0]);
	if (mkdir(p, 0755) < 0)
		die(p);
	for (int i = 0; i < DEEP; i++) {
		q = ib_xasprintf("%s/d%d", p, i);
		if (mkdir(q, 0755) < 0)
			die(q);
		free(p);
		p = q;
	}
	put_file(p, "leaf", "bottom\n");
	free(p);
	put_dir(layer[0], "many", 0755);
	for (int i = 0; i < MANY; i++) {
		snprintf(name, sizeof(name), "many/file-%04d", i);
		put_file(layer[0], name, "");
	}
	put_dir(layer[0], "htree2", 0755);
	put_file(layer[0], "htree2/target", "shared\n");
	p = ib_xasprintf("%s/htree2/target", layer[0]);
	for (int i = 0; i < HTREE2; i++) {
		memset(name, 'n', 240);
		snprintf(name + 240, sizeof(name) - 240, "%05d", i);
		q = ib_xasprintf("%s/htree2/%s", layer[0], name);
		if (link(p, q) < 0)
			die(q);
		free(q);
	}
	free(p);

	/* Layer 1 */
	put_dir(layer[1], "etc", 0755);
	put_file(layer[1], "etc/hostname", "layer1\n");
	put_node(layer[1], "hidden.txt", S_IFCHR | 0, makedev(0, 0));
	put_dir(layer[1], "opq", 0755);
	put_xattr(layer[1], "opq", "trusted.overlay.opaque", "y", 1);
	put_file(layer[1], "opq/new", "new\n");
	put_file(layer[1], "repl", "now a file\n");
	put_dir(layer[1], "merged", 0755);
	put_file(layer[1], "merged/b", "upper b\n");
	put_file(layer[1], "merged/c", "c\n");

	/* Layer 2 */
	put_dir(layer[2], "merged", 0755);
	put_file(layer[2], "merged/d", "d\n");
	put_node(layer[2], "merged/a", S_IFCHR | 0, makedev(0, 0));
	put_dir(layer[2], "etc", 0755);
	put_file(layer[2], "etc/extra", "extra\n");
}

static void fixture(void)
{
	if (!root)
		build_fixture();
}

/* ---- command helpers ------------------------------------------------- */

/* Run a shell command; its stdout and stderr, *status its exit code. */
static char *run(int *status, const char *fmt, ...) IB_PRINTF(2, 3);

static char *run(int *status, const char *fmt, ...)
{
	ib_buf out = IB_BUF_INIT;
	char chunk[4096], *cmd;
	va_list ap;
	FILE *f;
	size_t n;
	int st;

	va_start(ap, fmt);
	if (vasprintf(&cmd, fmt, ap) < 0)
		abort();
	va_end(ap);
	f = popen(cmd, "r");
	free(cmd);
	if (!f)
		abort();
	while ((n = fread(chunk, 1, sizeof(chunk), f)) > 0)
		ib_buf_add(&out, chunk, n);
	st = pclose(f);
	*status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
	return ib_buf_detach(&out);
}

static char *debugfs(const char *img, const char *req)
{
	int st;

	return run(&st, "debugfs -R '%s' %s 2>&1", req, img);
}

static char *image_path(const char *name)
{
	fixture();
	return ib_xasprintf("%s/%s", root, name);
}

static const char *const *layers(void)
{
	return (const char *const *)layer;
}

/* ---- layerfs --------------------------------------------------------- */

struct seen {
	ib_buf list;		/* "path type layer\n" per entry */
	char *hl1_path;
	uint64_t hl1_id;
	uint64_t hl2_id;
	const char *hl2_first;
	bool hl2_first_ok;
	bool overlay_xattr;
	bool sorted;
	bool caps_xattrs_ok;
	char last[IB_LAYERFS_DEPTH_MAX + 1][256];	/* last name seen at each depth */
};

static int seen_enter(void *ctx, ib_layerfs_entry *e)
{
	struct seen *s = ctx;

	ib_buf_printf(&s->list, "%s %o %zu\n", e->path, (unsigned)(e->st.st_mode & S_IFMT) >> 12,
		      e->layer);
	if (e->depth > 0 && strcmp(s->last[e->depth], e->name) >= 0)
		s->sorted = false;
	if (e->depth > 0)
		snprintf(s->last[e->depth], sizeof(s->last[0]), "%s", e->name);
	if (e->depth + 1 <= IB_LAYERFS_DEPTH_MAX && S_ISDIR(e->st.st_mode))
		s->last[e->depth + 1][0] = '\0';
	for (size_t i = 0; i < e->nxattrs; i++)
		if (!strncmp(e->xattrs[i].name, "trusted.overlay.", 16))
			s->overlay_xattr = true;
	if (!strcmp(e->path, "hl1"))
		s->hl1_id = e->link_id;
	if (!strcmp(e->path, "hl2")) {
		s->hl2_id = e->link_id;
		s->hl2_first_ok = e->link_first && !strcmp(e->link_first, "hl1");
	}
	if (!strcmp(e->path, "caps"))
		s->caps_xattrs_ok = e->nxattrs == 2 &&
				    !strcmp(e->xattrs[0].name, "security.capability") &&
				    !strcmp(e->xattrs[1].name, "user.test") &&
				    e->xattrs[1].size == 5 && !memcmp(e->xattrs[1].value, "hello", 5);
	return 0;
}

static bool listed(const struct seen *s, const char *line)
{
	char *needle = ib_xasprintf("\n%s", line);
	bool found = strstr(s->list.ptr, needle) != NULL;

	free(needle);
	return found;
}

TEST(layerfs_merge)
{
	struct seen *s = ib_xcalloc(1, sizeof(*s));
	static const ib_layerfs_ops ops = { seen_enter, NULL };
	int err;

	fixture();
	s->sorted = true;
	ib_buf_puts(&s->list, "\n");
	err = ib_layerfs_walk(layers(), 3, &ops, s);
	ASSERT_INT_EQ(err, 0);
	/* 4 = directory, 10 = regular, 12 = symlink (S_IFMT >> 12, octal) */
	ASSERT_TRUE(listed(s, " 4 2\n"));		/* the root, from the top layer */
	ASSERT_TRUE(listed(s, "etc/hostname 10 1\n"));
	ASSERT_TRUE(listed(s, "etc/extra 10 2\n"));
	ASSERT_TRUE(!strstr(s->list.ptr, "hidden.txt"));
	ASSERT_TRUE(listed(s, "opq 4 1\n"));
	ASSERT_TRUE(listed(s, "opq/new 10 1\n"));
	ASSERT_TRUE(!strstr(s->list.ptr, "opq/old"));
	ASSERT_TRUE(listed(s, "repl 10 1\n"));
	ASSERT_TRUE(!strstr(s->list.ptr, "repl/inner"));
	ASSERT_TRUE(!strstr(s->list.ptr, "merged/a"));
	ASSERT_TRUE(listed(s, "merged/b 10 1\n"));
	ASSERT_TRUE(listed(s, "merged/c 10 1\n"));
	ASSERT_TRUE(listed(s, "merged/d 10 2\n"));
	ASSERT_TRUE(listed(s, "merged 4 2\n"));
	ASSERT_TRUE(listed(s, "sl 12 0\n"));
	ASSERT_TRUE(s->sorted);
	ASSERT_TRUE(!s->overlay_xattr);
	ASSERT_TRUE(s->caps_xattrs_ok);
	ASSERT_TRUE(s->hl1_id != 0);
	ASSERT_INT_EQ(s->hl2_id, s->hl1_id);
	ASSERT_TRUE(s->hl2_first_ok);
	ib_buf_free(&s->list);
	free(s);
}

/* Path lookups on a stack follow the same rules as the walk (layer/overlay.c). */
TEST(overlay_lookup_and_list)
{
	ib_overlay_entry e = IB_OVERLAY_ENTRY_INIT;
	const char *const *l;
	ib_strv names = IB_STRV_INIT;
	char *data = NULL, *target = NULL;

	fixture();
	l = layers();
	ASSERT_INT_EQ(ib_overlay_lookup(&e, l, 3, "hidden.txt"), 0);	/* a whiteout above it */
	ASSERT_INT_EQ(ib_overlay_lookup(&e, l, 3, "opq/old1"), 0);	/* an opaque dir above it */
	ASSERT_INT_EQ(ib_overlay_lookup(&e, l, 3, "repl/inner"), 0);	/* a file in place of its dir */
	ASSERT_INT_EQ(ib_overlay_lookup(&e, l, 3, "merged/a"), 0);	/* a whiteout in the top layer */
	ASSERT_INT_EQ(ib_overlay_lookup(&e, l, 3, "nowhere/x"), 0);
	ASSERT_INT_EQ(ib_overlay_lookup(&e, l, 3, "opq/new"), 1);
	ASSERT_INT_EQ(e.layer, 1);
	ib_overlay_entry_clear(&e);
	ASSERT_INT_EQ(ib_overlay_lookup(&e, l, 3, "merged/d"), 1);
	ASSERT_INT_EQ(e.layer, 2);
	ib_overlay_entry_clear(&e);
	ASSERT_INT_EQ(ib_overlay_lookup(&e, l, 3, "merged"), 1);	/* a directory: its topmost occurrence */
	ASSERT_INT_EQ(e.layer, 2);
	ASSERT_TRUE(S_ISDIR(e.st.st_mode));
	ib_overlay_entry_clear(&e);
	ASSERT_INT_EQ(ib_overlay_lookup(&e, l, 3, "sl/x"), 0);		/* no link is followed */
	ASSERT_INT_EQ(ib_overlay_read_file(&data, NULL, l, 3, "etc/hostname", 100, "LIMIT"), 1);
	ASSERT_STR_EQ(data, "layer1\n");
	free(data);
	ASSERT_TRUE(ib_overlay_read_file(&data, NULL, l, 3, "etc/hostname", 3, "LIMIT") < 0);
	ASSERT_STR_CONTAINS(ib_error_last(), "LIMIT");
	ASSERT_INT_EQ(ib_overlay_read_file(&data, NULL, l, 3, "hidden.txt", 100, "LIMIT"), 0);
	ASSERT_INT_EQ(ib_overlay_readlink(&target, l, 3, "sl"), 1);
	ASSERT_STR_EQ(target, "etc/hostname");
	free(target);
	ASSERT_INT_EQ(ib_overlay_list(&names, l, 3, "merged"), 1);
	ASSERT_INT_EQ(names.n, 3);
	ASSERT_STR_EQ(names.v[0], "b");
	ASSERT_STR_EQ(names.v[1], "c");
	ASSERT_STR_EQ(names.v[2], "d");
	ib_strv_free(&names);
	ASSERT_INT_EQ(ib_overlay_list(&names, l, 3, "opq"), 1);
	ASSERT_INT_EQ(names.n, 1);
	ASSERT_STR_EQ(names.v[0], "new");
	ib_strv_free(&names);
	ASSERT_INT_EQ(ib_overlay_list(&names, l, 3, ""), 1);
	for (size_t i = 0; i < names.n; i++)
		ASSERT_TRUE(strcmp(names.v[i], "hidden.txt") != 0);
	ib_strv_free(&names);
	ASSERT_INT_EQ(ib_overlay_list(&names, l, 3, "repl"), 0);	/* a file now */
}

static int fail_enter(void *ctx, ib_layerfs_entry *e)
{
	(void)ctx;
	return !strcmp(e->path, "merged/c") ? IB_ETIMEOUT : 0;
}

TEST(layerfs_callback_error_stops_walk)
{
	static const ib_layerfs_ops ops = { fail_enter, NULL };

	fixture();
	ASSERT_INT_EQ(ib_layerfs_walk(layers(), 3, &ops, NULL), IB_ETIMEOUT);
}

TEST(layerfs_refuses_redirect)
{
	static const ib_layerfs_ops ops = { seen_enter, NULL };
	struct seen *s = ib_xcalloc(1, sizeof(*s));
	char *top = image_path("redirect-layer");
	const char *stack[2] = { layer[0], top };
	int err;

	ib_buf_puts(&s->list, "\n");
	put_dir(root, "redirect-layer", 0755);
	put_dir(top, "merged", 0755);
	put_xattr(top, "merged", "trusted.overlay.redirect", "/elsewhere", 10);
	err = ib_layerfs_walk(stack, 2, &ops, s);
	ib_rm_rf(top);
	free(top);
	ib_buf_free(&s->list);
	free(s);
	ASSERT_INT_EQ(err, IB_ERROR);
	ASSERT_STR_CONTAINS(ib_error_last(), "trusted.overlay.redirect");
}

/* ---- ext4 ------------------------------------------------------------- */

static char *ext4_image;	/* written once by ext4_export, read by the others */

static void export_once(int *failed)
{
	uint64_t bytes = 0;
	struct stat st;

	if (ext4_image)
		return;
	ext4_image = image_path("image.ext4");
	if (ib_ext4_write(ext4_image, layers(), 3, &opts, &bytes) != 0) {
		fprintf(stderr, "ib_ext4_write: %s\n", ib_error_last());
		*failed = 1;
		return;
	}
	if (stat(ext4_image, &st) < 0 || (uint64_t)st.st_size != bytes)
		*failed = 1;
}

TEST(ext4_export_fsck_clean)
{
	char *out;
	int st;

	export_once(ib_failed_);
	ASSERT_TRUE(!*ib_failed_);
	out = run(&st, "e2fsck -fn %s 2>&1", ext4_image);
	if (st != 0)
		fprintf(stderr, "%s", out);
	free(out);
	ASSERT_INT_EQ(st, 0);
}

TEST(ext4_export_sparse_and_sized)
{
	struct stat st;
	char *out;
	unsigned long long free_blocks = 0, block_count = 0;
	const char *p;

	export_once(ib_failed_);
	ASSERT_TRUE(!*ib_failed_);
	ASSERT_INT_EQ(stat(ext4_image, &st), 0);
	/* Mostly holes: 64 MiB of headroom alone is never written. */
	ASSERT_TRUE((uint64_t)st.st_blocks * 512 + 64 * 1024 * 1024 <= (uint64_t)st.st_size);
	out = run(&(int){ 0 }, "TZ=UTC dumpe2fs -h %s 2>/dev/null", ext4_image);
	p = strstr(out, "Free blocks:");
	if (p)
		free_blocks = strtoull(p + strlen("Free blocks:"), NULL, 10);
	p = strstr(out, "Block count:");
	if (p)
		block_count = strtoull(p + strlen("Block count:"), NULL, 10);
	ASSERT_STR_CONTAINS(out, "has_journal ext_attr dir_index filetype extent 64bit flex_bg "
				 "sparse_super large_file huge_file dir_nlink extra_isize metadata_csum");
	ASSERT_STR_CONTAINS(out, "Block size:               4096");
	ASSERT_STR_CONTAINS(out, "Inode size:	          256");
	ASSERT_STR_CONTAINS(out, "Filesystem UUID:          01234567-89ab-4def-8123-456789abcdef");
	ASSERT_STR_CONTAINS(out, "Directory Hash Seed:      fedcba98-7654-3210-fedc-ba9876543210");
	ASSERT_STR_CONTAINS(out, "Filesystem created:       Sun Sep 13 12:26:40 2020");
	ASSERT_STR_CONTAINS(out, "Last write time:          Sun Sep 13 12:26:40 2020");
	free(out);
	/* Headroom: at least the fixed 64 MiB left free, not absurdly more. */
	ASSERT_TRUE(free_blocks >= 16384);
	ASSERT_TRUE(block_count * 4096 == (uint64_t)st.st_size);
	ASSERT_TRUE(block_count < 32768);
}

/*
 * A sized image (disk_size): exactly that many bytes, one inode per 16 KiB,
 * fsck clean, and still sparse: nothing of the unused groups (inode tables,
 * bitmaps) is written.  The same bytes twice; content that does not fit is
 * refused naming disk_size and the size that would fit.
 */
TEST(ext4_export_sized)
{
	char *a = image_path("sized-a.ext4"), *b = image_path("sized-b.ext4");
	ib_export_opts o = opts;
	uint64_t bytes = 0, inodes = 0, small_alloc = 0;
	struct stat st;
	char *out;
	const char *p;
	int rc;

	export_once(ib_failed_);
	ASSERT_TRUE(!*ib_failed_);
	ASSERT_INT_EQ(stat(ext4_image, &st), 0);
	small_alloc = (uint64_t)st.st_blocks * 512;
	o.size = 4ULL << 30;
	ASSERT_INT_EQ(ib_ext4_write(a, layers(), 3, &o, &bytes), 0);
	ASSERT_TRUE(bytes == 4ULL << 30);
	ASSERT_INT_EQ(stat(a, &st), 0);
	ASSERT_TRUE((uint64_t)st.st_size == 4ULL << 30);
	/* the same content in a 4 GiB file system costs little more than in a small one */
	ASSERT_TRUE((uint64_t)st.st_blocks * 512 < small_alloc + (2u << 20));
	out = run(&rc, "e2fsck -fn %s 2>&1", a);
	if (rc)
		fprintf(stderr, "%s", out);
	free(out);
	ASSERT_INT_EQ(rc, 0);
	out = run(&rc, "dumpe2fs -h %s 2>/dev/null", a);
	if ((p = strstr(out, "Inode count:")))
		inodes = strtoull(p + strlen("Inode count:"), NULL, 10);
	free(out);
	ASSERT_TRUE(inodes >= (4ULL << 30) / 16384);
	ASSERT_INT_EQ(ib_ext4_write(b, layers(), 3, &o, NULL), 0);
	out = run(&rc, "cmp %s %s", a, b);
	free(out);
	ASSERT_INT_EQ(rc, 0);
	unlink(b);

	/* too small: refused, naming disk_size and what would fit; nothing left behind */
	o.size = 1ULL << 20;
	ASSERT_INT_EQ(ib_ext4_write(b, layers(), 3, &o, NULL), IB_EINVALID);
	ASSERT_STR_CONTAINS(ib_error_last(), "disk_size is 1048576 bytes");
	ASSERT_STR_CONTAINS(ib_error_last(), "the smallest disk_size that fits is");
	ASSERT_TRUE(access(b, F_OK) != 0);
	unlink(a);
	free(a);
	free(b);
}

TEST(ext4_export_contents)
{
	const char *img;
	char *out;

	export_once(ib_failed_);
	ASSERT_TRUE(!*ib_failed_);
	img = ext4_image;

	out = debugfs(img, "cat /etc/hostname");
	ASSERT_STR_CONTAINS(out, "layer1\n");
	free(out);
	out = debugfs(img, "cat /etc/extra");
	ASSERT_STR_CONTAINS(out, "extra\n");
	free(out);
	out = debugfs(img, "cat /merged/b");
	ASSERT_STR_CONTAINS(out, "upper b\n");
	free(out);
	out = debugfs(img, "cat /opq/new");
	ASSERT_STR_CONTAINS(out, "new\n");
	free(out);
	out = debugfs(img, "cat /repl");
	ASSERT_STR_CONTAINS(out, "now a file\n");
	free(out);
	out = debugfs(img, "cat /deep/d0/d1/d2/d3/d4/d5/d6/d7/d8/d9/d10/d11/d12/d13/d14/d15/d16/"
			   "d17/d18/d19/d20/d21/d22/d23/d24/d25/d26/d27/d28/d29/d30/d31/d32/d33/"
			   "d34/d35/d36/d37/d38/d39/leaf");
	ASSERT_STR_CONTAINS(out, "bottom\n");
	free(out);

	/* Whited out, hidden by an opaque directory, replaced by a file. */
	static const char *const gone[] = { "/hidden.txt", "/merged/a", "/opq/old1", "/opq/old2",
					    "/repl/inner" };
	for (size_t i = 0; i < sizeof(gone) / sizeof(gone[0]); i++) {
		char *req = ib_xasprintf("stat %s", gone[i]);

		out = debugfs(img, req);
		free(req);
		if (!strstr(out, "File not found") && !strstr(out, "Ext2 inode is not a directory"))
			fprintf(stderr, "%s still visible:\n%s", gone[i], out);
		ASSERT_TRUE(strstr(out, "File not found") || strstr(out, "Ext2 inode is not a directory"));
		free(out);
	}
	out = debugfs(img, "ls -l /merged");
	ASSERT_TRUE(strstr(out, " b ") || strstr(out, " b\n"));
	ASSERT_TRUE(!strstr(out, " a ") && !strstr(out, " a\n"));
	free(out);
	out = debugfs(img, "ls /");
	ASSERT_STR_CONTAINS(out, "lost+found");
	free(out);
}

TEST(ext4_export_metadata)
{
	const char *img;
	char *out, *want;

	export_once(ib_failed_);
	ASSERT_TRUE(!*ib_failed_);
	img = ext4_image;

	out = debugfs(img, "stat /owned");
	ASSERT_STR_CONTAINS(out, "User:  1234   Group:  5678");
	ASSERT_STR_CONTAINS(out, "Mode:  0644");
	/* Newer than the epoch: every time is the epoch. */
	ASSERT_STR_CONTAINS(out, " ctime: 0x5f5e1000:00000000");
	ASSERT_STR_CONTAINS(out, " atime: 0x5f5e1000:00000000");
	ASSERT_STR_CONTAINS(out, " mtime: 0x5f5e1000:00000000");
	ASSERT_STR_CONTAINS(out, "crtime: 0x5f5e1000:00000000");
	free(out);
	/* Inodes libext2fs writes itself: the journal, lost+found. */
	out = debugfs(img, "stat <8>");
	ASSERT_STR_CONTAINS(out, " mtime: 0x5f5e1000:00000000");
	ASSERT_STR_CONTAINS(out, "crtime: 0x5f5e1000:00000000");
	free(out);
	out = debugfs(img, "stat /lost+found");
	ASSERT_STR_CONTAINS(out, "Mode:  0700");
	ASSERT_STR_CONTAINS(out, " ctime: 0x5f5e1000:00000000");
	ASSERT_STR_CONTAINS(out, "Size: 16384");
	free(out);
	out = debugfs(img, "stat /highuid");
	ASSERT_STR_CONTAINS(out, "User: 70000   Group: 70001");
	free(out);
	out = debugfs(img, "stat /old");
	ASSERT_STR_CONTAINS(out, " mtime: 0x59682f00:00000000");
	ASSERT_STR_CONTAINS(out, " ctime: 0x59682f00:00000000");
	free(out);
	out = debugfs(img, "stat /suid");
	ASSERT_STR_CONTAINS(out, "Mode:  04755");
	free(out);
	out = debugfs(img, "stat /sticky");
	ASSERT_STR_CONTAINS(out, "Mode:  01777");
	free(out);
	out = debugfs(img, "stat /hl1");
	ASSERT_STR_CONTAINS(out, "Links: 2");
	free(out);
	out = debugfs(img, "stat /htree2/target");
	ASSERT_STR_CONTAINS(out, "Links: 12001");
	free(out);
	out = debugfs(img, "stat /merged");
	ASSERT_STR_CONTAINS(out, "Links: 2");
	free(out);
	out = debugfs(img, "stat /deep");
	ASSERT_STR_CONTAINS(out, "Links: 3");
	free(out);

	out = debugfs(img, "stat /sl");
	ASSERT_STR_CONTAINS(out, "Fast link dest: \"etc/hostname\"");
	free(out);
	out = debugfs(img, "stat /longlink");
	ASSERT_STR_CONTAINS(out, "Type: symlink");
	ASSERT_STR_CONTAINS(out, "Size: 200");
	free(out);
	out = debugfs(img, "cat /longlink");
	ASSERT_STR_CONTAINS(out, "/long/xxxxxxxxxxxxxxxxxxxx");
	free(out);

	out = debugfs(img, "stat /null");
	ASSERT_STR_CONTAINS(out, "Type: character special");
	ASSERT_STR_CONTAINS(out, "Device major/minor number: 01:03");
	free(out);
	out = debugfs(img, "stat /sda1");
	ASSERT_STR_CONTAINS(out, "Type: block special");
	ASSERT_STR_CONTAINS(out, "Device major/minor number: 08:01");
	free(out);
	out = debugfs(img, "stat /bigdev");
	ASSERT_STR_CONTAINS(out, "Device major/minor number: 300:70000");
	free(out);
	out = debugfs(img, "stat /fifo");
	ASSERT_STR_CONTAINS(out, "Type: FIFO");
	ASSERT_STR_CONTAINS(out, "Mode:  0640");
	free(out);
	out = debugfs(img, "stat /sock");
	ASSERT_STR_CONTAINS(out, "Type: socket");
	free(out);

	out = debugfs(img, "ea_get /caps user.test");
	ASSERT_STR_CONTAINS(out, "hello");
	free(out);
	out = debugfs(img, "ea_list /caps");
	ASSERT_STR_CONTAINS(out, "security.capability");
	free(out);
	out = debugfs(img, "ea_list /bigxattr");
	ASSERT_STR_CONTAINS(out, "user.big");
	free(out);
	out = debugfs(img, "stat /bigxattr");
	want = strstr(out, "File ACL: ");
	ASSERT_TRUE(want && strncmp(want, "File ACL: 0\n", 12) != 0);	/* in an EA block */
	free(out);
	out = debugfs(img, "ea_list /acl");
	ASSERT_STR_CONTAINS(out, "system.posix_acl_access");
	free(out);
}

TEST(ext4_export_file_data)
{
	char *dst = image_path("big.out"), *src = ib_xasprintf("%s/big.bin", layer[0]);
	char *out, *req;
	int st;

	export_once(ib_failed_);
	ASSERT_TRUE(!*ib_failed_);
	req = ib_xasprintf("dump /big.bin %s", dst);
	free(debugfs(ext4_image, req));
	free(req);
	out = run(&st, "cmp %s %s 2>&1", src, dst);
	free(out);
	unlink(dst);
	free(dst);
	free(src);
	ASSERT_INT_EQ(st, 0);

	/* The sparse file keeps its holes: 64 MiB, a few blocks. */
	out = debugfs(ext4_image, "stat /sparse.bin");
	ASSERT_STR_CONTAINS(out, "Size: 67108864");
	ASSERT_STR_CONTAINS(out, "Blockcount: 24\n");	/* 3 blocks of 4 KiB, in sectors */
	free(out);
	dst = image_path("sparse.out");
	src = ib_xasprintf("%s/sparse.bin", layer[0]);
	req = ib_xasprintf("dump /sparse.bin %s", dst);
	free(debugfs(ext4_image, req));
	free(req);
	out = run(&st, "cmp %s %s 2>&1", src, dst);
	free(out);
	unlink(dst);
	free(dst);
	free(src);
	ASSERT_INT_EQ(st, 0);

	/* Twelve runs do not fit in the inode: an extent tree. */
	out = debugfs(ext4_image, "ex /frag.bin");
	ASSERT_STR_CONTAINS(out, "Level Entries");
	ASSERT_STR_CONTAINS(out, " 1/ 1 ");
	free(out);
	dst = image_path("frag.out");
	src = ib_xasprintf("%s/frag.bin", layer[0]);
	req = ib_xasprintf("dump /frag.bin %s", dst);
	free(debugfs(ext4_image, req));
	free(req);
	out = run(&st, "cmp %s %s 2>&1", src, dst);
	free(out);
	unlink(dst);
	free(dst);
	free(src);
	ASSERT_INT_EQ(st, 0);
}

TEST(ext4_export_htree)
{
	char name[300], *out, *req;
	size_t n = 0;

	export_once(ib_failed_);
	ASSERT_TRUE(!*ib_failed_);
	out = debugfs(ext4_image, "htree /many");
	ASSERT_STR_CONTAINS(out, "Indirect levels: 0");
	free(out);
	out = debugfs(ext4_image, "stat /many");
	ASSERT_STR_CONTAINS(out, "Flags: 0x81000");	/* extents, htree */
	free(out);
	out = debugfs(ext4_image, "ls /many");
	for (const char *p = out; (p = strstr(p, "file-")); p++)
		n++;
	free(out);
	ASSERT_INT_EQ(n, MANY);
	out = debugfs(ext4_image, "htree /htree2");
	ASSERT_STR_CONTAINS(out, "Indirect levels: 1");
	free(out);
	/* A name found through lookup (namei), deep in the second level. */
	memset(name, 'n', 240);
	snprintf(name + 240, sizeof(name) - 240, "%05d", HTREE2 - 1);
	req = ib_xasprintf("stat /htree2/%s", name);
	out = debugfs(ext4_image, req);
	free(req);
	ASSERT_STR_CONTAINS(out, "Links: 12001");
	free(out);
}

static bool same_file(const char *a, const char *b)
{
	char *x = NULL, *y = NULL;
	size_t nx = 0, ny = 0;
	bool same;

	if (ib_read_file(&x, &nx, a, (size_t)1 << 30) < 0 || ib_read_file(&y, &ny, b, (size_t)1 << 30) < 0)
		same = false;
	else
		same = nx == ny && !memcmp(x, y, nx);
	free(x);
	free(y);
	return same;
}

TEST(ext4_export_deterministic)
{
	char *again = image_path("again.ext4");
	ib_export_opts other = { .image_id = "1123456789abcdef0123456789abcdeffedcba9876543210fedcba9876543210",
				 .epoch = EPOCH };
	bool same, differs;

	export_once(ib_failed_);
	ASSERT_TRUE(!*ib_failed_);
	ASSERT_INT_EQ(ib_ext4_write(again, layers(), 3, &opts, NULL), 0);
	same = same_file(ext4_image, again);
	/* A different image id must change the bytes (UUID, seeds, checksums). */
	ASSERT_INT_EQ(ib_ext4_write(again, layers(), 3, &other, NULL), 0);
	differs = !same_file(ext4_image, again);
	unlink(again);
	free(again);
	ASSERT_TRUE(same);
	ASSERT_TRUE(differs);
}

/* Epoch 0 is also "no time set" inside libext2fs 1.47.0. */
TEST(ext4_export_epoch_zero)
{
	char *a = image_path("zero-a.ext4"), *b = image_path("zero-b.ext4"), *out;
	const char *top[1] = { layer[2] };
	ib_export_opts zero = { .image_id = IMAGE_ID };
	bool same;
	int st;

	ASSERT_INT_EQ(ib_ext4_write(a, top, 1, &zero, NULL), 0);
	sleep(1);
	ASSERT_INT_EQ(ib_ext4_write(b, top, 1, &zero, NULL), 0);
	same = same_file(a, b);
	out = run(&st, "e2fsck -fn %s 2>&1 && debugfs -R 'stat <8>' %s 2>&1 && "
		       "TZ=UTC dumpe2fs -h %s 2>&1", a, a, a);
	unlink(a);
	unlink(b);
	free(a);
	free(b);
	ASSERT_TRUE(same);
	ASSERT_INT_EQ(st, 0);
	ASSERT_STR_CONTAINS(out, " mtime: 0x00000000:00000000");
	ASSERT_STR_CONTAINS(out, "Last write time:          Thu Jan  1 00:00:00 1970");
	ASSERT_STR_CONTAINS(out, "Last checked:             Thu Jan  1 00:00:00 1970");
	free(out);
}

TEST(ext4_export_rejects_bad_options)
{
	char *img = image_path("bad.ext4");
	ib_export_opts bad = { .image_id = "not-hex", .epoch = EPOCH };
	struct stat st;

	ASSERT_INT_EQ(ib_ext4_write(img, layers(), 3, &bad, NULL), IB_EINVALID);
	ASSERT_STR_CONTAINS(ib_error_last(), "image id");
	ASSERT_TRUE(stat(img, &st) < 0 && errno == ENOENT);
	free(img);
}

TEST(ext4_export_missing_layer_leaves_nothing)
{
	char *img = image_path("missing.ext4");
	const char *stack[2] = { layer[0], "/nonexistent/layer" };
	struct stat st;

	ASSERT_INT_EQ(ib_ext4_write(img, stack, 2, &opts, NULL), IB_ERROR);
	ASSERT_STR_CONTAINS(ib_error_last(), "/nonexistent/layer");
	ASSERT_TRUE(stat(img, &st) < 0 && errno == ENOENT);
	free(img);
}

/* ---- tar -------------------------------------------------------------- */

struct tar_seen {
	ib_buf names;
	bool numeric_only;
	bool times_clamped;
	bool hardlink_ok;
	bool xattr_ok;
	bool sparse_ok;
	bool hostname_ok;
	bool sorted;
	long entries;
};

static void read_tar(struct tar_seen *t, const char *path, int *failed)
{
	struct archive *a = archive_read_new();
	struct archive_entry *e;
	char prev[512] = "";

	t->numeric_only = t->times_clamped = t->sorted = true;
	archive_read_support_format_all(a);
	if (archive_read_open_filename(a, path, 10240) != ARCHIVE_OK) {
		*failed = 1;
		archive_read_free(a);
		return;
	}
	while (archive_read_next_header(a, &e) == ARCHIVE_OK) {
		const char *name = archive_entry_pathname(e);

		if (!name) {
			*failed = 1;
			break;
		}
		t->entries++;
		ib_buf_printf(&t->names, "%s\n", name);
		if ((archive_entry_uname(e) && *archive_entry_uname(e)) ||
		    (archive_entry_gname(e) && *archive_entry_gname(e)))
			t->numeric_only = false;
		if (archive_entry_mtime(e) > EPOCH || archive_entry_atime_is_set(e) ||
		    archive_entry_ctime_is_set(e))
			t->times_clamped = false;
		/*
		 * Parents before children, siblings sorted: for this fixture's
		 * names (no sibling sorts between "x" and "x/") that is strcmp
		 * order of the whole path.
		 */
		if (strncmp(prev, name, sizeof(prev)) >= 0)
			t->sorted = false;
		snprintf(prev, sizeof(prev), "%s", name);
		if (!strcmp(name, "./hl2") && archive_entry_hardlink(e) &&
		    !strcmp(archive_entry_hardlink(e), "./hl1"))
			t->hardlink_ok = true;
		if (!strcmp(name, "./caps")) {
			const char *xn;
			const void *xv;
			size_t xs;

			archive_entry_xattr_reset(e);
			while (archive_entry_xattr_next(e, &xn, &xv, &xs) == ARCHIVE_OK)
				if (!strcmp(xn, "user.test") && xs == 5 && !memcmp(xv, "hello", 5))
					t->xattr_ok = true;
		}
		if (!strcmp(name, "./etc/hostname")) {
			char buf[64] = "";

			archive_read_data(a, buf, sizeof(buf) - 1);
			t->hostname_ok = !strcmp(buf, "layer1\n");
		}
		if (!strcmp(name, "./sparse.bin")) {
			char *buf = ib_xmalloc(SPARSE_SIZE);
			la_ssize_t n, got = 0;

			while ((n = archive_read_data(a, buf + got, SPARSE_SIZE - (size_t)got)) > 0)
				got += n;
			t->sparse_ok = got == SPARSE_SIZE && archive_entry_sparse_count(e) > 1 &&
				       !memcmp(buf, "head", 4) &&
				       !memcmp(buf + 10 * 1024 * 1024 + 5, "middle", 6) &&
				       !memcmp(buf + SPARSE_SIZE - 4, "tail", 4) && buf[4096] == 0;
			free(buf);
		}
	}
	archive_read_free(a);
}

TEST(tar_export)
{
	char *tar = image_path("image.tar"), *again = image_path("again.tar");
	struct tar_seen t;
	bool same;

	memset(&t, 0, sizeof(t));
	ASSERT_INT_EQ(ib_tar_write(tar, layers(), 3, &opts), 0);
	ASSERT_INT_EQ(ib_tar_write(again, layers(), 3, &opts), 0);
	same = same_file(tar, again);
	read_tar(&t, tar, ib_failed_);
	unlink(tar);
	unlink(again);
	free(tar);
	free(again);
	ASSERT_TRUE(!*ib_failed_);
	ASSERT_TRUE(same);
	ASSERT_STR_CONTAINS(t.names.ptr, "./\n");
	ASSERT_STR_CONTAINS(t.names.ptr, "./merged/d\n");
	ASSERT_STR_CONTAINS(t.names.ptr, "./opq/new\n");
	ASSERT_STR_CONTAINS(t.names.ptr, "./repl\n");
	ASSERT_STR_CONTAINS(t.names.ptr, "./null\n");
	ASSERT_TRUE(!strstr(t.names.ptr, "hidden.txt"));
	ASSERT_TRUE(!strstr(t.names.ptr, "./merged/a"));
	ASSERT_TRUE(!strstr(t.names.ptr, "./opq/old"));
	ASSERT_TRUE(!strstr(t.names.ptr, "./repl/"));
	ASSERT_TRUE(!strstr(t.names.ptr, "./sock"));
	ASSERT_TRUE(t.numeric_only);
	ASSERT_TRUE(t.times_clamped);
	ASSERT_TRUE(t.sorted);
	ASSERT_TRUE(t.hardlink_ok);
	ASSERT_TRUE(t.xattr_ok);
	ASSERT_TRUE(t.hostname_ok);
	ASSERT_TRUE(t.sparse_ok);
	ib_buf_free(&t.names);
}

TEST(tar_listing_with_gnu_tar)
{
	char *tar = image_path("list.tar"), *out;
	int st;

	ASSERT_INT_EQ(ib_tar_write(tar, layers(), 3, &opts), 0);
	out = run(&st, "TZ=UTC tar --numeric-owner -tvf %s 2>&1", tar);
	unlink(tar);
	free(tar);
	ASSERT_INT_EQ(st, 0);
	ASSERT_STR_CONTAINS(out, "-rw-r--r-- 1234/5678");
	ASSERT_STR_CONTAINS(out, "2020-09-13 12:26 ./owned");
	ASSERT_STR_CONTAINS(out, "./hl2 link to ./hl1");
	ASSERT_STR_CONTAINS(out, "./sl -> etc/hostname");
	ASSERT_STR_CONTAINS(out, "crw-rw-rw- 0/0");
	free(out);
}

RUN_TESTS()

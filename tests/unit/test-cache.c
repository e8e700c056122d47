/* The cache: atomic layer commits, lookups, tree digests, verify, scratch dirs. */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/xattr.h>
#include <unistd.h>

#include "lib/util.h"
#include "cache/cache.h"
#include "layer/copy.h"
#include "layer/tree.h"
#include "tests/unit/test.h"

static const char key1[] = "1111111111111111111111111111111111111111111111111111111111111111";
static const char key2[] = "2222222222222222222222222222222222222222222222222222222222222222";

static char *tmpdir(void)
{
	char *t = ib_xstrdup("/tmp/ib-unit-cache.XXXXXX");

	if (!mkdtemp(t))
		abort();
	return t;
}

static void put(const char *dir, const char *rel, const char *content)
{
	char *p = ib_xasprintf("%s/%s", dir, rel);
	int fd = open(p, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);

	if (fd < 0 || ib_write_all(fd, content, strlen(content)) < 0)
		abort();
	close(fd);
	free(p);
}

/* A small layer dir: a file, a subdir, a symlink. */
static char *make_layer(ib_cache *c, const char *content, int *lockfd, char **scratch)
{
	char *upper;

	if (ib_cache_mktemp(c, scratch, lockfd) < 0)
		abort();
	upper = ib_xasprintf("%s/upper", *scratch);
	mkdir(upper, 0755);
	char *sub = ib_xasprintf("%s/etc", upper);
	mkdir(sub, 0755);
	free(sub);
	put(upper, "etc/file", content);
	char *ln = ib_xasprintf("%s/link", upper);
	if (symlink("etc/file", ln) < 0)
		abort();
	free(ln);
	return upper;
}

static unsigned problems_of(ib_cache *c)
{
	ib_verify_result r = { .problems = 99 };

	if (ib_cache_verify(c, NULL, NULL, NULL, &r) < 0)
		return 98;
	return r.problems;
}

TEST(commit_get_verify)
{
	char *dir = tmpdir(), *scratch = NULL, *upper, *path;
	ib_cache *c = NULL;
	ib_layer_info info;
	int lockfd = -1;

	ASSERT_INT_EQ(ib_cache_open(&c, dir), 0);
	ASSERT_INT_EQ(ib_cache_layer_get(c, key1, NULL), 0);
	upper = make_layer(c, "hello\n", &lockfd, &scratch);
	ASSERT_INT_EQ(ib_tree_normalise(upper, 1000, NULL), 0);
	ASSERT_INT_EQ(ib_cache_layer_commit(c, key1, NULL, "base", "{}", upper, 1.5, &info), 0);
	ASSERT_TRUE(access(upper, F_OK) < 0); /* moved, not copied */
	ib_cache_rmtemp(scratch, lockfd);
	free(scratch);
	free(upper);

	ASSERT_INT_EQ(ib_cache_layer_get(c, key1, &info), 1);
	ASSERT_STR_EQ(info.kind, "base");
	ASSERT_INT_EQ(info.files, 4); /* root, etc, etc/file, link */
	ASSERT_INT_EQ(problems_of(c), 0);

	/* a changed byte is found */
	path = ib_xasprintf("%s/layers/%s", dir, key1);
	put(path, "etc/file", "hellO\n");
	ASSERT_INT_EQ(problems_of(c), 1);
	put(path, "etc/file", "hello\n");
	ASSERT_INT_EQ(ib_tree_normalise(path, 1000, NULL), 0);
	ASSERT_INT_EQ(problems_of(c), 0);

	/* a missing directory is found, and the layer no longer counts as cached */
	char *moved = ib_xasprintf("%s/moved", dir);
	ASSERT_INT_EQ(rename(path, moved), 0);
	ASSERT_INT_EQ(ib_cache_layer_get(c, key1, NULL), 0);
	ASSERT_INT_EQ(problems_of(c), 1);
	ASSERT_INT_EQ(rename(moved, path), 0);
	ASSERT_INT_EQ(problems_of(c), 0);

	ASSERT_INT_EQ(ib_cache_layer_remove(c, key1), 0);
	ASSERT_INT_EQ(ib_cache_layer_get(c, key1, NULL), 0);
	ASSERT_TRUE(access(path, F_OK) < 0);
	ASSERT_INT_EQ(problems_of(c), 0);
	free(moved);
	free(path);
	ib_cache_close(c);
	ib_rm_rf(dir);
	free(dir);
}

TEST(digest_covers_metadata)
{
	char *dir = tmpdir(), *scratch = NULL, *upper;
	char d1[IB_SHA256_HEX], d2[IB_SHA256_HEX], d3[IB_SHA256_HEX];
	ib_cache *c = NULL;
	int lockfd = -1;

	ASSERT_INT_EQ(ib_cache_open(&c, dir), 0);
	upper = make_layer(c, "x", &lockfd, &scratch);
	ASSERT_INT_EQ(ib_tree_normalise(upper, 1000, NULL), 0);
	ASSERT_INT_EQ(ib_tree_digest(d1, upper, IB_TREE_DIGEST_CURRENT, NULL, NULL, NULL), 0);
	ASSERT_INT_EQ(ib_tree_digest(d2, upper, IB_TREE_DIGEST_CURRENT, NULL, NULL, NULL), 0);
	ASSERT_STR_EQ(d1, d2);
	char *f = ib_xasprintf("%s/etc/file", upper);
	ASSERT_INT_EQ(chmod(f, 0600), 0);
	ASSERT_INT_EQ(ib_tree_digest(d3, upper, IB_TREE_DIGEST_CURRENT, NULL, NULL, NULL), 0);
	ASSERT_TRUE(strcmp(d1, d3) != 0);
	ASSERT_INT_EQ(chmod(f, 0644), 0);
	ASSERT_INT_EQ(lchown(f, 1, 1), 0);
	ASSERT_INT_EQ(ib_tree_digest(d3, upper, IB_TREE_DIGEST_CURRENT, NULL, NULL, NULL), 0);
	ASSERT_TRUE(strcmp(d1, d3) != 0);
	free(f);
	ib_cache_rmtemp(scratch, lockfd);
	free(scratch);
	free(upper);
	ib_cache_close(c);
	ib_rm_rf(dir);
	free(dir);
}

TEST(normalise_clamps_times_and_strips_overlay_xattrs)
{
	char *dir = tmpdir(), *f;
	struct stat st;

	put(dir, "new", "n");
	f = ib_xasprintf("%s/new", dir);
	ASSERT_INT_EQ(setxattr(f, "trusted.overlay.origin", "x", 1, 0), 0);
	ASSERT_INT_EQ(setxattr(dir, "trusted.overlay.opaque", "y", 1, 0), 0);
	ASSERT_INT_EQ(ib_tree_normalise(dir, 1000, NULL), 0);
	ASSERT_INT_EQ(lstat(f, &st), 0);
	ASSERT_INT_EQ(st.st_mtime, 1000);
	ASSERT_INT_EQ(st.st_atime, 1000);
	ASSERT_TRUE(getxattr(f, "trusted.overlay.origin", NULL, 0) < 0 && errno == ENODATA);
	ASSERT_INT_EQ(getxattr(dir, "trusted.overlay.opaque", NULL, 0), 1);
	free(f);
	ib_rm_rf(dir);
	free(dir);
}

TEST(scratch_dirs_of_the_dead_are_swept)
{
	char *dir = tmpdir(), *live = NULL, *dead = NULL;
	ib_cache *c = NULL;
	int lf = -1, df = -1;

	ASSERT_INT_EQ(ib_cache_open(&c, dir), 0);
	ASSERT_INT_EQ(ib_cache_mktemp(c, &live, &lf), 0);
	ASSERT_INT_EQ(ib_cache_mktemp(c, &dead, &df), 0);
	close(df); /* its owner died */
	ASSERT_INT_EQ(ib_cache_clean_tmp(c), 0);
	ASSERT_INT_EQ(access(live, F_OK), 0);
	ASSERT_TRUE(access(dead, F_OK) < 0);
	ib_cache_rmtemp(live, lf);
	ASSERT_TRUE(access(live, F_OK) < 0);
	free(live);
	free(dead);
	ib_cache_close(c);
	ib_rm_rf(dir);
	free(dir);
}

TEST(images_and_their_layers)
{
	char *dir = tmpdir(), *scratch = NULL, *upper, *img;
	ib_cache *c = NULL;
	ib_image_info in = { 0 }, out = { 0 };
	char *layers[] = { (char *)key2, NULL };
	int lockfd = -1;

	ASSERT_INT_EQ(ib_cache_open(&c, dir), 0);
	upper = make_layer(c, "y", &lockfd, &scratch);
	ASSERT_INT_EQ(ib_cache_layer_commit(c, key2, NULL, "base", "{}", upper, 0, NULL), 0);
	img = ib_xasprintf("%s/img", scratch);
	put(scratch, "img", "ext4 bytes");
	snprintf(in.id, sizeof(in.id), "%s", key1);
	snprintf(in.top_key, sizeof(in.top_key), "%s", key2);
	snprintf(in.arch, sizeof(in.arch), "amd64");
	ASSERT_INT_EQ(ib_sha256_file(in.ext4_sha256, img), 0);
	in.ext4_bytes = 10;
	ASSERT_INT_EQ(ib_image_meta_parse(&in.meta, "{\"image_id\":\"x\", \"arch\": \"arm64\"}"), 0);
	in.layers = layers;
	in.nlayers = 1;
	ASSERT_INT_EQ(ib_cache_image_commit(c, &in, img), 0);
	ASSERT_INT_EQ(ib_cache_image_get(c, key1, &out), 1);
	ASSERT_STR_EQ(out.top_key, key2);
	ASSERT_INT_EQ(out.nlayers, 1);
	ASSERT_STR_EQ(out.layers[0], key2);
	ASSERT_STR_EQ(out.meta->image_id, "x");
	ASSERT_STR_EQ(out.meta->machine, "aarch64"); /* derived for images made before it was kept */
	ib_image_meta_free(in.meta);
	ASSERT_INT_EQ(problems_of(c), 0);
	/* an image whose layer went missing is a problem */
	ASSERT_INT_EQ(ib_cache_layer_remove(c, key2), 0);
	ASSERT_INT_EQ(problems_of(c), 1);
	ib_image_info_clear(&out);
	ib_cache_rmtemp(scratch, lockfd);
	free(scratch);
	free(upper);
	free(img);
	ib_cache_close(c);
	ib_rm_rf(dir);
	free(dir);
}

/* A tree in dir for the digest tests: a file, a sparse file, a link, an opaque dir, a whiteout. */
static void golden_tree(const char *d)
{
	char p[512], buf[70000];
	int fd;

	snprintf(p, sizeof(p), "%s/etc", d);
	mkdir(p, 0755);
	put(d, "etc/file", "hello\n");
	snprintf(p, sizeof(p), "%s/etc/big", d);
	fd = open(p, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
	memset(buf, 'x', sizeof(buf));
	if (fd < 0 || ib_write_all(fd, buf, sizeof(buf)) < 0 || ftruncate(fd, 300000) < 0 ||
	    pwrite(fd, "tail", 4, 299996) != 4)
		abort();
	close(fd);
	snprintf(p, sizeof(p), "%s/link", d);
	if (symlink("etc/file", p) < 0)
		abort();
	snprintf(p, sizeof(p), "%s/opq", d);
	mkdir(p, 0700);
	if (setxattr(p, "trusted.overlay.opaque", "y", 1, 0) < 0)
		abort();
	put(d, "opq/x", "");
	snprintf(p, sizeof(p), "%s/wh", d);
	if (mknod(p, S_IFCHR, 0) < 0)
		abort();
}

/*
 * Version 1 is what layers indexed before 0.1.5 hold: the walker must give
 * the old recursive digest's bytes (the value below came from it, on this
 * tree, as root).  Version 2 differs, and is the same for a file with a
 * hole and for the same bytes written out.
 */
TEST(digest_versions)
{
	char *dir = tmpdir(), *t = ib_xasprintf("%s/t", dir), *f;
	char v1[IB_SHA256_HEX], v2[IB_SHA256_HEX], v2b[IB_SHA256_HEX];
	int fd;

	mkdir(t, 0755);
	golden_tree(t);
	ASSERT_INT_EQ(ib_tree_normalise(t, 1000, NULL), 0);
	ASSERT_INT_EQ(ib_tree_digest(v1, t, IB_TREE_DIGEST_V1, NULL, NULL, NULL), 0);
	if (getuid() == 0)
		ASSERT_STR_EQ(v1, "806968503ed213d0cdca146f8c1f5268d3e9366376214bf4e3951ff968b47ff3");
	ASSERT_INT_EQ(ib_tree_digest(v2, t, IB_TREE_DIGEST_V2, NULL, NULL, NULL), 0);
	ASSERT_TRUE(strcmp(v1, v2) != 0);

	/* the sparse file written out densely: the same v2 digest */
	f = ib_xasprintf("%s/etc/big", t);
	{
		char *dense = NULL;
		size_t len = 0;
		ASSERT_INT_EQ(ib_read_file(&dense, &len, f, 1 << 20), 0);
		ASSERT_INT_EQ(len, 300000);
		unlink(f);
		fd = open(f, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
		ASSERT_TRUE(fd >= 0 && ib_write_all(fd, dense, len) == 0);
		close(fd);
		free(dense);
	}
	ASSERT_INT_EQ(ib_tree_normalise(t, 1000, NULL), 0);
	ASSERT_INT_EQ(ib_tree_digest(v2b, t, IB_TREE_DIGEST_V2, NULL, NULL, NULL), 0);
	ASSERT_STR_EQ(v2, v2b);
	ASSERT_INT_EQ(ib_tree_digest(v2b, t, 3, NULL, NULL, NULL), IB_ERROR);
	free(f);
	free(t);
	ib_rm_rf(dir);
	free(dir);
}

/*
 * The tree copy (a step's upper dir from the build disk into the cache)
 * keeps everything the digest covers, times included (the tree is not
 * normalised first), hard links as links and holes as holes.
 */
TEST(tree_copy)
{
	char *dir = tmpdir(), *t = ib_xasprintf("%s/t", dir), *c = ib_xasprintf("%s/c", dir), p[512];
	char a[IB_SHA256_HEX], b[IB_SHA256_HEX];
	struct stat s1, s2;

	mkdir(t, 0755);
	golden_tree(t);
	snprintf(p, sizeof(p), "%s/etc/file", t);
	ASSERT_INT_EQ(chmod(p, 04755), 0);
	ASSERT_INT_EQ(setxattr(p, "user.note", "kept", 4, 0), 0);
	{
		char q[512];
		snprintf(q, sizeof(q), "%s/hard", t);
		ASSERT_INT_EQ(link(p, q), 0);
		snprintf(q, sizeof(q), "%s/opq/fifo", t);
		ASSERT_INT_EQ(mkfifo(q, 0640), 0);
	}
	ASSERT_INT_EQ(ib_tree_copy(t, c, NULL), 0);
	ASSERT_INT_EQ(ib_tree_digest(a, t, IB_TREE_DIGEST_V2, NULL, NULL, NULL), 0);
	ASSERT_INT_EQ(ib_tree_digest(b, c, IB_TREE_DIGEST_V2, NULL, NULL, NULL), 0);
	ASSERT_STR_EQ(a, b);
	snprintf(p, sizeof(p), "%s/etc/file", c);
	ASSERT_INT_EQ(stat(p, &s1), 0);
	snprintf(p, sizeof(p), "%s/hard", c);
	ASSERT_INT_EQ(stat(p, &s2), 0);
	ASSERT_TRUE(s1.st_ino == s2.st_ino && s1.st_nlink == 2 && (s1.st_mode & 07777) == 04755);
	snprintf(p, sizeof(p), "%s/etc/big", c);
	ASSERT_INT_EQ(stat(p, &s1), 0);
	ASSERT_TRUE(s1.st_size == 300000 && s1.st_blocks * 512 < 200000);
	/* dst is made, never reused */
	ASSERT_INT_EQ(ib_tree_copy(t, c, NULL), IB_ERROR);
	free(t);
	free(c);
	ib_rm_rf(dir);
	free(dir);
}

/* The bytes this process has read (/proc/self/io rchar). */
static unsigned long long bytes_read(void)
{
	char *io = NULL, *p;
	size_t len = 0;
	unsigned long long n = 0;

	if (ib_read_file(&io, &len, "/proc/self/io", 4096) == 0 && (p = strstr(io, "rchar:")))
		n = strtoull(p + 6, NULL, 10);
	free(io);
	return n;
}

/* v2 never reads a hole: a 64 GiB sparse file costs what its 4 data bytes cost. */
TEST(digest_skips_holes)
{
	char *dir = tmpdir(), *f = ib_xasprintf("%s/sparse", dir), hex[IB_SHA256_HEX];
	unsigned long long before;
	int fd = open(f, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);

	ASSERT_TRUE(fd >= 0);
	ASSERT_INT_EQ(ftruncate(fd, 64LL << 30), 0);
	ASSERT_INT_EQ(pwrite(fd, "data", 4, 32LL << 30), 4);
	close(fd);
	before = bytes_read();
	ASSERT_INT_EQ(ib_tree_digest(hex, dir, IB_TREE_DIGEST_V2, NULL, NULL, NULL), 0);
	ASSERT_TRUE(bytes_read() - before < (4u << 20));
	free(f);
	ib_rm_rf(dir);
	free(dir);
}

/* Walks stop at the depth limit, naming it, and at the deadline; rm -rf goes any depth. */
TEST(walk_limits)
{
	char *dir = tmpdir(), hex[IB_SHA256_HEX];
	ib_walk_opts late = { .deadline = 1.0, .what = "the test tree" };
	int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC), cur = dup(fd);

	for (int i = 0; i < 2000; i++) {
		int next;
		ASSERT_INT_EQ(mkdirat(cur, "d", 0755), 0);
		next = openat(cur, "d", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
		ASSERT_TRUE(next >= 0);
		close(cur);
		cur = next;
	}
	close(cur);
	ASSERT_INT_EQ(ib_tree_normalise(dir, 1000, NULL), IB_ERROR);
	ASSERT_STR_CONTAINS(ib_error_last(), "nested deeper than 256 directories (IB_TREE_DEPTH_MAX)");
	ASSERT_INT_EQ(ib_tree_digest(hex, dir, IB_TREE_DIGEST_V2, NULL, NULL, NULL), IB_ERROR);
	ASSERT_STR_CONTAINS(ib_error_last(), "IB_TREE_DEPTH_MAX");
	ASSERT_INT_EQ(ib_rm_rf_at(fd, "d"), 0);
	ASSERT_TRUE(faccessat(fd, "d", F_OK, AT_SYMLINK_NOFOLLOW) < 0);
	for (int i = 0; i < 3000; i++) {
		char name[16];
		snprintf(name, sizeof(name), "f%d", i);
		put(dir, name, "");
	}
	ASSERT_INT_EQ(ib_tree_digest(hex, dir, IB_TREE_DIGEST_V2, &late, NULL, NULL), IB_ETIMEOUT);
	close(fd);
	ib_rm_rf(dir);
	free(dir);
}

/* rm -rf of a tree with files beside directories at every level, and an unreadable dir (overlayfs' work/work) */
TEST(rm_rf_wide_and_deep)
{
	char *dir = tmpdir(), *t = ib_xasprintf("%s/t", dir), p[512];

	mkdir(t, 0755);
	for (int i = 0; i < 3; i++) {
		snprintf(p, sizeof(p), "%s/d%d", t, i);
		mkdir(p, 0755);
		for (int j = 0; j < 3; j++) {
			snprintf(p, sizeof(p), "%s/d%d/e%d", t, i, j);
			mkdir(p, 0755);
			snprintf(p, sizeof(p), "d%d/e%d/file", i, j);
			put(t, p, "x");
			snprintf(p, sizeof(p), "d%d/f%d", i, j);
			put(t, p, "y");
		}
	}
	snprintf(p, sizeof(p), "%s/d1/e1", t);
	chmod(p, 0);
	ASSERT_INT_EQ(ib_rm_rf(t), 0);
	ASSERT_TRUE(access(t, F_OK) < 0);
	ASSERT_INT_EQ(ib_rm_rf(dir), 0);
	free(t);
	free(dir);
}

RUN_TESTS()

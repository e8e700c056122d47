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
	ASSERT_INT_EQ(ib_tree_normalise(upper, 1000), 0);
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
	ASSERT_INT_EQ(ib_tree_normalise(path, 1000), 0);
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
	ASSERT_INT_EQ(ib_tree_normalise(upper, 1000), 0);
	ASSERT_INT_EQ(ib_tree_digest(d1, upper, NULL, NULL), 0);
	ASSERT_INT_EQ(ib_tree_digest(d2, upper, NULL, NULL), 0);
	ASSERT_STR_EQ(d1, d2);
	char *f = ib_xasprintf("%s/etc/file", upper);
	ASSERT_INT_EQ(chmod(f, 0600), 0);
	ASSERT_INT_EQ(ib_tree_digest(d3, upper, NULL, NULL), 0);
	ASSERT_TRUE(strcmp(d1, d3) != 0);
	ASSERT_INT_EQ(chmod(f, 0644), 0);
	ASSERT_INT_EQ(lchown(f, 1, 1), 0);
	ASSERT_INT_EQ(ib_tree_digest(d3, upper, NULL, NULL), 0);
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
	ASSERT_INT_EQ(ib_tree_normalise(dir, 1000), 0);
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

RUN_TESTS()

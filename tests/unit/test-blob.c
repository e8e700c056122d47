/*
 * Layer blobs (layer/blob.c): a tree with every kind of entry a layer
 * holds (files, a hard link, a symlink, a whiteout, an opaque directory,
 * a fifo, xattrs, a sparse file, odd owners and modes) packs to the same
 * bytes twice, and unpacks to a tree with the same tree digest.  A blob
 * with an entry outside ./ is refused.
 */
#include <archive.h>
#include <archive_entry.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/xattr.h>
#include <unistd.h>

#include "layer/blob.h"
#include "layer/tree.h"
#include "lib/util.h"
#include "tests/unit/test.h"

static char *mkd(const char *tmpl)
{
	char *d = ib_xstrdup(tmpl);

	if (!mkdtemp(d))
		abort();
	return d;
}

static void put(const char *dir, const char *rel, const char *text)
{
	char *p = ib_xasprintf("%s/%s", dir, rel);

	if (ib_write_file_atomic(p, text, strlen(text), 0644) < 0)
		abort();
	free(p);
}

static char *at(const char *dir, const char *rel)
{
	return ib_xasprintf("%s/%s", dir, rel);
}

TEST(pack_twice_same_bytes_and_unpack_same_tree)
{
	char *src = mkd("/tmp/ib-blob-src.XXXXXX"), *dst = mkd("/tmp/ib-blob-dst.XXXXXX");
	char *b1 = ib_xasprintf("%s.1.tar.zst", src), *b2 = ib_xasprintf("%s.2.tar.zst", src);
	char d1[IB_SHA256_HEX], d2[IB_SHA256_HEX], t1[IB_SHA256_HEX], t2[IB_SHA256_HEX], *p, *q;
	uint64_t s1, s2;
	int fd;

	p = at(src, "etc");
	mkdir(p, 0755);
	free(p);
	put(src, "etc/hosts", "127.0.0.1 localhost\n");
	p = at(src, "etc/hosts");
	q = at(src, "etc/hosts.link");
	ASSERT_INT_EQ(link(p, q), 0);
	ASSERT_INT_EQ(lsetxattr(p, "user.note", "hi", 2, 0), 0);
	ASSERT_INT_EQ(chown(p, 1234, 42), 0);
	free(p);
	free(q);
	p = at(src, "etc/motd");
	ASSERT_INT_EQ(symlink("../run/motd", p), 0);
	free(p);
	p = at(src, "gone");
	ASSERT_INT_EQ(mknod(p, S_IFCHR | 0, makedev(0, 0)), 0); /* an overlay whiteout */
	free(p);
	p = at(src, "opaque");
	mkdir(p, 0700);
	ASSERT_INT_EQ(lsetxattr(p, "trusted.overlay.opaque", "y", 1, 0), 0);
	free(p);
	p = at(src, "opaque/fifo");
	ASSERT_INT_EQ(mkfifo(p, 0600), 0);
	free(p);
	p = at(src, "sparse");
	fd = open(p, O_WRONLY | O_CREAT, 04755);
	ASSERT_TRUE(fd >= 0);
	ASSERT_INT_EQ(pwrite(fd, "end", 3, 8 << 20), 3);
	fchmod(fd, 04755);
	close(fd);
	free(p);
	ASSERT_INT_EQ(lsetxattr(src, "trusted.overlay.opaque", "y", 1, 0), 0); /* the root's own */
	ASSERT_INT_EQ(ib_tree_normalise(src, 1700000000, NULL), 0);

	ASSERT_INT_EQ(ib_layer_blob_pack(src, b1, NULL, d1, &s1), 0);
	ASSERT_INT_EQ(ib_layer_blob_pack(src, b2, NULL, d2, &s2), 0);
	ASSERT_STR_EQ(d1, d2);
	ASSERT_TRUE(s1 == s2 && s1 < 64 * 1024); /* 8 MiB of zeros compress */
	ASSERT_INT_EQ(ib_layer_blob_unpack(b1, dst, 1000), 0);
	ASSERT_INT_EQ(ib_tree_digest(t1, src, IB_TREE_DIGEST_CURRENT, NULL, NULL, NULL), 0);
	ASSERT_INT_EQ(ib_tree_digest(t2, dst, IB_TREE_DIGEST_CURRENT, NULL, NULL, NULL), 0);
	if (strcmp(t1, t2))
		fprintf(stderr, "trees differ: %s %s\n", src, dst);
	ASSERT_STR_EQ(t1, t2);
	{
		struct stat st;
		p = at(dst, "sparse");
		ASSERT_INT_EQ(stat(p, &st), 0);
		ASSERT_TRUE(st.st_size == (8 << 20) + 3 && st.st_blocks < 64); /* the hole is a hole again */
		free(p);
	}
	ASSERT_INT_EQ(ib_layer_blob_unpack(b1, src, 2) < 0, 1); /* over the entry limit */
	ib_rm_rf(src);
	ib_rm_rf(dst);
	unlink(b1);
	unlink(b2);
	free(src);
	free(dst);
	free(b1);
	free(b2);
}

TEST(an_entry_outside_is_refused)
{
	char *dst = mkd("/tmp/ib-blob-dst.XXXXXX"), *blob = ib_xasprintf("%s.tar.zst", dst), *out;
	struct archive *a = archive_write_new();
	struct archive_entry *e = archive_entry_new();

	archive_write_set_format_pax_restricted(a);
	archive_write_add_filter_zstd(a);
	ASSERT_INT_EQ(archive_write_open_filename(a, blob), ARCHIVE_OK);
	archive_entry_set_pathname(e, "../escaped");
	archive_entry_set_filetype(e, AE_IFREG);
	archive_entry_set_perm(e, 0644);
	archive_entry_set_size(e, 1);
	archive_write_header(a, e);
	archive_write_data(a, "x", 1);
	archive_write_close(a);
	archive_write_free(a);
	archive_entry_free(e);
	ASSERT_TRUE(ib_layer_blob_unpack(blob, dst, 100) < 0);
	out = ib_xasprintf("%s/../escaped", dst);
	ASSERT_TRUE(access(out, F_OK) != 0);
	free(out);
	ib_rm_rf(dst);
	unlink(blob);
	free(dst);
	free(blob);
}

RUN_TESTS()

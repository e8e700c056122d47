/*
 * lib/: the helpers every module leans on, where their edges are easy to
 * miss: a sparse copy to another file system (a tmpfs /tmp).
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sched.h>
#include <sys/mount.h>
#include <unistd.h>

#include "lib/util.h"
#include "tests/unit/test.h"

/* A file of 64 MiB with 1 MiB of data at 0, 8 MiB and the last MiB. */
static void make_sparse(const char *path)
{
	char *buf = malloc(1 << 20);
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);

	for (int i = 0; i < (1 << 20); i++)
		buf[i] = (char)(i * 7 + 3);
	if (pwrite(fd, buf, 1 << 20, 0) < 0 || pwrite(fd, buf, 1 << 20, 8 << 20) < 0 ||
	    pwrite(fd, buf, 1 << 20, 63 << 20) < 0 || ftruncate(fd, 64 << 20) < 0)
		abort();
	close(fd);
	free(buf);
}

static int same_content(const char *a, const char *b)
{
	char *x = NULL, *y = NULL;
	size_t nx = 0, ny = 0;
	int same;

	if (ib_read_file(&x, &nx, a, 128 << 20) < 0 || ib_read_file(&y, &ny, b, 128 << 20) < 0)
		return 0;
	same = nx == ny && !memcmp(x, y, nx);
	free(x);
	free(y);
	return same;
}

static void copy_case(int *ib_failed_, const char *dir_a, const char *dir_b)
{
	char *src = ib_xasprintf("%s/ib-copy-src-%d", dir_a, (int)getpid());
	char *dst = ib_xasprintf("%s/ib-copy-dst-%d", dir_b, (int)getpid());
	struct stat st;

	make_sparse(src);
	ASSERT_INT_EQ(ib_copy_sparse(src, dst, 0640), 0);
	ASSERT_TRUE(same_content(src, dst));
	ASSERT_INT_EQ(stat(dst, &st), 0);
	ASSERT_INT_EQ(st.st_size, 64 << 20);
	ASSERT_INT_EQ(st.st_mode & 0777, 0640);
	ASSERT_TRUE((uint64_t)st.st_blocks * 512 < (16u << 20)); /* the holes stayed holes */
	unlink(src);
	unlink(dst);
	free(src);
	free(dst);
}

TEST(sparse_copy_same_file_system)
{
	copy_case(ib_failed_, "/var/tmp", "/var/tmp");
}

TEST(sparse_copy_to_another_file_system)
{
	char dir[] = "/var/tmp/ib-tmpfs-XXXXXX";

	/* a tmpfs of our own, as a fresh machine's /tmp: copy_file_range says EXDEV there */
	if (geteuid() != 0) {
		printf("skip: mounting a tmpfs needs root\n");
		return;
	}
	ASSERT_TRUE(mkdtemp(dir) != NULL);
	ASSERT_INT_EQ(unshare(CLONE_NEWNS), 0);
	ASSERT_INT_EQ(mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL), 0);
	ASSERT_INT_EQ(mount("tmpfs", dir, "tmpfs", 0, "size=128m"), 0);
	copy_case(ib_failed_, "/var/tmp", dir);
	umount(dir);
	rmdir(dir);
}

RUN_TESTS()

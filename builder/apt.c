#include "builder/apt.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "lib/util.h"

int ib_apt_open(ib_apt *a, const char *cache_dir, const char *arch)
{
	char *partial, *old;
	int err, fd;

	*a = (ib_apt){ 0 };
	a->lists = ib_xasprintf("%s/apt/%s/lists", cache_dir, arch);
	a->cache = ib_xasprintf("%s/apt/%s/cache", cache_dir, arch);
	a->lock = ib_xasprintf("%s/apt/%s.lock", cache_dir, arch);
	if ((err = ib_mkdir_p(a->lists, 0755)) < 0)
		return err;
	partial = ib_xasprintf("%s/archives/partial", a->cache);
	err = ib_mkdir_p(partial, 0755);
	free(partial);
	/* imagebuilder 0.1.0 kept the .deb files in apt/<arch>/archives */
	old = ib_xasprintf("%s/apt/%s/archives", cache_dir, arch);
	if (!err && access(old, F_OK) == 0 && (err = ib_apt_lock(a, &fd)) == 0) {
		ib_rm_rf(old);
		close(fd);
	}
	free(old);
	return err;
}

void ib_apt_close(ib_apt *a)
{
	free(a->lists);
	free(a->cache);
	free(a->lock);
	*a = (ib_apt){ 0 };
}

int ib_apt_lock(const ib_apt *a, int *out_fd)
{
	int fd = open(a->lock, O_RDWR | O_CREAT | O_CLOEXEC, 0644);

	*out_fd = fd;
	if (fd < 0)
		return ib_error_set_errno(errno, "cannot open '%s'", a->lock);
	while (flock(fd, LOCK_EX) < 0 && errno == EINTR)
		;
	return 0;
}

void ib_apt_mark_fresh(ib_apt *a)
{
	struct stat st;

	a->fresh = stat(a->lists, &st) == 0;
	if (a->fresh)
		a->mtime = st.st_mtim;
}

bool ib_apt_still_fresh(const ib_apt *a)
{
	struct stat st;

	return a->fresh && stat(a->lists, &st) == 0 && st.st_mtim.tv_sec == a->mtime.tv_sec &&
	       st.st_mtim.tv_nsec == a->mtime.tv_nsec;
}

int ib_apt_harvest(ib_apt *a, const char *upper)
{
	char *lists = ib_xasprintf("%s/var/lib/apt/lists", upper);
	DIR *d = opendir(lists);
	struct dirent *de;
	int err, lockfd;

	if (!d) {
		free(lists);
		return 0;
	}
	err = ib_apt_lock(a, &lockfd);
	while (!err && (de = readdir(d))) {
		if (de->d_name[0] == '.' || !strcmp(de->d_name, "lock") || !strcmp(de->d_name, "partial"))
			continue;
		char *src = ib_xasprintf("%s/%s", lists, de->d_name);
		char *dst = ib_xasprintf("%s/%s", a->lists, de->d_name);
		if (rename(src, dst) < 0 && unlink(src) < 0 && !err)
			err = ib_error_set_errno(errno, "cannot move '%s'", src);
		free(src);
		free(dst);
	}
	closedir(d);
	if (!err)
		ib_apt_mark_fresh(a);
	if (lockfd >= 0)
		close(lockfd);
	free(lists);
	return err;
}

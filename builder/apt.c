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

int ib_apt_open(ib_apt *a, const char *cache_dir, const char *arch, const char *scratch)
{
	static const char *const old[] = { "archives", "cache" };
	char *dir;
	int err, fd;

	*a = (ib_apt){ 0 };
	a->lists = ib_xasprintf("%s/apt/%s/lists", cache_dir, arch);
	a->lock = ib_xasprintf("%s/apt/%s.lock", cache_dir, arch);
	a->private = ib_xasprintf("%s/apt", scratch);
	if ((err = ib_mkdir_p(a->lists, 0755)) < 0)
		return err;
	dir = ib_xasprintf("%s/upper", a->private);
	err = ib_mkdir_p(dir, 0755);
	free(dir);
	dir = ib_xasprintf("%s/work", a->private);
	if (!err)
		err = ib_mkdir_p(dir, 0700);
	free(dir);
	/* 0.1.0 shared .deb files in apt/<arch>/archives, 0.1.x in apt/<arch>/cache: written by steps, gone */
	for (size_t i = 0; !err && i < sizeof(old) / sizeof(old[0]); i++) {
		dir = ib_xasprintf("%s/apt/%s/%s", cache_dir, arch, old[i]);
		if (access(dir, F_OK) == 0 && (err = ib_apt_lock(a, true, &fd)) == 0) {
			ib_rm_rf(dir);
			close(fd);
		}
		free(dir);
	}
	return err;
}

void ib_apt_close(ib_apt *a)
{
	free(a->lists);
	free(a->lock);
	free(a->private);
	*a = (ib_apt){ 0 };
}

int ib_apt_lock(const ib_apt *a, bool exclusive, int *out_fd)
{
	int fd = open(a->lock, O_RDWR | O_CREAT | O_CLOEXEC, 0600);

	*out_fd = fd;
	if (fd < 0)
		return ib_error_set_errno(errno, "cannot open '%s'", a->lock);
	while (flock(fd, exclusive ? LOCK_EX : LOCK_SH) < 0 && errno == EINTR)
		;
	return 0;
}

void ib_apt_mark_fresh(ib_apt *a)
{
	a->fresh = true;
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
	err = ib_apt_lock(a, true, &lockfd);
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

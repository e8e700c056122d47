#include "builder/junk.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "lib/util.h"

/*
 * Files that only record when or how a step ran.  Removed from every new
 * layer (when the layer itself wrote them) so that they neither bloat the
 * layer nor make two builds of one spec differ.
 */
static const char *const junk_files[] = {
	"var/log/dpkg.log",
	"var/log/alternatives.log",
	"var/log/bootstrap.log",
	"var/log/apt/history.log",
	"var/log/apt/term.log",
	"var/log/apt/eipp.log.xz",
	"var/cache/ldconfig/aux-cache",
	"var/cache/apt/pkgcache.bin",
	"var/cache/apt/srcpkgcache.bin",
	"var/cache/debconf/config.dat-old",
	"var/cache/debconf/templates.dat-old",
	"var/cache/debconf/passwords.dat-old",
	"var/lib/dpkg/status-old",
	"var/lib/dpkg/diversions-old",
	"var/lib/dpkg/statoverride-old",
};

/*
 * Directories whose files a step may leave (apt run by hand in run_commands,
 * pip without --no-cache-dir) but no image needs: their regular files are
 * dropped from the layer (whiteouts and the directories themselves stay);
 * in pip's cache, subdirectories too.
 */
static const struct {
	const char *path;
	bool subdirs;
} junk_dirs[] = {
	{ "var/lib/apt/lists", false },
	{ "var/lib/apt/lists/partial", false },
	{ "var/cache/apt/archives", false },
	{ "var/cache/apt/archives/partial", false },
	{ "root/.cache/pip", true },
};

static int remove_junk_dir(int fd, const char *path, bool subdirs)
{
	int d2 = fcntl(fd, F_DUPFD_CLOEXEC, 0);
	DIR *d = d2 >= 0 ? fdopendir(d2) : NULL;
	struct dirent *de;
	int err = 0;

	if (!d) {
		if (d2 >= 0)
			close(d2);
		return ib_error_set_errno(errno, "cannot read '%s' in the layer", path);
	}
	while (!err && (de = readdir(d))) {
		struct stat st;

		if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..") || !strcmp(de->d_name, "lock"))
			continue;
		if (fstatat(fd, de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0)
			continue;
		if (S_ISREG(st.st_mode)) {
			if (unlinkat(fd, de->d_name, 0) < 0 && errno != ENOENT)
				err = ib_error_set_errno(errno, "cannot remove '%s/%s' from the layer", path, de->d_name);
		} else if (S_ISDIR(st.st_mode) && subdirs) {
			err = ib_rm_rf_at(fd, de->d_name);
		}
	}
	closedir(d);
	return err;
}

/*
 * Everything here is looked up beneath the layer's root without following
 * a link (ib_open_beneath): a step that made one of these paths, or a
 * directory above it, a symlink to a host directory gets nothing removed
 * there; the path is simply not junk.
 */
int ib_junk_remove(const char *upper)
{
	int root = open(upper, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC), err = 0;

	if (root < 0)
		return ib_error_set_errno(errno, "cannot open '%s'", upper);
	for (size_t i = 0; i < sizeof(junk_dirs) / sizeof(junk_dirs[0]) && !err; i++) {
		int fd = ib_open_beneath(root, junk_dirs[i].path, O_RDONLY | O_DIRECTORY);
		if (fd < 0)
			continue; /* absent, or not a plain directory of the layer */
		err = remove_junk_dir(fd, junk_dirs[i].path, junk_dirs[i].subdirs);
		close(fd);
	}
	for (size_t i = 0; i < sizeof(junk_files) / sizeof(junk_files[0]) && !err; i++) {
		const char *slash = strrchr(junk_files[i], '/');
		char *parent = ib_xstrndup(junk_files[i], (size_t)(slash - junk_files[i]));
		int fd = ib_open_beneath(root, parent, O_RDONLY | O_DIRECTORY);
		struct stat st;

		if (fd >= 0 && fstatat(fd, slash + 1, &st, AT_SYMLINK_NOFOLLOW) == 0 &&
		    (S_ISREG(st.st_mode) || S_ISLNK(st.st_mode)) && unlinkat(fd, slash + 1, 0) < 0 && errno != ENOENT)
			err = ib_error_set_errno(errno, "cannot remove '%s' from the layer", junk_files[i]);
		if (fd >= 0)
			close(fd);
		free(parent);
	}
	close(root);
	return err;
}

int ib_junk_neutralise_base(const char *upper)
{
	char *path = ib_xasprintf("%s/etc/resolv.conf", upper);
	int err = 0;

	unlink(path);
	if ((err = ib_write_file_atomic(path, "", 0, 0644)) < 0)
		goto out;
	free(path);
	path = ib_xasprintf("%s/etc/hostname", upper);
	unlink(path);
	err = ib_write_file_atomic(path, "localhost\n", 10, 0644);
out:
	free(path);
	return err;
}

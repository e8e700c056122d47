#include "builder/junk.h"

#include <dirent.h>
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
 * dropped from the layer (whiteouts and the directories themselves stay).
 */
static const char *const junk_dirs[] = {
	"var/lib/apt/lists",
	"var/lib/apt/lists/partial",
	"var/cache/apt/archives",
	"var/cache/apt/archives/partial",
	"root/.cache/pip",
};

static void remove_junk_dir(const char *dir)
{
	DIR *d = opendir(dir);
	struct dirent *de;

	if (!d)
		return;
	while ((de = readdir(d))) {
		struct stat st;
		if (de->d_name[0] == '.' && (!de->d_name[1] || (de->d_name[1] == '.' && !de->d_name[2])))
			continue;
		if (!strcmp(de->d_name, "lock"))
			continue;
		if (fstatat(dirfd(d), de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0)
			continue;
		if (S_ISREG(st.st_mode)) {
			unlinkat(dirfd(d), de->d_name, 0);
		} else if (S_ISDIR(st.st_mode) && strlen(dir) > 10 && !strcmp(dir + strlen(dir) - 10, ".cache/pip")) {
			char *sub = ib_xasprintf("%s/%s", dir, de->d_name);
			ib_rm_rf(sub);
			free(sub);
		}
	}
	closedir(d);
}

void ib_junk_remove(const char *upper)
{
	for (size_t i = 0; i < sizeof(junk_dirs) / sizeof(junk_dirs[0]); i++) {
		char *path = ib_xasprintf("%s/%s", upper, junk_dirs[i]);
		remove_junk_dir(path);
		free(path);
	}
	for (size_t i = 0; i < sizeof(junk_files) / sizeof(junk_files[0]); i++) {
		char *path = ib_xasprintf("%s/%s", upper, junk_files[i]);
		struct stat st;

		if (lstat(path, &st) == 0 && (S_ISREG(st.st_mode) || S_ISLNK(st.st_mode)))
			unlink(path);
		free(path);
	}
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

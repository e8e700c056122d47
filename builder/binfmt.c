#include "builder/binfmt.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <unistd.h>

#include "lib/error.h"
#include "lib/util.h"

#define BINFMT_DIR "/proc/sys/fs/binfmt_misc"
#define BINFMT_CONF_DIR "/usr/lib/binfmt.d"

static struct utsname uts;
static pthread_once_t uts_once = PTHREAD_ONCE_INIT;
static pthread_mutex_t register_lock = PTHREAD_MUTEX_INITIALIZER;

static void read_uts(void)
{
	if (uname(&uts) < 0)
		snprintf(uts.machine, sizeof(uts.machine), "unknown");
}

const char *ib_binfmt_host_machine(void)
{
	pthread_once(&uts_once, read_uts);
	return uts.machine;
}

/* Does the "flags: " line of a registration hold F? */
static bool has_fix_binary(const char *data)
{
	const char *flags = strstr(data, "\nflags: ");
	size_t len;

	if (!flags)
		return false;
	flags += strlen("\nflags: ");
	len = strcspn(flags, "\n");
	return memchr(flags, 'F', len) != NULL;
}

/* 1: registered, enabled, with F; 0: not registered; <0: unusable, message set. */
static int check(const char *machine)
{
	char *path = ib_xasprintf(BINFMT_DIR "/qemu-%s", machine), *data = NULL;
	int ret = 0;

	if (ib_read_file(&data, NULL, path, 65536) < 0) {
		free(path);
		return 0;
	}
	if (strncmp(data, "enabled", 7))
		ret = ib_error_set("binfmt_misc: '%s' is registered but disabled (echo 1 > %s)", path, path);
	else if (!has_fix_binary(data))
		ret = ib_error_set("binfmt_misc: '%s' is registered without the F flag, so qemu cannot run inside "
				   "the sandbox; re-register it with F (Debian's qemu-user-static does)", path);
	else
		ret = 1;
	free(data);
	free(path);
	return ret;
}

int ib_binfmt_ensure(const char *machine)
{
	char *conf = NULL, *line = NULL;
	struct stat st;
	int fd, r, err = 0;

	if (!strcmp(machine, ib_binfmt_host_machine()))
		return 0;
	pthread_mutex_lock(&register_lock);
	if (stat(BINFMT_DIR "/register", &st) < 0 &&
	    mount("binfmt_misc", BINFMT_DIR, "binfmt_misc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0 &&
	    errno != EBUSY) {
		err = ib_error_set_errno(errno, "building for %s on %s needs binfmt_misc, and it cannot be mounted "
				   "at " BINFMT_DIR, machine, ib_binfmt_host_machine());
		goto out;
	}
	if ((r = check(machine)) != 0) {
		err = r < 0 ? r : 0;
		goto out;
	}
	conf = ib_xasprintf(BINFMT_CONF_DIR "/qemu-%s.conf", machine);
	if (ib_read_file(&line, NULL, conf, 4096) < 0) {
		err = ib_error_set("building for %s on %s needs qemu-user emulation: install the Debian package "
				   "qemu-user-static (it provides '%s')", machine, ib_binfmt_host_machine(), conf);
		goto out;
	}
	line[strcspn(line, "\n")] = '\0';
	fd = open(BINFMT_DIR "/register", O_WRONLY | O_CLOEXEC);
	if (fd < 0 || (ib_write_all(fd, line, strlen(line)) < 0 && errno != EEXIST)) {
		err = ib_error_set_errno(errno, "cannot register qemu for %s from '%s' in " BINFMT_DIR "/register",
					 machine, conf);
		if (fd >= 0)
			close(fd);
		goto out;
	}
	close(fd);
	if ((r = check(machine)) <= 0)
		err = r < 0 ? r : ib_error_set("registering qemu for %s from '%s' had no effect", machine, conf);
out:
	pthread_mutex_unlock(&register_lock);
	free(conf);
	free(line);
	return err;
}

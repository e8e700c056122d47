#include "builder/disk.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/loop.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "builder/proc.h"
#include "lib/util.h"

/* Below this much free space a failed step is taken to have hit the limit. */
#define DISK_FULL_SLACK (4u << 20)

int ib_disk_private_mounts(void)
{
	if (unshare(CLONE_NEWNS) < 0)
		return ib_error_set_errno(errno, "cannot make a mount namespace for the build disks");
	if (mount(NULL, "/", NULL, MS_REC | MS_SLAVE, NULL) < 0)
		return ib_error_set_errno(errno, "cannot make the build disks' mounts private");
	return 0;
}

static int mkfs(const char *image, const char *what)
{
	/*
	 * No journal (the disk is thrown away, never recovered), no reserved
	 * blocks, inode tables left for the kernel never to zero (noinit_itable
	 * at mount): a 32 GiB disk is made in tens of milliseconds.
	 */
	const char *argv[] = { "mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-O", "^has_journal",
			       "-E", "lazy_itable_init=1,nodiscard", image, NULL };
	ib_proc_opts po = { .name = "mke2fs" };
	int err = ib_proc_run(argv, &po);

	if (err)
		ib_error_prefix("cannot format %s", what);
	return err;
}

/* A free loop device with image attached, clearing itself once unused; its fd. */
static int attach(const char *image, char *dev, size_t devsize)
{
	struct loop_config lc = { .info = { .lo_flags = LO_FLAGS_AUTOCLEAR } };
	int ctl, backing, fd = -1, err = 0;

	backing = open(image, O_RDWR | O_CLOEXEC);
	if (backing < 0)
		return ib_error_set_errno(errno, "cannot open '%s'", image);
	ctl = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
	if (ctl < 0) {
		err = ib_error_set_errno(errno, "cannot open /dev/loop-control (the build disk needs a loop device)");
		goto out;
	}
	lc.fd = (unsigned)backing;
	/* another process may take the free device first: ask again */
	for (int tries = 0; tries < 64; tries++) {
		int n = ioctl(ctl, LOOP_CTL_GET_FREE);

		if (n < 0) {
			err = ib_error_set_errno(errno, "cannot get a free loop device");
			goto out;
		}
		snprintf(dev, devsize, "/dev/loop%d", n);
		fd = open(dev, O_RDWR | O_CLOEXEC);
		if (fd < 0) {
			err = ib_error_set_errno(errno, "cannot open '%s'", dev);
			goto out;
		}
		if (ioctl(fd, LOOP_CONFIGURE, &lc) == 0)
			goto out;
		if (errno != EBUSY) {
			err = ib_error_set_errno(errno, "cannot attach '%s' to '%s'", image, dev);
			goto out;
		}
		close(fd);
		fd = -1;
	}
	err = ib_error_set("cannot attach '%s': every free loop device was taken first", image);
out:
	if (err && fd >= 0) {
		close(fd);
		fd = -1;
	}
	if (ctl >= 0)
		close(ctl);
	close(backing);
	return err ? err : fd;
}

int ib_disk_open(ib_disk *d, const char *dir, uint64_t size)
{
	char dev[64], what[64];
	int fd, err;

	*d = (ib_disk)IB_DISK_INIT;
	d->size = size;
	d->image = ib_xasprintf("%s/disk.img", dir);
	snprintf(what, sizeof(what), "the build disk");
	fd = open(d->image, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (fd < 0)
		return ib_error_set_errno(errno, "cannot create '%s'", d->image);
	if (ftruncate(fd, (off_t)size) < 0) {
		err = ib_error_set_errno(errno, "cannot size '%s'", d->image);
		close(fd);
		return err;
	}
	close(fd);
	if ((err = mkfs(d->image, what)) < 0)
		return err;
	if ((fd = attach(d->image, dev, sizeof(dev))) < 0)
		return fd;
	char *mnt = ib_xasprintf("%s/disk", dir);
	if (mkdir(mnt, 0700) < 0) {
		err = ib_error_set_errno(errno, "cannot create '%s'", mnt);
	} else if (mount(dev, mnt, "ext4", MS_NOATIME, "noinit_itable,discard") < 0) {
		err = ib_error_set_errno(errno, "cannot mount the build disk '%s' on '%s'", dev, mnt);
	} else {
		d->mnt = mnt;
		mnt = NULL;
	}
	/* the mount holds the device now; with autoclear it goes when the mount does */
	close(fd);
	free(mnt);
	if (err)
		return err;
	char *spent = ib_xasprintf("%s/spent", d->mnt);
	d->spent_fd = open(spent, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
	if (d->spent_fd < 0)
		err = ib_error_set_errno(errno, "cannot create '%s'", spent);
	free(spent);
	return err;
}

/* Bytes and inodes in use on the disk now. */
static void in_use(const ib_disk *d, uint64_t *bytes, uint64_t *inodes)
{
	struct statvfs sv;

	*bytes = *inodes = 0;
	if (fstatvfs(d->spent_fd, &sv) == 0) {
		*bytes = (uint64_t)(sv.f_blocks - sv.f_bfree) * sv.f_frsize;
		*inodes = (uint64_t)(sv.f_files - sv.f_ffree);
	}
}

int ib_disk_mkdir(ib_disk *d, char **out)
{
	char *dir = ib_xasprintf("%s/s%u", d->mnt, d->serial++);

	in_use(d, &d->mark_bytes, &d->mark_inodes);
	if (mkdir(dir, 0700) < 0) {
		int err = ib_error_set_errno(errno, "cannot create '%s'", dir);
		free(dir);
		return err;
	}
	*out = dir;
	return 0;
}

int ib_disk_release(ib_disk *d, const char *dir)
{
	uint64_t bytes, inodes, by_inodes;
	struct statvfs sv;
	int err;

	/* measured on the disk, not by a walk of the tree: nothing a step made escapes the count */
	in_use(d, &bytes, &inodes);
	bytes = bytes > d->mark_bytes ? bytes - d->mark_bytes : 0;
	by_inodes = inodes > d->mark_inodes ? (inodes - d->mark_inodes) * 4096 : 0;
	if (by_inodes > bytes)
		bytes = by_inodes;
	if ((err = ib_rm_rf(dir)) < 0 || !bytes)
		return err;
	/* unwritten extents: space taken on the disk, none on the host */
	if (fallocate(d->spent_fd, 0, (off_t)d->spent, (off_t)bytes) < 0 && errno == ENOSPC &&
	    fstatvfs(d->spent_fd, &sv) == 0) {
		/* more than is left: all of it is spent */
		bytes = (uint64_t)sv.f_bavail * sv.f_frsize;
		if (bytes && fallocate(d->spent_fd, 0, (off_t)d->spent, (off_t)bytes) < 0)
			return 0;
	}
	d->spent += bytes;
	return 0;
}

bool ib_disk_full(const ib_disk *d)
{
	struct statvfs sv;

	if (!d->mnt || statvfs(d->mnt, &sv) < 0)
		return false;
	return (uint64_t)sv.f_bavail * sv.f_frsize < DISK_FULL_SLACK || sv.f_favail == 0;
}

void ib_disk_close(ib_disk *d)
{
	if (d->spent_fd >= 0)
		close(d->spent_fd);
	if (d->mnt) {
		/* lazily: a sandbox still going away may hold it a moment longer */
		umount2(d->mnt, MNT_DETACH);
		free(d->mnt);
	}
	free(d->image);
	*d = (ib_disk)IB_DISK_INIT;
}

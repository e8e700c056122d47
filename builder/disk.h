#ifndef IB_DISK_H
#define IB_DISK_H

#include <stdbool.h>
#include <stdint.h>

/*
 * A build's own disk (--disk): a sparse file of the limit's size in the
 * build's scratch, formatted ext4, attached to a loop device and mounted
 * in the builder's private mount namespace.  The steps' upper dirs, their
 * sandbox makings and apt's downloads live on it, so a step that writes
 * past the limit gets ENOSPC and the host's free space is not used beyond
 * it.  A finished step's tree is copied into the cache and removed here
 * (discard gives the blocks back to the host); the space it took stays
 * spent for the rest of the build, so the limit covers everything the
 * build writes.  The loop device clears itself when the mount goes, and
 * the mount goes with the builder's mount namespace however it ends.
 */

typedef struct ib_disk {
	char *image; /* the backing file */
	char *mnt;   /* where it is mounted; NULL: no disk (limit none) */
	uint64_t size;
	uint64_t spent; /* bytes of finished steps, held by a fallocated file */
	int spent_fd;
	uint64_t mark_bytes, mark_inodes; /* in use when the step's dir was made */
	unsigned serial; /* for step dirs */
} ib_disk;

#define IB_DISK_INIT { .spent_fd = -1 }

/*
 * Give this process a mount namespace of its own (mounts from the host
 * still arrive; its own go nowhere), so that a build's disk is never seen
 * by the host and never outlives the process.  Root only; call once at
 * start, before threads.
 */
int ib_disk_private_mounts(void);

/* Make, attach and mount a disk of size bytes in dir (dir/disk.img, dir/disk). */
int ib_disk_open(ib_disk *d, const char *dir, uint64_t size);

/* A new empty directory on the disk for one step (allocated). */
int ib_disk_mkdir(ib_disk *d, char **out);

/*
 * The step's dir is done with: what the disk lost since ib_disk_mkdir
 * (blocks, or 4 KiB an inode where that is more: every name costs) stays
 * spent, then the dir is removed.
 */
int ib_disk_release(ib_disk *d, const char *dir);

/* True when the disk is (nearly) full: the likely cause of a step's failure. */
bool ib_disk_full(const ib_disk *d);

/* Unmount (the loop device clears itself); the files go with the scratch dir. */
void ib_disk_close(ib_disk *d);

#endif

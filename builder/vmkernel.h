#ifndef IB_VMKERNEL_H
#define IB_VMKERNEL_H

#include "lib/util.h"

/*
 * The kernel a VM runner boots steps with (qemu's microvm machine), and the
 * initramfs that loads the modules it needs before handing over to the
 * runner's init.
 *
 * Debian's cloud kernel is fetched with apt once and kept in the cache:
 *
 *   CACHE/vm/lock                  flock: one process fetches or unpacks at a time
 *   CACHE/vm/apt/{lists,cache}     apt's own state, used only when the host's
 *                                  package lists lack the kernel (never the host's)
 *   CACHE/vm/<arch>/<version>/     vmlinuz, config, version, modules.order and
 *                                  modules/NAME.ko, written into a temporary
 *                                  directory and renamed into place whole
 *   CACHE/vm/<arch>/current        the version apt gave, so later calls need no apt
 *   CACHE/vm/<arch>/deb-<sha256>/  the same from a .deb named by the caller
 *   CACHE/vm/<arch>/tmp.*          unpacking in progress (a crashed one is
 *                                  removed by the next holder of the lock)
 *
 * The modules are those a microvm guest needs that the kernel's config has
 * as modules (=m), not built in: virtio_pci, virtio_mmio, virtio_blk,
 * virtio_net, virtio_console, overlay, and what they depend on (their
 * .modinfo "depends="), dependencies first.
 */
typedef struct ib_vm_kernel {
	char *version;   /* "6.1.0-57-cloud-amd64" */
	char *vmlinuz;   /* path of the kernel image */
	char *moddir;    /* directory of the module files (flat: NAME.ko); NULL when all are built in */
	ib_strv modules; /* file names in moddir, in load order (dependencies first) */
} ib_vm_kernel;

/*
 * The guest kernel for arch (only "amd64" for now; others are IB_EINVALID):
 * kernel_path (IMAGEBUILDER_VM_KERNEL; NULL: none) when given, either a
 * linux-image-*.deb (unpacked into CACHE/vm/<arch>/deb-<its sha256>) or a
 * bare kernel image with every driver built in (used where it is, no
 * modules); else Debian's linux-image-cloud-<arch>, resolved and
 * downloaded with apt (the host's package lists, else a private
 * `apt-get update` into CACHE/vm/apt) on the first call and unpacked into
 * the cache; later calls read the cache and run no apt.  deadline: an
 * ib_now() value (0: none), IB_ETIMEOUT after it.  The caller owns *out
 * (ib_vm_kernel_clear()); nothing is written to it on failure.
 */
int ib_vm_kernel_get(ib_vm_kernel *out, const char *cache_dir, const char *arch, const char *kernel_path,
		     double deadline);

/* Free what k holds; k is empty afterwards.  NULL is fine. */
void ib_vm_kernel_clear(ib_vm_kernel *k);

/*
 * Unpack a linux-image-*.deb into dest_dir (created; it must not exist),
 * in the cache's layout (vmlinuz, config, version, modules.order,
 * modules/NAME.ko) and describe the result in *out.  Only the kernel
 * image, its config and the modules needed are written, under names made
 * here.  Exposed for the unit test; ib_vm_kernel_get() is what callers use.
 */
int ib_vm_kernel_from_deb(ib_vm_kernel *out, const char *deb_path, const char *dest_dir);

/*
 * Write the initramfs for k to out_path (whole or not at all): an
 * uncompressed cpio (newc) with /init (the file init_path, mode 0755), the
 * directories /dev /proc /sys /mnt /run /tmp, /dev/console (char 5:1,
 * 0600), /lib/modules/NAME.ko for each of k->modules and /modules, their
 * names one per line in load order.  The same inputs give the same bytes:
 * mtimes 0, owner 0:0, inode numbers by position.
 */
int ib_vm_initramfs(const ib_vm_kernel *k, const char *init_path, const char *out_path);

#endif

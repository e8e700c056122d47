/*
 * The VM kernel: the initramfs writer read back with libarchive (entries,
 * modes, owners, the same bytes twice), the .deb unpacker on small
 * packages made here with dpkg-deb (which modules, in which order, what
 * is refused) and the cache around it (a .deb named by the caller, a bare
 * image, a kernel apt fetched earlier used with no apt at all).
 */
#include <dirent.h>
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <archive.h>
#include <archive_entry.h>

#include "builder/proc.h"
#include "builder/vmkernel.h"
#include "lib/util.h"
#include "tests/unit/test.h"

#define KVER "9.9.9-1-cloud-amd64"

/* a file of the fake package: a literal with its NULs */
struct fake {
	const char *path;
	const char *data;
	size_t len;
};
#define FAKE(p, lit) { (p), (lit), sizeof(lit) - 1 }
#define MODS "lib/modules/" KVER "/kernel/"

static char *new_dir(void)
{
	char t[] = "/tmp/ib-vmk-XXXXXX";

	if (!mkdtemp(t))
		abort();
	return ib_xstrdup(t);
}

/* dir/rel with its parents; false on failure */
static bool put(const char *dir, const char *rel, const void *data, size_t len, mode_t mode)
{
	char *path = ib_xasprintf("%s/%s", dir, rel), *slash = strrchr(path, '/');
	bool ok;
	int fd;

	*slash = '\0';
	ok = ib_mkdir_p(path, 0755) == 0;
	*slash = '/';
	fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
	ok = ok && fd >= 0 && ib_write_all(fd, data, len) == 0 && fchmod(fd, mode) == 0;
	if (fd >= 0)
		close(fd);
	free(path);
	return ok;
}

static char *slurp(const char *path, size_t *len)
{
	char *s = NULL;
	size_t n = 0;

	if (ib_read_file(&s, &n, path, 64 << 20) < 0)
		return NULL;
	if (len)
		*len = n;
	return s;
}

static bool have_dpkg_deb(void)
{
	return ib_proc_available("dpkg-deb");
}

/*
 * A linux-image .deb in dir/NAME.deb with files and a config of the six
 * symbols the unpacker asks about (and CONFIG_EXT4_FS=y), compressed with
 * comp.  Its path, or NULL.
 */
static char *make_deb(const char *dir, const char *name, const char *comp, const char *config,
		      const struct fake *files, size_t nfiles)
{
	static const char control[] = "Package: linux-image-" KVER "\nVersion: 9.9.9-1\nArchitecture: amd64\n"
				      "Maintainer: Test <test@example.org>\nDescription: fake kernel\n";
	char *root = ib_xasprintf("%s/%s.root", dir, name), *deb = ib_xasprintf("%s/%s.deb", dir, name);
	const char *argv[] = { "dpkg-deb", "--root-owner-group", "-Z", comp, "--build", root, deb, NULL };
	ib_proc_opts opts = { 0 };
	bool ok = put(root, "DEBIAN/control", control, sizeof(control) - 1, 0644) &&
		  put(root, "boot/vmlinuz-" KVER, "fake kernel image", 17, 0644) &&
		  put(root, "boot/config-" KVER, config, strlen(config), 0644) &&
		  put(root, "boot/System.map-" KVER, "map", 3, 0644);

	for (size_t i = 0; ok && i < nfiles; i++)
		ok = put(root, files[i].path, files[i].data, files[i].len, 0644);
	if (ok)
		ok = ib_proc_run(argv, &opts) == 0;
	ib_rm_rf(root);
	free(root);
	if (!ok) {
		free(deb);
		return NULL;
	}
	return deb;
}

static const char config_all[] = "#\n# Linux/x86 9.9.9 Kernel Configuration\n#\n"
				 "CONFIG_EXT4_FS=y\nCONFIG_VIRTIO=m\nCONFIG_VIRTIO_PCI=y\nCONFIG_VIRTIO_MMIO=m\n"
				 "CONFIG_VIRTIO_BLK=m\nCONFIG_VIRTIO_NET=m\nCONFIG_VIRTIO_CONSOLE=y\n"
				 "# CONFIG_VIRTIO_BLK_SCSI is not set\nCONFIG_OVERLAY_FS=m\n";

/*
 * The modules of the main fixture: .modinfo strings in files that are not
 * ELF (the whole file is searched), a file named with '-' that a
 * dependency names with '_', a key that only ends in "depends=", modules
 * nothing needs, and a dependency listed before anything names it (a
 * second pass over the package fetches it).
 */
static const struct fake modules_all[] = {
	FAKE(MODS "drivers/virtio/virtio.ko", "\x7f" "fake\0license=GPL\0depends=\0name=virtio\0"),
	FAKE(MODS "drivers/virtio/virtio_ring.ko", "ring\0depends=virtio\0"),
	FAKE(MODS "drivers/virtio/virtio_mmio.ko", "mmio\0depends=virtio,virtio_ring\0"),
	FAKE(MODS "drivers/virtio/virtio_pci.ko", "pci (built in by the config)\0depends=virtio\0"),
	FAKE(MODS "drivers/block/virtio_blk.ko", "blk\0xdepends=bogus\0depends=virtio,virtio_ring\0"),
	FAKE(MODS "drivers/net/virtio_net.ko", "net\0depends=virtio_ring,virtio,net_failover\0"),
	FAKE(MODS "drivers/net/net-failover.ko", "nf\0depends=failover\0"),
	FAKE(MODS "net/core/failover.ko", "fo\0depends=\0"),
	FAKE(MODS "drivers/a/ovl-helper.ko", "helper\0depends=\0"),
	FAKE(MODS "fs/overlayfs/overlay.ko", "ovl\0vermagic=9.9.9\0depends=ovl-helper\0"),
	FAKE(MODS "drivers/net/dummy.ko", "dummy\0depends=\0"),
	FAKE(MODS "drivers/char/virtio_console.ko", "console (built in)\0depends=virtio,virtio_ring\0"),
};

static const char *const order_all[] = {
	"virtio.ko", "virtio_ring.ko", "virtio_mmio.ko", "virtio_blk.ko",
	"failover.ko", "net_failover.ko", "virtio_net.ko", "ovl_helper.ko", "overlay.ko",
};
#define NORDER (sizeof(order_all) / sizeof(order_all[0]))

/* ---- the initramfs ---- */

struct want_entry {
	const char *path;
	unsigned type;
	unsigned perm;
	const char *data; /* NULL: not checked */
};

/* Check the cpio at path against want (in order, nothing else); a message on the first difference. */
static const char *check_cpio(const char *path, const struct want_entry *want, size_t nwant)
{
	static char msg[512];
	struct archive *a = archive_read_new();
	struct archive_entry *e;
	size_t i = 0;
	int r;

	msg[0] = '\0';
	archive_read_support_format_cpio(a);
	if (archive_read_open_filename(a, path, 10240) != ARCHIVE_OK) {
		snprintf(msg, sizeof(msg), "cannot open: %s", archive_error_string(a));
		goto out;
	}
	while ((r = archive_read_next_header(a, &e)) == ARCHIVE_OK) {
		const char *name = archive_entry_pathname(e);
		char buf[4096];
		la_ssize_t n;

		if (archive_format(a) != ARCHIVE_FORMAT_CPIO_SVR4_NOCRC) {
			snprintf(msg, sizeof(msg), "format '%s', not newc", archive_format_name(a));
			goto out;
		}
		if (i >= nwant) {
			snprintf(msg, sizeof(msg), "unexpected entry '%s'", name);
			goto out;
		}
		if (strcmp(name, want[i].path) || archive_entry_filetype(e) != want[i].type ||
		    archive_entry_perm(e) != want[i].perm || archive_entry_uid(e) || archive_entry_gid(e) ||
		    archive_entry_mtime(e)) {
			snprintf(msg, sizeof(msg),
				 "entry %zu: '%s' type %o perm %o uid %lld mtime %lld, expected '%s' %o %o",
				 i, name, archive_entry_filetype(e), archive_entry_perm(e),
				 (long long)archive_entry_uid(e), (long long)archive_entry_mtime(e), want[i].path,
				 want[i].type, want[i].perm);
			goto out;
		}
		if (want[i].type == AE_IFCHR &&
		    (archive_entry_rdevmajor(e) != 5 || archive_entry_rdevminor(e) != 1)) {
			snprintf(msg, sizeof(msg), "'%s' is %u:%u", name, (unsigned)archive_entry_rdevmajor(e),
				 (unsigned)archive_entry_rdevminor(e));
			goto out;
		}
		n = archive_read_data(a, buf, sizeof(buf) - 1);
		buf[n > 0 ? n : 0] = '\0';
		if (want[i].data && strcmp(buf, want[i].data)) {
			snprintf(msg, sizeof(msg), "'%s' holds '%.100s', expected '%.100s'", name, buf, want[i].data);
			goto out;
		}
		i++;
	}
	if (r != ARCHIVE_EOF)
		snprintf(msg, sizeof(msg), "cannot read: %s", archive_error_string(a));
	else if (i != nwant)
		snprintf(msg, sizeof(msg), "%zu entries, expected %zu", i, nwant);
out:
	archive_read_free(a);
	return msg[0] ? msg : NULL;
}

static bool same_bytes(const char *a, const char *b)
{
	size_t na = 0, nb = 0;
	char *x = slurp(a, &na), *y = slurp(b, &nb);
	bool same = x && y && na == nb && !memcmp(x, y, na);

	free(x);
	free(y);
	return same;
}

TEST(initramfs_entries_modes_and_same_bytes)
{
	char *dir = new_dir();
	char *moddir = ib_xasprintf("%s/mods", dir), *init = ib_xasprintf("%s/init", dir);
	char *out1 = ib_xasprintf("%s/a.cpio", dir), *out2 = ib_xasprintf("%s/b.cpio", dir);
	ib_vm_kernel k = { .version = (char *)"9.9", .moddir = moddir };
	const struct want_entry want[] = {
		{ "dev", AE_IFDIR, 0755, NULL },
		{ "dev/console", AE_IFCHR, 0600, NULL },
		{ "init", AE_IFREG, 0755, "#!/bin/sh\necho hi\n" },
		{ "lib", AE_IFDIR, 0755, NULL },
		{ "lib/modules", AE_IFDIR, 0755, NULL },
		{ "lib/modules/virtio.ko", AE_IFREG, 0644, "AAA" },
		{ "lib/modules/virtio_blk.ko", AE_IFREG, 0644, "BBBB" },
		{ "mnt", AE_IFDIR, 0755, NULL },
		{ "proc", AE_IFDIR, 0755, NULL },
		{ "run", AE_IFDIR, 0755, NULL },
		{ "sys", AE_IFDIR, 0755, NULL },
		{ "tmp", AE_IFDIR, 01777, NULL },
		{ "modules", AE_IFREG, 0644, "virtio.ko\nvirtio_blk.ko\n" },
	};
	const char *msg;

	ASSERT_TRUE(put(moddir, "virtio.ko", "AAA", 3, 0600));
	ASSERT_TRUE(put(moddir, "virtio_blk.ko", "BBBB", 4, 0600));
	ASSERT_TRUE(put(dir, "init", "#!/bin/sh\necho hi\n", 18, 0600));
	ib_strv_push(&k.modules, "virtio.ko");
	ib_strv_push(&k.modules, "virtio_blk.ko");
	ASSERT_INT_EQ(ib_vm_initramfs(&k, init, out1), 0);
	/* later files, other times: the same bytes */
	sleep(1);
	ASSERT_TRUE(put(dir, "init", "#!/bin/sh\necho hi\n", 18, 0700));
	ASSERT_INT_EQ(ib_vm_initramfs(&k, init, out2), 0);
	ASSERT_TRUE(same_bytes(out1, out2));
	msg = check_cpio(out1, want, sizeof(want) / sizeof(want[0]));
	if (msg)
		IB_FAIL_("%s", msg);

	/* all built in: no module files, an empty /modules */
	ib_strv_free(&k.modules);
	k.moddir = NULL;
	ASSERT_INT_EQ(ib_vm_initramfs(&k, init, out2), 0);
	const struct want_entry bare[] = {
		want[0], want[1], want[2], want[3], want[4], want[7], want[8], want[9], want[10], want[11],
		{ "modules", AE_IFREG, 0644, "" },
	};
	msg = check_cpio(out2, bare, sizeof(bare) / sizeof(bare[0]));
	if (msg)
		IB_FAIL_("%s", msg);
	ib_rm_rf(dir);
	free(dir);
	free(moddir);
	free(init);
	free(out1);
	free(out2);
}

TEST(initramfs_refuses_bad_module_names)
{
	char *dir = new_dir();
	char *init = ib_xasprintf("%s/init", dir), *out = ib_xasprintf("%s/x.cpio", dir);
	ib_vm_kernel k = { .version = (char *)"9.9", .moddir = dir };

	ASSERT_TRUE(put(dir, "init", "x", 1, 0755));
	ib_strv_push(&k.modules, "../init");
	ASSERT_TRUE(ib_vm_initramfs(&k, init, out) < 0);
	ASSERT_STR_CONTAINS(ib_error_last(), "not a module file name");
	ASSERT_TRUE(access(out, F_OK) < 0);
	ib_strv_free(&k.modules);
	ib_strv_push(&k.modules, "missing.ko");
	ASSERT_TRUE(ib_vm_initramfs(&k, init, out) < 0);
	ASSERT_STR_CONTAINS(ib_error_last(), "missing.ko");
	ASSERT_TRUE(access(out, F_OK) < 0);
	ib_strv_free(&k.modules);
	ib_rm_rf(dir);
	free(dir);
	free(init);
	free(out);
}

/* ---- the .deb unpacker ---- */

/* The names in dir, sorted, one per line. */
static char *listing(const char *dir)
{
	ib_strv names = IB_STRV_INIT;
	ib_buf b = IB_BUF_INIT;
	DIR *d = opendir(dir);
	struct dirent *de;

	if (!d)
		return ib_xstrdup("(none)");
	while ((de = readdir(d)))
		if (de->d_name[0] != '.')
			ib_strv_push(&names, de->d_name);
	closedir(d);
	for (size_t i = 0; i < names.n; i++)
		for (size_t j = i + 1; j < names.n; j++)
			if (strcmp(names.v[i], names.v[j]) > 0) {
				char *t = names.v[i];
				names.v[i] = names.v[j];
				names.v[j] = t;
			}
	for (size_t i = 0; i < names.n; i++)
		ib_buf_printf(&b, "%s\n", names.v[i]);
	ib_strv_free(&names);
	return b.ptr ? ib_buf_detach(&b) : ib_xstrdup("");
}

TEST(deb_modules_in_dependency_order)
{
	char *dir, *deb, *dest, *s, *init, *cpio;
	ib_vm_kernel k = { 0 };
	ib_buf want = IB_BUF_INIT;

	if (!have_dpkg_deb()) {
		printf("skip: no dpkg-deb to make the test package\n");
		return;
	}
	dir = new_dir();
	dest = ib_xasprintf("%s/kernel", dir);
	deb = make_deb(dir, "all", "xz", config_all, modules_all, sizeof(modules_all) / sizeof(modules_all[0]));
	ASSERT_TRUE(deb != NULL);
	if (ib_vm_kernel_from_deb(&k, deb, dest) < 0)
		IB_FAIL_("ib_vm_kernel_from_deb: %s", ib_error_last());
	ASSERT_STR_EQ(k.version, KVER);
	s = ib_xasprintf("%s/vmlinuz", dest);
	ASSERT_STR_EQ(k.vmlinuz, s);
	free(s);
	s = slurp(k.vmlinuz, NULL);
	ASSERT_STR_EQ(s, "fake kernel image");
	free(s);
	s = ib_xasprintf("%s/modules", dest);
	ASSERT_STR_EQ(k.moddir, s);
	free(s);
	ASSERT_INT_EQ(k.modules.n, NORDER);
	for (size_t i = 0; i < NORDER; i++) {
		ASSERT_STR_EQ(k.modules.v[i], order_all[i]);
		ib_buf_printf(&want, "%s\n", order_all[i]);
	}
	/* only what the order needs: not the built-in virtio_pci and virtio_console, not dummy */
	s = listing(k.moddir);
	ASSERT_STR_EQ(s, "failover.ko\nnet_failover.ko\noverlay.ko\novl_helper.ko\nvirtio.ko\nvirtio_blk.ko\n"
			 "virtio_mmio.ko\n"
			 "virtio_net.ko\nvirtio_ring.ko\n");
	free(s);
	s = listing(dest);
	ASSERT_STR_EQ(s, "config\nmodules\nmodules.order\nversion\nvmlinuz\n");
	free(s);
	s = ib_xasprintf("%s/modules.order", dest);
	char *order = slurp(s, NULL);
	free(s);
	ASSERT_STR_EQ(order, want.ptr);
	free(order);
	s = ib_xasprintf("%s/net_failover.ko", k.moddir);
	char *nf = slurp(s, NULL);
	free(s);
	ASSERT_STR_EQ(nf, "nf");
	free(nf);
	s = ib_xasprintf("%s/ovl_helper.ko", k.moddir);
	nf = slurp(s, NULL);
	free(s);
	ASSERT_STR_EQ(nf, "helper");
	free(nf);

	/* a destination that exists is refused */
	ib_vm_kernel again = { 0 };
	ASSERT_TRUE(ib_vm_kernel_from_deb(&again, deb, dest) < 0);
	ASSERT_TRUE(again.version == NULL);

	/* and the initramfs of it */
	init = ib_xasprintf("%s/init", dir);
	cpio = ib_xasprintf("%s/initrd", dir);
	ASSERT_TRUE(put(dir, "init", "#!/bin/sh\n", 10, 0755));
	ASSERT_INT_EQ(ib_vm_initramfs(&k, init, cpio), 0);
	struct want_entry ents[32] = {
		{ "dev", AE_IFDIR, 0755, NULL }, { "dev/console", AE_IFCHR, 0600, NULL },
		{ "init", AE_IFREG, 0755, "#!/bin/sh\n" }, { "lib", AE_IFDIR, 0755, NULL },
		{ "lib/modules", AE_IFDIR, 0755, NULL },
	};
	char paths[NORDER][64];
	size_t n = 5;
	for (size_t i = 0; i < NORDER; i++) {
		snprintf(paths[i], sizeof(paths[i]), "lib/modules/%s", order_all[i]);
		ents[n++] = (struct want_entry){ paths[i], AE_IFREG, 0644, NULL };
	}
	ents[n++] = (struct want_entry){ "mnt", AE_IFDIR, 0755, NULL };
	ents[n++] = (struct want_entry){ "proc", AE_IFDIR, 0755, NULL };
	ents[n++] = (struct want_entry){ "run", AE_IFDIR, 0755, NULL };
	ents[n++] = (struct want_entry){ "sys", AE_IFDIR, 0755, NULL };
	ents[n++] = (struct want_entry){ "tmp", AE_IFDIR, 01777, NULL };
	ents[n++] = (struct want_entry){ "modules", AE_IFREG, 0644, want.ptr };
	const char *msg = check_cpio(cpio, ents, n);
	if (msg)
		IB_FAIL_("%s", msg);

	ib_vm_kernel_clear(&k);
	ib_vm_kernel_clear(&k);
	ib_vm_kernel_clear(NULL);
	ib_buf_free(&want);
	ib_rm_rf(dir);
	free(dir);
	free(deb);
	free(dest);
	free(init);
	free(cpio);
}

TEST(deb_all_built_in)
{
	static const char config[] = "CONFIG_VIRTIO_PCI=y\nCONFIG_VIRTIO_MMIO=y\nCONFIG_VIRTIO_BLK=y\n"
				     "CONFIG_VIRTIO_NET=y\nCONFIG_VIRTIO_CONSOLE=y\nCONFIG_OVERLAY_FS=y\n";
	static const struct fake files[] = { FAKE(MODS "drivers/net/dummy.ko", "depends=\0") };
	char *dir, *deb, *dest;
	ib_vm_kernel k = { 0 };

	if (!have_dpkg_deb()) {
		printf("skip: no dpkg-deb to make the test package\n");
		return;
	}
	dir = new_dir();
	dest = ib_xasprintf("%s/kernel", dir);
	deb = make_deb(dir, "builtin", "none", config, files, 1);
	ASSERT_TRUE(deb != NULL);
	if (ib_vm_kernel_from_deb(&k, deb, dest) < 0)
		IB_FAIL_("ib_vm_kernel_from_deb: %s", ib_error_last());
	ASSERT_TRUE(k.moddir == NULL);
	ASSERT_INT_EQ(k.modules.n, 0);
	ib_vm_kernel_clear(&k);
	ib_rm_rf(dir);
	free(dir);
	free(deb);
	free(dest);
}

/* The error of unpacking a package made of config and files; dest is left absent. */
static char *deb_error(const char *comp, const char *config, const struct fake *files, size_t n)
{
	char *dir = new_dir(), *dest = ib_xasprintf("%s/kernel", dir), *deb, *msg = NULL;
	ib_vm_kernel k = { 0 };

	deb = make_deb(dir, "bad", comp, config, files, n);
	if (!deb)
		msg = ib_xstrdup("(dpkg-deb failed)");
	else if (ib_vm_kernel_from_deb(&k, deb, dest) == 0)
		msg = ib_xstrdup("(no error)");
	else if (access(dest, F_OK) == 0)
		msg = ib_xstrdup("(the destination was left behind)");
	else
		msg = ib_xstrdup(ib_error_last());
	ib_vm_kernel_clear(&k);
	ib_rm_rf(dir);
	free(dir);
	free(dest);
	free(deb);
	return msg;
}

TEST(deb_refusals)
{
	static const char blk_only[] = "CONFIG_VIRTIO_PCI=y\nCONFIG_VIRTIO_MMIO=y\nCONFIG_VIRTIO_BLK=m\n"
				       "CONFIG_VIRTIO_NET=y\nCONFIG_VIRTIO_CONSOLE=y\nCONFIG_OVERLAY_FS=y\n";
	static const struct fake compressed[] = {
		FAKE(MODS "drivers/block/virtio_blk.ko.xz", "\xfd" "7zXZ compressed"),
	};
	static const struct fake missing[] = {
		FAKE(MODS "drivers/block/virtio_blk.ko", "depends=virtio,virtio_gone\0"),
		FAKE(MODS "drivers/virtio/virtio.ko", "depends=\0"),
	};
	static const struct fake cycle[] = {
		FAKE(MODS "drivers/block/virtio_blk.ko", "depends=virtio\0"),
		FAKE(MODS "drivers/virtio/virtio.ko", "depends=virtio_ring\0"),
		FAKE(MODS "drivers/virtio/virtio_ring.ko", "depends=virtio\0"),
	};
	static const struct fake twice[] = {
		FAKE(MODS "drivers/block/virtio_blk.ko", "depends=\0"),
		FAKE(MODS "extra/virtio-blk.ko", "depends=\0"),
	};
	static const struct fake bad_dep[] = {
		FAKE(MODS "drivers/block/virtio_blk.ko", "depends=../../etc\0"),
	};
	static const char no_console[] = "CONFIG_VIRTIO_PCI=y\nCONFIG_VIRTIO_MMIO=y\nCONFIG_VIRTIO_BLK=y\n"
					 "CONFIG_VIRTIO_NET=y\n# CONFIG_VIRTIO_CONSOLE is not set\n"
					 "CONFIG_OVERLAY_FS=y\n";
	char *msg;

	if (!have_dpkg_deb()) {
		printf("skip: no dpkg-deb to make the test packages\n");
		return;
	}
	msg = deb_error("gzip", blk_only, compressed, 1);
	ASSERT_STR_CONTAINS(msg, "compressed");
	ASSERT_STR_CONTAINS(msg, "virtio_blk");
	free(msg);
	msg = deb_error("zstd", blk_only, missing, 2);
	ASSERT_STR_CONTAINS(msg, "'virtio_gone', which 'virtio_blk' needs, is not in");
	free(msg);
	msg = deb_error("xz", blk_only, cycle, 3);
	ASSERT_STR_CONTAINS(msg, "cycle");
	free(msg);
	msg = deb_error("xz", blk_only, twice, 2);
	ASSERT_STR_CONTAINS(msg, "two modules named 'virtio_blk'");
	free(msg);
	msg = deb_error("xz", blk_only, bad_dep, 1);
	ASSERT_STR_CONTAINS(msg, "not a module name");
	free(msg);
	msg = deb_error("xz", no_console, NULL, 0);
	ASSERT_STR_CONTAINS(msg, "CONFIG_VIRTIO_CONSOLE");
	free(msg);
}

/*
 * A little ELF64 object as a module is: a .rodata with a decoy
 * "depends=" string, then .modinfo with modinfo (len bytes), then the
 * section names and the section headers.
 */
static char *elf_module(size_t *out_len, const char *modinfo, size_t len)
{
	static const char rodata[] = "\0depends=virtio_gone\0";
	static const char names[] = "\0.rodata\0.modinfo\0.shstrtab\0";
	ib_buf b = IB_BUF_INIT;
	Elf64_Ehdr eh = { 0 };
	Elf64_Shdr sh[4] = { { 0 } };
	size_t ro = sizeof(eh), mi = ro + sizeof(rodata) - 1, st = mi + len, shoff = (st + sizeof(names) + 7) & ~7ul;

	memcpy(eh.e_ident, ELFMAG, SELFMAG);
	eh.e_ident[EI_CLASS] = ELFCLASS64;
	eh.e_ident[EI_DATA] = ELFDATA2LSB;
	eh.e_ident[EI_VERSION] = EV_CURRENT;
	eh.e_type = ET_REL;
	eh.e_machine = EM_X86_64;
	eh.e_version = EV_CURRENT;
	eh.e_ehsize = sizeof(eh);
	eh.e_shoff = shoff;
	eh.e_shentsize = sizeof(Elf64_Shdr);
	eh.e_shnum = 4;
	eh.e_shstrndx = 3;
	sh[1] = (Elf64_Shdr){ .sh_name = 1, .sh_type = SHT_PROGBITS, .sh_offset = ro, .sh_size = sizeof(rodata) - 1 };
	sh[2] = (Elf64_Shdr){ .sh_name = 9, .sh_type = SHT_PROGBITS, .sh_offset = mi, .sh_size = len };
	sh[3] = (Elf64_Shdr){ .sh_name = 18, .sh_type = SHT_STRTAB, .sh_offset = st, .sh_size = sizeof(names) - 1 };
	ib_buf_add(&b, &eh, sizeof(eh));
	ib_buf_add(&b, rodata, sizeof(rodata) - 1);
	ib_buf_add(&b, modinfo, len);
	ib_buf_add(&b, names, sizeof(names) - 1);
	while (b.len < shoff)
		ib_buf_add(&b, "", 1);
	ib_buf_add(&b, sh, sizeof(sh));
	*out_len = b.len;
	return ib_buf_detach(&b);
}

TEST(deb_reads_the_elf_modinfo_section)
{
	static const char config[] = "CONFIG_VIRTIO_PCI=y\nCONFIG_VIRTIO_MMIO=y\nCONFIG_VIRTIO_BLK=m\n"
				     "CONFIG_VIRTIO_NET=y\nCONFIG_VIRTIO_CONSOLE=y\nCONFIG_OVERLAY_FS=y\n";
	static const char modinfo[] = "license=GPL\0depends=virtio\0name=virtio_blk\0";
	struct fake files[2] = { FAKE(MODS "drivers/virtio/virtio.ko", "depends=\0") };
	char *dir, *deb, *dest, *elf;
	ib_vm_kernel k = { 0 };
	size_t len;

	if (!have_dpkg_deb()) {
		printf("skip: no dpkg-deb to make the test package\n");
		return;
	}
	elf = elf_module(&len, modinfo, sizeof(modinfo) - 1);
	files[1] = (struct fake){ MODS "drivers/block/virtio_blk.ko", elf, len };
	dir = new_dir();
	dest = ib_xasprintf("%s/kernel", dir);
	deb = make_deb(dir, "elf", "xz", config, files, 2);
	ASSERT_TRUE(deb != NULL);
	/* the decoy in .rodata would name a module the package lacks */
	if (ib_vm_kernel_from_deb(&k, deb, dest) < 0)
		IB_FAIL_("ib_vm_kernel_from_deb: %s", ib_error_last());
	ASSERT_INT_EQ(k.modules.n, 2);
	ASSERT_STR_EQ(k.modules.v[0], "virtio.ko");
	ASSERT_STR_EQ(k.modules.v[1], "virtio_blk.ko");
	ib_vm_kernel_clear(&k);
	ib_rm_rf(dir);
	free(dir);
	free(deb);
	free(dest);
	free(elf);
}

/* ---- the cache ---- */

static size_t count_tmp(const char *archdir)
{
	DIR *d = opendir(archdir);
	struct dirent *de;
	size_t n = 0;

	if (!d)
		return 0;
	while ((de = readdir(d)))
		if (!strncmp(de->d_name, "tmp.", 4))
			n++;
	closedir(d);
	return n;
}

TEST(get_deb_unpacked_once_into_the_cache)
{
	char *dir, *cache, *deb, *archdir, *prefix;
	ib_vm_kernel k = { 0 }, k2 = { 0 };
	struct stat st1, st2;

	if (!have_dpkg_deb()) {
		printf("skip: no dpkg-deb to make the test package\n");
		return;
	}
	dir = new_dir();
	cache = ib_xasprintf("%s/cache", dir);
	archdir = ib_xasprintf("%s/vm/amd64", cache);
	deb = make_deb(dir, "all", "xz", config_all, modules_all, sizeof(modules_all) / sizeof(modules_all[0]));
	ASSERT_TRUE(deb != NULL);
	/* a crashed unpacking's leftovers go */
	ASSERT_TRUE(put(archdir, "tmp.dead01/kernel/vmlinuz", "x", 1, 0644));
	if (ib_vm_kernel_get(&k, cache, "amd64", deb, 0) < 0)
		IB_FAIL_("ib_vm_kernel_get: %s", ib_error_last());
	prefix = ib_xasprintf("%s/deb-", archdir);
	ASSERT_TRUE(!strncmp(k.vmlinuz, prefix, strlen(prefix)));
	ASSERT_STR_EQ(k.version, KVER);
	ASSERT_INT_EQ(k.modules.n, NORDER);
	ASSERT_INT_EQ(count_tmp(archdir), 0);
	ASSERT_INT_EQ(stat(k.vmlinuz, &st1), 0);
	if (ib_vm_kernel_get(&k2, cache, "amd64", deb, 0) < 0)
		IB_FAIL_("ib_vm_kernel_get again: %s", ib_error_last());
	ASSERT_STR_EQ(k2.vmlinuz, k.vmlinuz);
	ASSERT_INT_EQ(stat(k2.vmlinuz, &st2), 0);
	ASSERT_INT_EQ(st1.st_ino, st2.st_ino); /* not unpacked again */
	ASSERT_INT_EQ(k2.modules.n, NORDER);
	/* a broken entry of the cache is made again */
	ASSERT_INT_EQ(unlink(k.vmlinuz), 0);
	ib_vm_kernel_clear(&k2);
	if (ib_vm_kernel_get(&k2, cache, "amd64", deb, 0) < 0)
		IB_FAIL_("ib_vm_kernel_get after damage: %s", ib_error_last());
	ASSERT_INT_EQ(stat(k2.vmlinuz, &st2), 0);
	ib_vm_kernel_clear(&k);
	ib_vm_kernel_clear(&k2);
	ib_rm_rf(dir);
	free(dir);
	free(cache);
	free(deb);
	free(archdir);
	free(prefix);
}

TEST(get_current_needs_no_apt)
{
	char *dir, *cache, *deb, *archdir, *dest, *path = NULL;
	ib_vm_kernel k = { 0 };
	const char *old = getenv("PATH");
	char *saved = old ? ib_xstrdup(old) : NULL;
	int err;

	if (!have_dpkg_deb()) {
		printf("skip: no dpkg-deb to make the test package\n");
		free(saved);
		return;
	}
	dir = new_dir();
	cache = ib_xasprintf("%s/cache", dir);
	archdir = ib_xasprintf("%s/vm/amd64", cache);
	dest = ib_xasprintf("%s/" KVER, archdir);
	deb = make_deb(dir, "all", "xz", config_all, modules_all, sizeof(modules_all) / sizeof(modules_all[0]));
	ASSERT_TRUE(deb != NULL);
	ASSERT_INT_EQ(ib_mkdir_p(archdir, 0755), 0);

	/* nothing in the cache and no apt to run: an error naming apt, nothing left behind */
	setenv("PATH", "/nonexistent", 1);
	err = ib_vm_kernel_get(&k, cache, "amd64", NULL, 0);
	if (saved)
		setenv("PATH", saved, 1);
	ASSERT_TRUE(err < 0);
	ASSERT_STR_CONTAINS(ib_error_last(), "apt");
	ASSERT_TRUE(k.version == NULL);
	ASSERT_INT_EQ(count_tmp(archdir), 0);

	/* what an earlier fetch left: used with no apt */
	if (ib_vm_kernel_from_deb(&k, deb, dest) < 0)
		IB_FAIL_("ib_vm_kernel_from_deb: %s", ib_error_last());
	ib_vm_kernel_clear(&k);
	path = ib_xasprintf("%s/current", archdir);
	ASSERT_TRUE(put(archdir, "current", KVER "\n", strlen(KVER) + 1, 0644));
	setenv("PATH", "/nonexistent", 1);
	err = ib_vm_kernel_get(&k, cache, "amd64", NULL, 0);
	if (saved)
		setenv("PATH", saved, 1);
	if (err < 0)
		IB_FAIL_("ib_vm_kernel_get: %s", ib_error_last());
	ASSERT_STR_EQ(k.version, KVER);
	ASSERT_INT_EQ(k.modules.n, NORDER);
	ASSERT_STR_EQ(k.modules.v[0], "virtio.ko");
	ib_vm_kernel_clear(&k);
	ib_rm_rf(dir);
	free(dir);
	free(cache);
	free(deb);
	free(archdir);
	free(dest);
	free(path);
	free(saved);
}

TEST(get_bare_image)
{
	char *dir = new_dir(), *img = ib_xasprintf("%s/bzImage", dir), *cache = ib_xasprintf("%s/cache", dir);
	unsigned char hdr[0x400] = { 0 };
	ib_vm_kernel k = { 0 };

	/* an x86 setup header: "HdrS", and the version string's offset (from 0x200) */
	memcpy(hdr + 0x202, "HdrS", 4);
	hdr[0x20e] = 0x00;
	hdr[0x20f] = 0x01;
	memcpy(hdr + 0x300, "6.6.6-bare (someone@somewhere) #1 SMP", 37);
	ASSERT_TRUE(put(dir, "bzImage", hdr, sizeof(hdr), 0644));
	if (ib_vm_kernel_get(&k, cache, "amd64", img, 0) < 0)
		IB_FAIL_("ib_vm_kernel_get: %s", ib_error_last());
	ASSERT_STR_EQ(k.version, "6.6.6-bare");
	ASSERT_STR_EQ(k.vmlinuz, img);
	ASSERT_TRUE(k.moddir == NULL);
	ASSERT_INT_EQ(k.modules.n, 0);
	ib_vm_kernel_clear(&k);
	/* not bzImage (an ELF vmlinux, say): named by its file */
	ASSERT_TRUE(put(dir, "vmlinux", "\x7f" "ELF", 4, 0644));
	free(img);
	img = ib_xasprintf("%s/vmlinux", dir);
	ASSERT_INT_EQ(ib_vm_kernel_get(&k, cache, "amd64", img, 0), 0);
	ASSERT_STR_EQ(k.version, "vmlinux");
	ib_vm_kernel_clear(&k);
	/* a kernel that is not there */
	free(img);
	img = ib_xasprintf("%s/nothing", dir);
	ASSERT_TRUE(ib_vm_kernel_get(&k, cache, "amd64", img, 0) < 0);
	ASSERT_STR_CONTAINS(ib_error_last(), "nothing");
	ib_rm_rf(dir);
	free(dir);
	free(img);
	free(cache);
}

TEST(get_other_arch_refused)
{
	ib_vm_kernel k = { 0 };

	ASSERT_INT_EQ(ib_vm_kernel_get(&k, "/nonexistent", "arm64", NULL, 0), IB_EINVALID);
	ASSERT_STR_CONTAINS(ib_error_last(), "'arm64'");
	ASSERT_TRUE(k.version == NULL);
}

RUN_TESTS()

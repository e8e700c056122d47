#include "builder/vmkernel.h"

#include <archive.h>
#include <archive_entry.h>
#include <dirent.h>
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "builder/proc.h"
#include "lib/hash.h"
#include "lib/util.h"

/*
 * Bounds on what a kernel package may make us hold or write.  No user
 * sets these (a package from the mirror, or one the operator names), so
 * they live here rather than in limits.h.
 */
#define VMK_CONFIG_MAX		(8 << 20)	/* boot/config-<version> */
#define VMK_IMAGE_MAX		(512LL << 20)	/* boot/vmlinuz-<version> */
#define VMK_MODULE_MAX		(128 << 20)	/* one .ko, read whole to find its .modinfo */
#define VMK_INIT_MAX		(256LL << 20)	/* the init put into the initramfs */
#define VMK_PACKAGE_MODULES_MAX	65536		/* .ko files in one package */
#define VMK_NEEDED_MAX		256		/* modules in the initramfs */
#define VMK_NAME_MAX		55		/* a module name (the kernel's MODULE_NAME_LEN - 1) */
#define VMK_VERSION_MAX		128		/* a kernel version string */
#define VMK_APT_OUTPUT_MAX	(64 * 1024)	/* apt's output kept for a message */
#define VMK_LOCK_POLL_NS	50000000L	/* waiting for another process's fetch */

/* What a microvm guest needs, by module name and the config symbol that makes it. */
static const struct {
	const char *module;
	const char *symbol;
} wanted[] = {
	{ "virtio_pci", "CONFIG_VIRTIO_PCI" },
	{ "virtio_mmio", "CONFIG_VIRTIO_MMIO" },
	{ "virtio_blk", "CONFIG_VIRTIO_BLK" },
	{ "virtio_net", "CONFIG_VIRTIO_NET" },
	{ "virtio_console", "CONFIG_VIRTIO_CONSOLE" },
	{ "overlay", "CONFIG_OVERLAY_FS" },
};
#define NWANTED (sizeof(wanted) / sizeof(wanted[0]))

/*
 * What those depend on in Debian's kernels, kept in the first pass over a
 * package so that a second is rarely needed (net_failover.ko is listed
 * before virtio_net.ko, which names it).  Only a guess: the order comes
 * from the modules' own depends=.
 */
static const char *const likely[] = {
	"virtio", "virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "failover", "net_failover",
};

void ib_vm_kernel_clear(ib_vm_kernel *k)
{
	if (!k)
		return;
	free(k->version);
	free(k->vmlinuz);
	free(k->moddir);
	ib_strv_free(&k->modules);
	*k = (ib_vm_kernel){ 0 };
}

/* A kernel version as it names files and directories: "6.1.0-57-cloud-amd64". */
static bool version_ok(const char *s)
{
	size_t n = strlen(s);

	if (!n || n > VMK_VERSION_MAX || *s == '.' || *s == '-')
		return false;
	return strspn(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.+_-~") == n;
}

/* A module name as the kernel has it: '-' in file names is '_' (as modprobe maps it). */
static bool module_name(char out[VMK_NAME_MAX + 1], const char *s, size_t n)
{
	if (!n || n > VMK_NAME_MAX)
		return false;
	for (size_t i = 0; i < n; i++) {
		char c = s[i] == '-' ? '_' : s[i];
		if (!(c == '_' || (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')))
			return false;
		out[i] = c;
	}
	out[n] = '\0';
	return true;
}

/* "NAME.ko", with NAME a module name: a file name in moddir and in the initramfs. */
static bool module_file_ok(const char *f)
{
	char name[VMK_NAME_MAX + 1];
	size_t n = strlen(f);

	return n > 3 && !strcmp(f + n - 3, ".ko") && module_name(name, f, n - 3) && !strncmp(name, f, n - 3);
}

/* ---- the module information of a .ko ---- */

/* The .modinfo section of an ELF64 little-endian object, if it is one with that section. */
static bool modinfo_section(const char *data, size_t len, size_t *off, size_t *size)
{
	Elf64_Ehdr eh;
	Elf64_Shdr sh, strsh;

	if (len < sizeof(eh) || memcmp(data, ELFMAG, SELFMAG) || data[EI_CLASS] != ELFCLASS64 ||
	    data[EI_DATA] != ELFDATA2LSB || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__)
		return false;
	memcpy(&eh, data, sizeof(eh));
	if (eh.e_shentsize != sizeof(Elf64_Shdr) || eh.e_shstrndx >= eh.e_shnum || eh.e_shoff > len ||
	    (len - eh.e_shoff) / sizeof(Elf64_Shdr) < eh.e_shnum)
		return false;
	memcpy(&strsh, data + eh.e_shoff + (size_t)eh.e_shstrndx * sizeof(Elf64_Shdr), sizeof(strsh));
	if (strsh.sh_offset > len || strsh.sh_size > len - strsh.sh_offset)
		return false;
	for (size_t i = 0; i < eh.e_shnum; i++) {
		memcpy(&sh, data + eh.e_shoff + i * sizeof(Elf64_Shdr), sizeof(sh));
		if (sh.sh_name >= strsh.sh_size || strsh.sh_size - sh.sh_name < sizeof(".modinfo"))
			continue;
		if (memcmp(data + strsh.sh_offset + sh.sh_name, ".modinfo", sizeof(".modinfo")))
			continue;
		if (sh.sh_offset > len || sh.sh_size > len - sh.sh_offset)
			return false;
		*off = sh.sh_offset;
		*size = sh.sh_size;
		return true;
	}
	return false;
}

/*
 * The "depends=" value of a module (NUL-separated key=value strings in its
 * .modinfo section; the whole file when that cannot be found): a new
 * string, "" for none.
 */
static char *module_depends(const char *data, size_t len)
{
	static const char key[] = "depends=";
	size_t off = 0, size = len, at = 0;

	if (modinfo_section(data, len, &off, &size)) {
		data += off;
		len = size;
	}
	while (at < len) {
		const char *p = memmem(data + at, len - at, key, sizeof(key) - 1);
		const char *v, *end;

		if (!p)
			break;
		at = (size_t)(p - data) + 1;
		if (p != data && p[-1] != '\0')
			continue;
		v = p + sizeof(key) - 1;
		end = memchr(v, '\0', len - (size_t)(v - data));
		if (end)
			return ib_xstrndup(v, (size_t)(end - v));
	}
	return ib_xstrdup("");
}

/* ---- unpacking a linux-image .deb ---- */

typedef struct vmk_mod {
	char *name;      /* module name ('_' for '-') */
	char *member;    /* its path in the package, to find it again */
	char *kver;      /* the lib/modules/<kver> it is in */
	char *depends;   /* its .modinfo depends= (comma-separated); NULL: not read */
	const char *ext; /* "" for NAME.ko, else the compression (".xz") */
	bool too_large;
	bool saved;      /* written as modules/NAME.ko */
	int mark;        /* resolution: 0 not seen, 1 on the current path, 2 in the order */
} vmk_mod;

typedef struct vmk_deb {
	const char *path;  /* the .deb, for messages */
	int dirfd;         /* the destination */
	double deadline;
	char *version;     /* from boot/vmlinuz-<version> */
	char *config_ver;  /* from boot/config-<version> */
	char *config;
	size_t config_len;
	vmk_mod *mods;
	size_t nmods, cap;
	ib_strv order;     /* module names, dependencies first */
	ib_strv named;     /* what the modules kept so far depend on */
	size_t pending;    /* second pass: modules of the order not yet written */
	ib_buf data;       /* one member's bytes */
	char chunk[1 << 16];
} vmk_deb;

static void deb_free(vmk_deb *d)
{
	for (size_t i = 0; i < d->nmods; i++) {
		free(d->mods[i].name);
		free(d->mods[i].member);
		free(d->mods[i].kver);
		free(d->mods[i].depends);
	}
	free(d->mods);
	free(d->version);
	free(d->config_ver);
	free(d->config);
	ib_strv_free(&d->order);
	ib_strv_free(&d->named);
	ib_buf_free(&d->data);
}

static vmk_mod *find_module(vmk_deb *d, const char *name)
{
	for (size_t i = 0; i < d->nmods; i++)
		if (!strcmp(d->mods[i].name, name))
			return &d->mods[i];
	return NULL;
}

/*
 * Worth keeping in the first pass: a wanted module, a likely dependency,
 * or one a kept module depends on.  (Packages list a directory's files by name, and dependents
 * often come first: virtio_pci.ko before virtio_pci_modern_dev.ko, drivers/
 * before net/.  What this misses, the second pass fetches.)
 */
static bool keep_early(const vmk_deb *d, const char *name)
{
	for (size_t i = 0; i < NWANTED; i++)
		if (!strcmp(wanted[i].module, name))
			return true;
	for (size_t i = 0; i < sizeof(likely) / sizeof(likely[0]); i++)
		if (!strcmp(likely[i], name))
			return true;
	for (size_t i = 0; i < d->named.n; i++)
		if (!strcmp(d->named.v[i], name))
			return true;
	return false;
}

/* Remember the names a kept module depends on (those that are names at all). */
static void note_depends(vmk_deb *d, const char *depends)
{
	for (const char *p = depends; *p;) {
		size_t n = strcspn(p, ",");
		char dep[VMK_NAME_MAX + 1];

		if (d->named.n < VMK_NEEDED_MAX && module_name(dep, p, n) && !keep_early(d, dep))
			ib_strv_push(&d->named, dep);
		p += n;
		if (*p == ',')
			p++;
	}
}

/*
 * A file made here under dirfd: never an existing one, never through a
 * link.  The name is ours ("vmlinuz", "modules/virtio.ko"), not a path
 * from the package.
 */
static int create_at(vmk_deb *d, const char *name, int *out_fd)
{
	int fd = openat(d->dirfd, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);

	if (fd < 0)
		return ib_error_set_errno(errno, "cannot create '%s' from '%s'", name, d->path);
	*out_fd = fd;
	return 0;
}

static int finish_file(int fd, const char *name, int err)
{
	if (!err && fsync(fd) < 0)
		err = ib_error_set_errno(errno, "cannot write '%s'", name);
	if (close(fd) < 0 && !err)
		err = ib_error_set_errno(errno, "cannot write '%s'", name);
	return err;
}

static int write_bytes_at(vmk_deb *d, const char *name, const void *data, size_t len)
{
	int fd = -1, err;

	if ((err = create_at(d, name, &fd)) < 0)
		return err;
	if (ib_write_all(fd, data, len) < 0)
		err = ib_error_set_errno(errno, "cannot write '%s'", name);
	return finish_file(fd, name, err);
}

/* The current member's data, at most max bytes: into d->data, or to the file name when fd >= 0. */
static int read_member(vmk_deb *d, struct archive *a, const char *member, long long max, int fd)
{
	long long total = 0;
	la_ssize_t n;

	ib_buf_reset(&d->data);
	while ((n = archive_read_data(a, d->chunk, sizeof(d->chunk))) > 0) {
		total += n;
		if (total > max)
			return ib_error_set("'%s' in '%s' is larger than %lld bytes: refusing it", member, d->path,
					    max);
		if (fd < 0)
			ib_buf_add(&d->data, d->chunk, (size_t)n);
		else if (ib_write_all(fd, d->chunk, (size_t)n) < 0)
			return ib_error_set_errno(errno, "cannot write '%s' from '%s'", member, d->path);
	}
	if (n < 0)
		return ib_error_set("cannot read '%s' in '%s': %s", member, d->path, archive_error_string(a));
	return 0;
}

static int take_image(vmk_deb *d, struct archive *a, const char *member, const char *version)
{
	int fd = -1, err;

	if (!version_ok(version))
		return ib_error_set("'%s' holds a kernel image with an unusable name '%s'", d->path, member);
	if (d->version)
		return ib_error_set("'%s' holds two kernel images ('%s' and '%s'): refusing it", d->path, d->version,
				    version);
	if ((err = create_at(d, "vmlinuz", &fd)) < 0)
		return err;
	err = read_member(d, a, member, VMK_IMAGE_MAX, fd);
	if ((err = finish_file(fd, "vmlinuz", err)) < 0)
		return err;
	d->version = ib_xstrdup(version);
	return 0;
}

static int take_config(vmk_deb *d, struct archive *a, const char *member, const char *version)
{
	int err;

	if (d->config)
		return ib_error_set("'%s' holds two kernel configs: refusing it", d->path);
	if ((err = read_member(d, a, member, VMK_CONFIG_MAX, -1)) < 0)
		return err;
	if ((err = write_bytes_at(d, "config", d->data.ptr ? d->data.ptr : "", d->data.len)) < 0)
		return err;
	d->config_ver = ib_xstrdup(version);
	d->config_len = d->data.len;
	d->config = ib_buf_detach(&d->data);
	if (!d->config)
		d->config = ib_xstrdup("");
	return 0;
}

/* The module's data in d->data as modules/NAME.ko. */
static int save_module(vmk_deb *d, vmk_mod *m)
{
	char *name = ib_xasprintf("modules/%s.ko", m->name);
	int err = write_bytes_at(d, name, d->data.ptr ? d->data.ptr : "", d->data.len);

	free(name);
	if (!err)
		m->saved = true;
	return err;
}

/*
 * A module file of lib/modules/<kver>/ (or usr/lib/modules): its module
 * name, kver and compression; false for anything else.
 */
static bool module_member(const char *path, char name[VMK_NAME_MAX + 1], char **kver, const char **ext)
{
	static const char *const exts[] = { ".ko", ".ko.xz", ".ko.zst", ".ko.gz" };
	const char *p = path, *slash, *base;
	size_t n = 0;

	if (!strncmp(p, "usr/", 4))
		p += 4;
	if (strncmp(p, "lib/modules/", 12))
		return false;
	p += 12;
	if (!(slash = strchr(p, '/')))
		return false;
	base = strrchr(path, '/') + 1;
	for (size_t i = 0; i < sizeof(exts) / sizeof(exts[0]); i++) {
		size_t bl = strlen(base), el = strlen(exts[i]);
		if (bl > el && !strcmp(base + bl - el, exts[i])) {
			n = bl - el;
			*ext = exts[i] + 3;
			break;
		}
	}
	if (!n || !module_name(name, base, n))
		return false;
	*kver = ib_xstrndup(p, (size_t)(slash - p));
	return true;
}

/* First pass over a module: what it depends on; saved at once when it is one of the wanted. */
static int scan_module(vmk_deb *d, struct archive *a, struct archive_entry *e, const char *path)
{
	char name[VMK_NAME_MAX + 1];
	char *kver = NULL;
	const char *ext = "";
	vmk_mod *m;
	int err;

	if (!module_member(path, name, &kver, &ext))
		return 0;
	if (find_module(d, name)) {
		free(kver);
		return ib_error_set("'%s' holds two modules named '%s': refusing it", d->path, name);
	}
	if (d->nmods >= VMK_PACKAGE_MODULES_MAX) {
		free(kver);
		return ib_error_set("'%s' holds more than %d modules: refusing it", d->path, VMK_PACKAGE_MODULES_MAX);
	}
	if (d->nmods == d->cap) {
		d->cap = d->cap ? 2 * d->cap : 256;
		d->mods = ib_xrealloc(d->mods, d->cap * sizeof(*d->mods));
	}
	m = &d->mods[d->nmods++];
	*m = (vmk_mod){ .name = ib_xstrdup(name), .member = ib_xstrdup(path), .kver = kver, .ext = ext };
	if (*ext)
		return 0;
	if (archive_entry_size_is_set(e) && archive_entry_size(e) > VMK_MODULE_MAX) {
		m->too_large = true;
		return 0;
	}
	if ((err = read_member(d, a, path, VMK_MODULE_MAX, -1)) < 0)
		return err;
	m->depends = module_depends(d->data.ptr ? d->data.ptr : "", d->data.len);
	if (!keep_early(d, name))
		return 0;
	note_depends(d, m->depends);
	return save_module(d, m);
}

/* Second pass: a module of the order the first did not keep. */
static int fetch_module(vmk_deb *d, struct archive *a, const char *path)
{
	char name[VMK_NAME_MAX + 1];
	char *kver = NULL;
	const char *ext = "";
	vmk_mod *m;
	int err;

	if (!module_member(path, name, &kver, &ext))
		return 0;
	free(kver);
	m = find_module(d, name);
	if (!m || m->saved || m->mark != 2 || strcmp(m->member, path))
		return 0;
	if ((err = read_member(d, a, path, VMK_MODULE_MAX, -1)) < 0 || (err = save_module(d, m)) < 0)
		return err;
	d->pending--;
	return 0;
}

static int deb_member(vmk_deb *d, struct archive *a, struct archive_entry *e, int pass)
{
	const char *p = archive_entry_pathname(e);

	if (!p)
		return 0;
	while (p[0] == '.' && p[1] == '/')
		p += 2;
	while (*p == '/')
		p++;
	/* plain files only: a link or a device is never the file wanted */
	if (archive_entry_filetype(e) != AE_IFREG || archive_entry_hardlink(e))
		return 0;
	if (pass == 2)
		return fetch_module(d, a, p);
	if (!strncmp(p, "boot/vmlinuz-", 13))
		return take_image(d, a, p, p + 13);
	if (!strncmp(p, "boot/config-", 12))
		return take_config(d, a, p, p + 12);
	return scan_module(d, a, e, p);
}

/* The data.tar.* member of the ar archive, read as an archive of its own. */
struct nested {
	struct archive *outer;
	char buf[1 << 16];
};

static la_ssize_t nested_read(struct archive *a, void *arg, const void **buf)
{
	struct nested *n = arg;
	la_ssize_t r = archive_read_data(n->outer, n->buf, sizeof(n->buf));

	if (r < 0)
		archive_set_error(a, EIO, "%s", archive_error_string(n->outer));
	*buf = n->buf;
	return r;
}

static int deb_pass(vmk_deb *d, int pass)
{
	struct archive *outer = archive_read_new(), *inner = NULL;
	struct archive_entry *e;
	struct nested *nest = ib_xcalloc(1, sizeof(*nest));
	const char *member = NULL;
	int r, err = 0;

	nest->outer = outer;
	archive_read_support_format_ar(outer);
	if (archive_read_open_filename(outer, d->path, 1 << 16) != ARCHIVE_OK) {
		err = ib_error_set("cannot read '%s': %s", d->path, archive_error_string(outer));
		goto out;
	}
	while ((r = archive_read_next_header(outer, &e)) == ARCHIVE_OK || r == ARCHIVE_WARN) {
		const char *name = archive_entry_pathname(e);
		if (name && !strncmp(name, "data.tar", 8)) {
			member = name;
			break;
		}
	}
	if (!member) {
		if (r == ARCHIVE_EOF)
			err = ib_error_set("'%s' is not a Debian package: it has no data.tar member", d->path);
		else
			err = ib_error_set("cannot read '%s': %s", d->path, archive_error_string(outer));
		goto out;
	}
	inner = archive_read_new();
	archive_read_support_filter_all(inner);
	archive_read_support_format_tar(inner);
	if (archive_read_open(inner, nest, NULL, nested_read, NULL) != ARCHIVE_OK) {
		err = ib_error_set("cannot read '%s' in '%s': %s", member, d->path, archive_error_string(inner));
		goto out;
	}
	while ((r = archive_read_next_header(inner, &e)) == ARCHIVE_OK || r == ARCHIVE_WARN) {
		if (d->deadline > 0 && ib_now() >= d->deadline) {
			ib_error_set("unpacking '%s' timed out", d->path);
			err = IB_ETIMEOUT;
			goto out;
		}
		if ((err = deb_member(d, inner, e, pass)) < 0)
			goto out;
		if (pass == 2 && !d->pending)
			goto out;
	}
	if (r != ARCHIVE_EOF)
		err = ib_error_set("cannot read '%s' in '%s': %s", member, d->path, archive_error_string(inner));
out:
	if (inner)
		archive_read_free(inner);
	archive_read_free(outer);
	free(nest);
	return err;
}

/* 'y', 'm', or 0 (not set) for symbol in the kernel config. */
static char config_value(const char *config, size_t len, const char *symbol)
{
	size_t sl = strlen(symbol);
	const char *p = config, *end = config + len;

	while (p < end) {
		const char *nl = memchr(p, '\n', (size_t)(end - p));
		size_t n = nl ? (size_t)(nl - p) : (size_t)(end - p);

		if (n == sl + 2 && !strncmp(p, symbol, sl) && p[sl] == '=')
			return p[sl + 1] == 'y' || p[sl + 1] == 'm' ? p[sl + 1] : 0;
		p += n + 1;
	}
	return 0;
}

/* Put name into the order after what it depends on (depth first; a cycle is refused). */
static int resolve(vmk_deb *d, const char *name, const char *needed_by)
{
	vmk_mod *m = find_module(d, name);
	const char *p;

	if (!m) {
		if (needed_by)
			return ib_error_set("module '%s', which '%s' needs, is not in '%s'", name, needed_by, d->path);
		return ib_error_set("module '%s' is not in '%s'", name, d->path);
	}
	if (m->mark == 2)
		return 0;
	if (m->mark == 1)
		return ib_error_set("the modules of '%s' depend on each other in a cycle through '%s'", d->path, name);
	if (*m->ext)
		return ib_error_set("'%s' ships module '%s' compressed ('%s'): only uncompressed .ko modules are "
				    "supported", d->path, name, m->member);
	if (m->too_large)
		return ib_error_set("module '%s' in '%s' is larger than %d bytes: refusing it", m->member, d->path,
				    VMK_MODULE_MAX);
	if (strcmp(m->kver, d->version))
		return ib_error_set("module '%s' in '%s' is for kernel '%s', not '%s'", m->member, d->path, m->kver,
				    d->version);
	if (d->order.n >= VMK_NEEDED_MAX)
		return ib_error_set("the modules needed from '%s' are more than %d: refusing it", d->path,
				    VMK_NEEDED_MAX);
	m->mark = 1;
	for (p = m->depends; *p;) {
		size_t n = strcspn(p, ",");
		char dep[VMK_NAME_MAX + 1];
		int err;

		if (n) {
			if (!module_name(dep, p, n))
				return ib_error_set("module '%s' in '%s' depends on '%.*s', not a module name", name,
						    d->path, (int)n, p);
			if ((err = resolve(d, dep, name)) < 0)
				return err;
		}
		p += n;
		if (*p == ',')
			p++;
	}
	m->mark = 2;
	ib_strv_push(&d->order, name);
	return 0;
}

/* The order from the config and the modules' depends=, and the files it needs on the disk. */
static int deb_finish(vmk_deb *d)
{
	ib_buf order = IB_BUF_INIT;
	int err = 0;

	if (!d->version)
		return ib_error_set("'%s' holds no boot/vmlinuz-*: not a kernel package", d->path);
	if (!d->config || strcmp(d->config_ver, d->version))
		return ib_error_set("'%s' holds no boot/config-%s", d->path, d->version);
	for (size_t i = 0; i < NWANTED; i++) {
		char v = config_value(d->config, d->config_len, wanted[i].symbol);
		if (!v)
			return ib_error_set("kernel '%s' of '%s' has neither %s=y nor %s=m: a VM cannot use it",
					    d->version, d->path, wanted[i].symbol, wanted[i].symbol);
		if (v == 'm' && (err = resolve(d, wanted[i].module, NULL)) < 0)
			return err;
	}
	d->pending = 0;
	for (size_t i = 0; i < d->nmods; i++)
		if (d->mods[i].mark == 2 && !d->mods[i].saved)
			d->pending++;
	if (d->pending && (err = deb_pass(d, 2)) < 0)
		return err;
	if (d->pending)
		return ib_error_set("'%s' changed while it was read: %zu modules are gone", d->path, d->pending);
	/* kept by the first pass but not needed: built in by the config, or a dependency of such a one */
	for (size_t i = 0; i < d->nmods; i++) {
		if (d->mods[i].saved && d->mods[i].mark != 2) {
			char *name = ib_xasprintf("modules/%s.ko", d->mods[i].name);
			unlinkat(d->dirfd, name, 0);
			free(name);
		}
	}
	for (size_t i = 0; i < d->order.n; i++)
		ib_buf_printf(&order, "%s.ko\n", d->order.v[i]);
	err = write_bytes_at(d, "modules.order", order.ptr ? order.ptr : "", order.len);
	ib_buf_free(&order);
	if (!err) {
		char *v = ib_xasprintf("%s\n", d->version);
		err = write_bytes_at(d, "version", v, strlen(v));
		free(v);
	}
	return err;
}

static int fsync_at(int dirfd, const char *name)
{
	int fd = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	int err = 0;

	if (fd < 0 || fsync(fd) < 0)
		err = ib_error_set_errno(errno, "cannot sync '%s'", name);
	if (fd >= 0)
		close(fd);
	return err;
}

/* Unpack deb_path into dest (which this creates; removed again on failure). */
static int unpack_deb(const char *deb_path, const char *dest, double deadline)
{
	vmk_deb *d = ib_xcalloc(1, sizeof(*d));
	bool made = false;
	int err = 0;

	d->path = deb_path;
	d->dirfd = -1;
	d->deadline = deadline;
	if (mkdir(dest, 0755) < 0) {
		err = ib_error_set_errno(errno, "cannot create '%s'", dest);
		goto out;
	}
	made = true;
	d->dirfd = open(dest, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (d->dirfd < 0 || mkdirat(d->dirfd, "modules", 0755) < 0) {
		err = ib_error_set_errno(errno, "cannot create '%s/modules'", dest);
		goto out;
	}
	if ((err = deb_pass(d, 1)) == 0 && (err = deb_finish(d)) == 0 && (err = fsync_at(d->dirfd, "modules")) == 0)
		err = fsync_at(d->dirfd, ".");
out:
	if (d->dirfd >= 0)
		close(d->dirfd);
	if (err && made)
		ib_rm_rf(dest);
	deb_free(d);
	free(d);
	return err;
}

/* ---- the cache ---- */

/* Read a small file of ours whole; the last newline dropped. */
static int read_small(char **out, const char *path, size_t max)
{
	char *s = NULL;
	size_t n = 0;
	int err = ib_read_file(&s, &n, path, max);

	if (err < 0)
		return err;
	if (n && s[n - 1] == '\n')
		s[--n] = '\0';
	*out = s;
	return 0;
}

static bool regular_file(const char *path)
{
	struct stat st;

	return lstat(path, &st) == 0 && S_ISREG(st.st_mode);
}

/* A kernel directory of the cache (or one ib_vm_kernel_from_deb made), checked. */
static int load_dir(ib_vm_kernel *out, const char *dir)
{
	ib_vm_kernel k = { 0 };
	char *path = ib_xasprintf("%s/version", dir), *order = NULL, *p;
	int err;

	if ((err = read_small(&k.version, path, VMK_VERSION_MAX + 2)) < 0)
		goto out;
	if (!version_ok(k.version)) {
		err = ib_error_set("'%s' does not hold a kernel version", path);
		goto out;
	}
	k.vmlinuz = ib_xasprintf("%s/vmlinuz", dir);
	if (!regular_file(k.vmlinuz)) {
		err = ib_error_set("'%s' is missing", k.vmlinuz);
		goto out;
	}
	free(path);
	path = ib_xasprintf("%s/modules.order", dir);
	if ((err = read_small(&order, path, VMK_NEEDED_MAX * (VMK_NAME_MAX + 4))) < 0)
		goto out;
	for (p = order; *p;) {
		size_t n = strcspn(p, "\n");
		char *f = ib_xstrndup(p, n), *mod;

		if (!module_file_ok(f)) {
			err = ib_error_set("'%s' names '%s', not a module file", path, f);
			free(f);
			goto out;
		}
		mod = ib_xasprintf("%s/modules/%s", dir, f);
		if (!regular_file(mod))
			err = ib_error_set("'%s' is missing", mod);
		free(mod);
		ib_strv_push(&k.modules, f);
		free(f);
		if (err)
			goto out;
		p += n;
		if (*p)
			p++;
	}
	if (k.modules.n)
		k.moddir = ib_xasprintf("%s/modules", dir);
out:
	free(path);
	free(order);
	if (err) {
		ib_vm_kernel_clear(&k);
		return err;
	}
	*out = k;
	return 0;
}

int ib_vm_kernel_from_deb(ib_vm_kernel *out, const char *deb_path, const char *dest_dir)
{
	int err = unpack_deb(deb_path, dest_dir, 0);

	return err ? err : load_dir(out, dest_dir);
}

/* The kernel's version from an x86 bzImage's setup header, else the file's name. */
static char *image_version(const char *path)
{
	unsigned char hdr[0x210];
	char buf[VMK_VERSION_MAX + 1];
	const char *base = strrchr(path, '/');
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	ssize_t n;

	if (fd >= 0 && pread(fd, hdr, sizeof(hdr), 0) == (ssize_t)sizeof(hdr) && !memcmp(hdr + 0x202, "HdrS", 4)) {
		unsigned off = hdr[0x20e] | (unsigned)hdr[0x20f] << 8;
		if (off && (n = pread(fd, buf, sizeof(buf) - 1, 0x200 + (off_t)off)) > 0) {
			buf[n] = '\0';
			buf[strcspn(buf, " ")] = '\0';
			if (version_ok(buf)) {
				close(fd);
				return ib_xstrdup(buf);
			}
		}
	}
	if (fd >= 0)
		close(fd);
	return ib_xstrdup(base ? base + 1 : path);
}

/* Wait for the lock (other processes fetching) until the deadline. */
static int lock_vm(const char *path, double deadline, int *out_fd)
{
	int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);

	if (fd < 0)
		return ib_error_set_errno(errno, "cannot open lock '%s'", path);
	while (flock(fd, LOCK_EX | LOCK_NB) < 0) {
		struct timespec ts = { 0, VMK_LOCK_POLL_NS };
		int e = errno;

		if (e == EINTR)
			continue;
		if (e != EWOULDBLOCK) {
			close(fd);
			return ib_error_set_errno(e, "cannot lock '%s'", path);
		}
		if (deadline > 0 && ib_now() >= deadline) {
			close(fd);
			ib_error_set("timed out waiting for '%s' (another process fetches the VM kernel)", path);
			return IB_ETIMEOUT;
		}
		nanosleep(&ts, NULL);
	}
	*out_fd = fd;
	return 0;
}

/* Remove what a process that died holding the lock left unpacking. */
static void clean_tmp(const char *archdir)
{
	DIR *dir = opendir(archdir);
	struct dirent *de;

	if (!dir)
		return;
	while ((de = readdir(dir)))
		if (!strncmp(de->d_name, "tmp.", 4))
			ib_rm_rf_at(dirfd(dir), de->d_name);
	closedir(dir);
}

/* Put the unpacked tree tmp in place as final (replacing a broken one), durably. */
static int install_dir(const char *tmp, const char *final, const char *archdir)
{
	int err;

	if ((err = ib_rm_rf(final)) < 0)
		return err;
	if (rename(tmp, final) < 0)
		return ib_error_set_errno(errno, "cannot move '%s' to '%s'", tmp, final);
	return ib_fsync_dir(archdir);
}

/* ---- apt ---- */

static void keep_output(const char *data, size_t len, void *arg)
{
	ib_buf *b = arg;

	/* the tail is what explains a failure */
	if (b->len + len > VMK_APT_OUTPUT_MAX) {
		size_t drop = b->len + len - VMK_APT_OUTPUT_MAX;
		if (drop >= b->len) {
			data += drop - b->len;
			len -= drop - b->len;
			ib_buf_reset(b);
		} else {
			memmove(b->ptr, b->ptr + drop, b->len - drop);
			b->len -= drop;
			b->ptr[b->len] = '\0';
		}
	}
	ib_buf_add(b, data, len);
}

/* The last lines of apt's output, on one line, for a message. */
static char *output_tail(const ib_buf *b)
{
	const char *s = b->ptr ? b->ptr : "";
	size_t n = b->len, start;
	int lines = 0;
	char *t;

	while (n && (s[n - 1] == '\n' || s[n - 1] == ' '))
		n--;
	for (start = n; start > 0 && n - start < 600; start--)
		if (s[start - 1] == '\n' && ++lines == 4)
			break;
	t = ib_xstrndup(s + start, n - start);
	for (char *p = t; *p; p++)
		if (*p == '\n' || *p == '\r')
			*p = ' ';
	return t;
}

typedef struct vmk_apt {
	const char *vmdir;    /* CACHE/vm */
	const char *arch;
	bool private_state;   /* CACHE/vm/apt/lists rather than the host's lists */
	double deadline;
	ib_buf output;
} vmk_apt;

/* "-o" and an option apt is given, which this frees. */
static void apt_option(ib_strv *argv, char *opt)
{
	ib_strv_push(argv, "-o");
	ib_strv_push(argv, opt);
	free(opt);
}

/*
 * Run apt-get or apt-cache with what keeps it off the host's state: no
 * dpkg status (the host's installed packages play no part), its binary
 * caches in memory, and with private_state its own package lists.
 */
static int run_apt(vmk_apt *apt, const char *dir, const char *const *args, const char *what)
{
	ib_strv argv = IB_STRV_INIT;
	ib_proc_opts opts = { .name = what, .output = keep_output, .output_arg = &apt->output,
			      .deadline = apt->deadline };
	int err;

	if (dir) {
		/* apt-get download writes into its working directory */
		ib_strv_push(&argv, "env");
		ib_strv_push(&argv, "-C");
		ib_strv_push(&argv, dir);
	}
	ib_strv_push(&argv, args[0]);
	ib_strv_push(&argv, "-q");
	apt_option(&argv, ib_xstrdup("APT::Sandbox::User=root"));
	apt_option(&argv, ib_xasprintf("APT::Architecture=%s", apt->arch));
	apt_option(&argv, ib_xasprintf("APT::Architectures=%s", apt->arch));
	apt_option(&argv, ib_xstrdup("Dir::State::status=/dev/null"));
	apt_option(&argv, ib_xasprintf("Dir::Cache=%s/apt/cache", apt->vmdir));
	apt_option(&argv, ib_xstrdup("Dir::Cache::pkgcache="));
	apt_option(&argv, ib_xstrdup("Dir::Cache::srcpkgcache="));
	if (apt->private_state)
		apt_option(&argv, ib_xasprintf("Dir::State::lists=%s/apt/lists", apt->vmdir));
	for (size_t i = 1; args[i]; i++)
		ib_strv_push(&argv, args[i]);
	ib_buf_reset(&apt->output);
	err = ib_proc_run((const char *const *)argv.v, &opts);
	if (err < 0) {
		char *msg = ib_xstrdup(ib_error_last()), *tail = output_tail(&apt->output);
		ib_error_set("%s%s%s", msg, *tail ? ": " : "", tail);
		free(msg);
		free(tail);
	}
	ib_strv_free(&argv);
	return err;
}

static bool apt_name_ok(const char *s, size_t n, const char *chars)
{
	return n && n <= 256 && strspn(s, chars) >= n;
}

/*
 * The package the meta-package linux-image-cloud-<arch> stands for, from
 * its Depends ("linux-image-6.1.0-57-cloud-amd64 (= 6.1.192-3)"): *target
 * is "NAME=VERSION" for apt-get download, *kver the kernel version its
 * name carries.  IB_ENOTFOUND when these lists do not have it.
 */
static int apt_resolve(vmk_apt *apt, char **target, char **kver)
{
	static const char name_chars[] = "abcdefghijklmnopqrstuvwxyz0123456789.+-";
	static const char ver_chars[] = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.+~:-";
	char *meta = ib_xasprintf("linux-image-cloud-%s", apt->arch);
	char *stanza_head = ib_xasprintf("Package: %s", meta);
	const char *args[] = { "apt-cache", "show", "--no-all-versions", meta, NULL };
	const char *p, *dep = NULL, *name, *ver = NULL;
	size_t name_len, ver_len = 0;
	bool in = false;
	int err;

	if ((err = run_apt(apt, NULL, args, "apt-cache show")) < 0) {
		ib_error_prefix("cannot find '%s' in the package lists", meta);
		err = err == IB_ETIMEOUT ? err : IB_ENOTFOUND;
		goto out;
	}
	for (p = apt->output.ptr ? apt->output.ptr : ""; *p && !dep;) {
		size_t n = strcspn(p, "\n");
		if (!n)
			in = false;
		else if (n == strlen(stanza_head) && !strncmp(p, stanza_head, n))
			in = true;
		else if (in && !strncmp(p, "Depends: ", 9))
			dep = p + 9;
		p += n;
		if (*p)
			p++;
	}
	if (!dep) {
		err = ib_error_set("'%s' in the package lists has no Depends", meta);
		err = IB_ENOTFOUND;
		goto out;
	}
	name = dep;
	name_len = strcspn(name, " ,(\n");
	p = name + name_len;
	while (*p == ' ')
		p++;
	if (!strncmp(p, "(= ", 3)) {
		ver = p + 3;
		ver_len = strcspn(ver, ")\n");
	}
	if (!apt_name_ok(name, name_len, name_chars) || name_len <= 12 || strncmp(name, "linux-image-", 12) ||
	    (ver && (!apt_name_ok(ver, ver_len, ver_chars) || ver[ver_len] != ')'))) {
		err = ib_error_set("'%s' depends on '%.*s': not a kernel package", meta, (int)strcspn(dep, "\n"),
				   dep);
		err = IB_ENOTFOUND;
		goto out;
	}
	*kver = ib_xstrndup(name + 12, name_len - 12);
	if (!version_ok(*kver)) {
		err = ib_error_set("'%s' depends on '%.*s': not a kernel package", meta, (int)name_len, name);
		free(*kver);
		*kver = NULL;
		err = IB_ENOTFOUND;
		goto out;
	}
	if (ver)
		*target = ib_xasprintf("%.*s=%.*s", (int)name_len, name, (int)ver_len, ver);
	else
		*target = ib_xstrndup(name, name_len);
out:
	free(meta);
	free(stanza_head);
	return err;
}

/* The one .deb apt-get download left in dir. */
static int find_deb(char **out, const char *dir)
{
	DIR *d = opendir(dir);
	struct dirent *de;
	char *found = NULL;

	if (!d)
		return ib_error_set_errno(errno, "cannot open '%s'", dir);
	while ((de = readdir(d))) {
		size_t n = strlen(de->d_name);
		if (n > 4 && !strcmp(de->d_name + n - 4, ".deb") && !found)
			found = ib_xasprintf("%s/%s", dir, de->d_name);
	}
	closedir(d);
	if (!found)
		return ib_error_set("apt-get download left no .deb in '%s'", dir);
	*out = found;
	return 0;
}

/*
 * Resolve and download the kernel package into dl (a directory of ours):
 * *deb, and *kver the version its name says.  With the host's package
 * lists first; when they lack it (or name a file the mirror no longer
 * has), with lists of our own, updated now.
 */
static int apt_fetch(char **deb, char **kver, const char *vmdir, const char *arch, const char *dl, double deadline)
{
	vmk_apt apt = { .vmdir = vmdir, .arch = arch, .deadline = deadline };
	char *target = NULL, *lists = NULL, *cache = NULL;
	int err;

	cache = ib_xasprintf("%s/apt/cache", vmdir);
	if ((err = ib_mkdir_p(cache, 0755)) < 0)
		goto out;
	for (int round = 0; round < 2; round++) {
		apt.private_state = round == 1;
		if (round == 1) {
			const char *update[] = { "apt-get", "update", NULL };
			lists = ib_xasprintf("%s/apt/lists/partial", vmdir);
			if ((err = ib_mkdir_p(lists, 0755)) < 0)
				break;
			if ((err = run_apt(&apt, NULL, update, "apt-get update")) < 0) {
				ib_error_prefix("cannot update the package lists in '%s/apt'", vmdir);
				break;
			}
		}
		free(target);
		free(*kver);
		target = NULL;
		*kver = NULL;
		if ((err = apt_resolve(&apt, &target, kver)) == 0) {
			const char *download[] = { "apt-get", "download", target, NULL };
			if ((err = run_apt(&apt, dl, download, "apt-get download")) < 0)
				ib_error_prefix("cannot download '%s'", target);
		}
		if (err != IB_ENOTFOUND && err != IB_ERROR)
			break;
	}
	if (!err)
		err = find_deb(deb, dl);
out:
	if (err) {
		free(*kver);
		*kver = NULL;
	}
	free(target);
	free(lists);
	free(cache);
	ib_buf_free(&apt.output);
	return err;
}

/*
 * A kernel of the cache: archdir/<name> for a .deb the caller named
 * (name "deb-<sha256>"), else the one archdir/current names, fetched with
 * apt when there is none.
 */
static int load_cached(ib_vm_kernel *out, const char *archdir, const char *name)
{
	char *dir = NULL, *cur = NULL, *ver = NULL;
	int err;

	if (name) {
		dir = ib_xasprintf("%s/%s", archdir, name);
	} else {
		cur = ib_xasprintf("%s/current", archdir);
		if ((err = read_small(&ver, cur, VMK_VERSION_MAX + 2)) < 0)
			goto out;
		if (!version_ok(ver)) {
			err = ib_error_set("'%s' does not name a kernel version", cur);
			goto out;
		}
		dir = ib_xasprintf("%s/%s", archdir, ver);
	}
	err = access(dir, F_OK) == 0 ? load_dir(out, dir) : IB_ENOTFOUND;
out:
	free(dir);
	free(cur);
	free(ver);
	return err;
}

static int get_cached(ib_vm_kernel *out, const char *cache_dir, const char *arch, const char *deb_path,
		      const char *name, double deadline)
{
	char *vmdir = ib_xasprintf("%s/vm", cache_dir), *archdir = ib_xasprintf("%s/%s", vmdir, arch);
	char *lock = ib_xasprintf("%s/lock", vmdir), *tmp = NULL, *unpacked = NULL, *final = NULL;
	char *deb = NULL, *kver = NULL, *cur = NULL, *line = NULL;
	ib_vm_kernel k = { 0 };
	int err, lockfd = -1;

	if (load_cached(out, archdir, name) == 0) {
		err = 0;
		goto out;
	}
	if ((err = ib_mkdir_p(archdir, 0755)) < 0 || (err = lock_vm(lock, deadline, &lockfd)) < 0)
		goto out;
	/* another process may have done it while this one waited */
	if (load_cached(out, archdir, name) == 0)
		goto out;
	ib_error_clear();
	clean_tmp(archdir);
	tmp = ib_xasprintf("%s/tmp.XXXXXX", archdir);
	if (!mkdtemp(tmp)) {
		err = ib_error_set_errno(errno, "cannot create a directory in '%s'", archdir);
		free(tmp);
		tmp = NULL;
		goto out;
	}
	unpacked = ib_xasprintf("%s/kernel", tmp);
	if (name) {
		final = ib_xasprintf("%s/%s", archdir, name);
		if ((err = unpack_deb(deb_path, unpacked, deadline)) < 0 ||
		    (err = install_dir(unpacked, final, archdir)) < 0)
			goto out;
	} else {
		if ((err = apt_fetch(&deb, &kver, vmdir, arch, tmp, deadline)) < 0)
			goto out;
		final = ib_xasprintf("%s/%s", archdir, kver);
		/* kept by a process that died before it wrote current: no need to unpack again */
		if (load_dir(&k, final) < 0) {
			ib_error_clear();
			if ((err = unpack_deb(deb, unpacked, deadline)) < 0 || (err = load_dir(&k, unpacked)) < 0)
				goto out;
			if (strcmp(k.version, kver)) {
				/* the package's name and its kernel disagree: the kernel is right */
				free(final);
				final = ib_xasprintf("%s/%s", archdir, k.version);
			}
			if ((err = install_dir(unpacked, final, archdir)) < 0)
				goto out;
		}
		cur = ib_xasprintf("%s/current", archdir);
		line = ib_xasprintf("%s\n", strrchr(final, '/') + 1);
		if ((err = ib_write_file_atomic(cur, line, strlen(line), 0644)) < 0)
			goto out;
	}
	err = load_dir(out, final);
out:
	if (tmp)
		ib_rm_rf(tmp);
	if (lockfd >= 0)
		close(lockfd);
	free(vmdir);
	free(archdir);
	free(lock);
	free(tmp);
	free(unpacked);
	free(final);
	free(deb);
	free(kver);
	free(cur);
	free(line);
	ib_vm_kernel_clear(&k);
	return err;
}

int ib_vm_kernel_get(ib_vm_kernel *out, const char *cache_dir, const char *arch, const char *kernel_path,
		     double deadline)
{
	char magic[8], hex[IB_SHA256_HEX], *name;
	struct stat st;
	int fd, err;
	ssize_t n;

	if (!arch || strcmp(arch, "amd64")) {
		ib_error_set("VM steps on '%s' are not supported yet: the VM kernel is amd64 only",
			     arch ? arch : "(none)");
		return IB_EINVALID;
	}
	if (!kernel_path || !*kernel_path)
		return get_cached(out, cache_dir, arch, NULL, NULL, deadline);

	fd = open(kernel_path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return ib_error_set_errno(errno, "cannot open the VM kernel '%s'", kernel_path);
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
		close(fd);
		ib_error_set("the VM kernel '%s' is not a file", kernel_path);
		return IB_EINVALID;
	}
	n = pread(fd, magic, sizeof(magic), 0);
	close(fd);
	if (n != (ssize_t)sizeof(magic) || memcmp(magic, "!<arch>\n", 8)) {
		/* a bare image: every driver is built in */
		ib_vm_kernel k = { 0 };
		k.version = image_version(kernel_path);
		k.vmlinuz = ib_xstrdup(kernel_path);
		*out = k;
		return 0;
	}
	if ((err = ib_sha256_file(hex, kernel_path)) < 0)
		return err;
	name = ib_xasprintf("deb-%s", hex);
	err = get_cached(out, cache_dir, arch, kernel_path, name, deadline);
	free(name);
	return err;
}

/* ---- the initramfs ---- */

typedef struct vmk_cpio {
	struct archive *a;
	struct archive_entry *e;
	int64_t ino;
	const char *out_path;
	char chunk[1 << 16];
} vmk_cpio;

/* One entry's header: owner 0:0, mtime 0, an inode number by position. */
static int cpio_header(vmk_cpio *c, const char *path, mode_t type, mode_t perm, int64_t size, dev_t rmaj,
		       dev_t rmin)
{
	struct archive_entry *e = c->e;

	archive_entry_clear(e);
	archive_entry_set_pathname(e, path);
	archive_entry_set_filetype(e, type);
	archive_entry_set_perm(e, perm);
	archive_entry_set_uid(e, 0);
	archive_entry_set_gid(e, 0);
	archive_entry_set_mtime(e, 0, 0);
	archive_entry_set_ino64(e, ++c->ino);
	archive_entry_set_nlink(e, type == AE_IFDIR ? 2 : 1);
	archive_entry_set_size(e, size);
	if (type == AE_IFCHR) {
		archive_entry_set_rdevmajor(e, rmaj);
		archive_entry_set_rdevminor(e, rmin);
	}
	if (archive_write_header(c->a, e) != ARCHIVE_OK)
		return ib_error_set("cannot write '%s' into '%s': %s", path, c->out_path, archive_error_string(c->a));
	return 0;
}

static int cpio_data(vmk_cpio *c, const char *path, const void *data, size_t len)
{
	if (len && archive_write_data(c->a, data, len) != (la_ssize_t)len)
		return ib_error_set("cannot write '%s' into '%s': %s", path, c->out_path, archive_error_string(c->a));
	return 0;
}

static int cpio_file(vmk_cpio *c, const char *path, const char *src, mode_t perm, long long max)
{
	int fd = open(src, O_RDONLY | O_CLOEXEC), err = 0;
	long long left;
	struct stat st;
	ssize_t n;

	if (fd < 0)
		return ib_error_set_errno(errno, "cannot open '%s'", src);
	if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
		err = ib_error_set("'%s' is not a file", src);
		goto out;
	}
	if (st.st_size > max) {
		err = ib_error_set("'%s' is larger than %lld bytes: refusing it", src, max);
		goto out;
	}
	if ((err = cpio_header(c, path, AE_IFREG, perm, st.st_size, 0, 0)) < 0)
		goto out;
	for (left = st.st_size; left > 0; left -= n) {
		size_t want = left < (long long)sizeof(c->chunk) ? (size_t)left : sizeof(c->chunk);
		n = read(fd, c->chunk, want);
		if (n < 0 && errno == EINTR) {
			n = 0;
			continue;
		}
		if (n <= 0) {
			err = n < 0 ? ib_error_set_errno(errno, "cannot read '%s'", src)
				    : ib_error_set("'%s' shrank while it was read", src);
			goto out;
		}
		if ((err = cpio_data(c, path, c->chunk, (size_t)n)) < 0)
			goto out;
	}
out:
	close(fd);
	return err;
}

int ib_vm_initramfs(const ib_vm_kernel *k, const char *init_path, const char *out_path)
{
	static const char *const dirs[] = { "mnt", "proc", "run", "sys" };
	vmk_cpio *c = NULL;
	ib_buf list = IB_BUF_INIT;
	char *tmp = NULL;
	int fd = -1, err = 0;

	if (k->modules.n && !k->moddir)
		return ib_error_set("kernel '%s' has modules but no module directory", k->version);
	for (size_t i = 0; i < k->modules.n; i++) {
		if (!module_file_ok(k->modules.v[i])) {
			err = ib_error_set("'%s' is not a module file name: refusing it", k->modules.v[i]);
			goto out;
		}
		ib_buf_printf(&list, "%s\n", k->modules.v[i]);
	}
	if ((err = ib_output_open(out_path, &tmp, &fd)) < 0)
		goto out;
	c = ib_xcalloc(1, sizeof(*c));
	c->out_path = out_path;
	c->a = archive_write_new();
	c->e = archive_entry_new();
	if (archive_write_set_format_cpio_newc(c->a) != ARCHIVE_OK ||
	    archive_write_add_filter_none(c->a) != ARCHIVE_OK ||
	    archive_write_open_fd(c->a, fd) != ARCHIVE_OK) {
		err = ib_error_set("cannot write '%s': %s", out_path, archive_error_string(c->a));
		goto out;
	}
	/* the order of the names is fixed, so are the bytes */
	if ((err = cpio_header(c, "dev", AE_IFDIR, 0755, 0, 0, 0)) < 0 ||
	    (err = cpio_header(c, "dev/console", AE_IFCHR, 0600, 0, 5, 1)) < 0 ||
	    (err = cpio_file(c, "init", init_path, 0755, VMK_INIT_MAX)) < 0 ||
	    (err = cpio_header(c, "lib", AE_IFDIR, 0755, 0, 0, 0)) < 0 ||
	    (err = cpio_header(c, "lib/modules", AE_IFDIR, 0755, 0, 0, 0)) < 0)
		goto out;
	for (size_t i = 0; i < k->modules.n; i++) {
		char *src = ib_xasprintf("%s/%s", k->moddir, k->modules.v[i]);
		char *dst = ib_xasprintf("lib/modules/%s", k->modules.v[i]);
		err = cpio_file(c, dst, src, 0644, VMK_MODULE_MAX);
		free(src);
		free(dst);
		if (err)
			goto out;
	}
	for (size_t i = 0; i < sizeof(dirs) / sizeof(dirs[0]); i++)
		if ((err = cpio_header(c, dirs[i], AE_IFDIR, 0755, 0, 0, 0)) < 0)
			goto out;
	if ((err = cpio_header(c, "tmp", AE_IFDIR, 01777, 0, 0, 0)) < 0 ||
	    (err = cpio_header(c, "modules", AE_IFREG, 0644, (int64_t)list.len, 0, 0)) < 0 ||
	    (err = cpio_data(c, "modules", list.ptr, list.len)) < 0)
		goto out;
	if (archive_write_close(c->a) != ARCHIVE_OK) {
		err = ib_error_set("cannot write '%s': %s", out_path, archive_error_string(c->a));
		goto out;
	}
	err = ib_output_commit(tmp, fd, out_path, 0644);
out:
	if (c) {
		archive_entry_free(c->e);
		archive_write_free(c->a);
		free(c);
	}
	if (fd >= 0)
		close(fd);
	if (err && tmp)
		unlink(tmp);
	free(tmp);
	ib_buf_free(&list);
	return err;
}

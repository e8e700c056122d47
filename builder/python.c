#include "builder/python.h"

#include <archive.h>
#include <archive_entry.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "lib/crash.h"
#include "lib/limits.h"
#include "lib/util.h"

int ib_python_resolve(ib_python_pin *out, const ib_config *cfg, const char *version, const char *machine)
{
	char *json = NULL;
	size_t len = 0;
	int err;

	if ((err = ib_read_file(&json, &len, cfg->python_versions, IB_DEFINITION_MAX)) < 0)
		ib_error_prefix("cannot load the python version table '%s'", cfg->python_versions);
	else
		err = ib_pytable_lookup(out, json, len, cfg->python_versions, version, machine, cfg->python_mirror);
	free(json);
	return err;
}

int ib_python_fetch(char **out_path, ib_cache *cache, const ib_python_pin *pin, const ib_fetch_opts *opts)
{
	char *dir = ib_xasprintf("%s/downloads", ib_cache_dir(cache));
	char *path = ib_xasprintf("%s/%s.tar.gz", dir, pin->sha256);
	char *scratch = NULL, *part = NULL;
	char hex[IB_SHA256_HEX];
	int err, lockfd = -1;

	if ((err = ib_mkdir_p(dir, 0755)) < 0)
		goto out;
	/* One download serves every layer that needs it; it is checked on every use. */
	if (access(path, F_OK) == 0) {
		if ((err = ib_sha256_file(hex, path)) < 0)
			goto out;
		if (!strcmp(hex, pin->sha256))
			goto out;
		unlink(path);
	}
	/* into a scratch dir (a crash leaves it to ib_cache_clean_tmp), then into the store */
	if ((err = ib_cache_mktemp(cache, &scratch, &lockfd)) < 0)
		goto out;
	part = ib_xasprintf("%s/archive", scratch);
	if ((err = ib_fetch(pin->url, part, pin->sha256, NULL, opts)) < 0)
		goto out;
	IB_CRASH_POINT("download:after-fetch");
	if (rename(part, path) < 0) {
		err = ib_error_set_errno(errno, "cannot move the download into '%s'", path);
		goto out;
	}
	if ((err = ib_fsync_dir(dir)) < 0)
		goto out;
	IB_CRASH_POINT("download:after-rename");
out:
	ib_cache_rmtemp(scratch, lockfd);
	free(scratch);
	free(part);
	free(dir);
	if (err) {
		free(path);
		return err;
	}
	*out_path = path;
	return 0;
}

/* Is rel (relative to the tree root) a plain path that stays inside it? */
static bool path_ok(const char *rel)
{
	const char *p = rel;

	if (!*rel || *rel == '/')
		return false;
	while (*p) {
		size_t n = strcspn(p, "/");
		if ((n == 2 && !strncmp(p, "..", 2)))
			return false;
		p += n;
		while (*p == '/')
			p++;
	}
	return true;
}

/* A symlink target, resolved from the link's directory, must stay in the tree. */
static bool link_ok(const char *rel, const char *target)
{
	int depth = 0;
	const char *p;

	if (*target == '/')
		return false;
	for (p = rel; *p; p++)
		if (*p == '/' && p[1] && p[1] != '/')
			depth++;
	for (p = target; *p;) {
		size_t n = strcspn(p, "/");
		if (n == 2 && !strncmp(p, "..", 2))
			depth--;
		else if (n && !(n == 1 && *p == '.'))
			depth++;
		if (depth < 0)
			return false;
		p += n;
		while (*p == '/')
			p++;
	}
	return true;
}

/*
 * The unpacking itself, in a child whose working directory is the tree's
 * root: every path libarchive sees is relative, so its own guards hold
 * (SECURE_NODOTDOT, SECURE_NOABSOLUTEPATHS, and SECURE_SYMLINKS, which
 * refuses to write through any symlink already on the disk), and each
 * entry's directory is first opened with openat2() beneath the root
 * without following links.  A chain of links that each look inside but
 * lead out together is refused either way.  The message goes to msg_fd.
 */
static int unpack_here(const char *archive, int rootfd)
{
	static const char prefix[] = "python/";
	struct archive *in = archive_read_new(), *out = archive_write_disk_new();
	struct archive_entry *e;
	int err = 0, r;

	archive_read_support_filter_all(in);
	archive_read_support_format_tar(in);
	archive_write_disk_set_options(out, ARCHIVE_EXTRACT_PERM | ARCHIVE_EXTRACT_TIME | ARCHIVE_EXTRACT_XATTR |
						    ARCHIVE_EXTRACT_SECURE_NODOTDOT | ARCHIVE_EXTRACT_SECURE_SYMLINKS |
						    ARCHIVE_EXTRACT_SECURE_NOABSOLUTEPATHS | ARCHIVE_EXTRACT_UNLINK);
	if (archive_read_open_filename(in, archive, 1 << 16) != ARCHIVE_OK) {
		err = ib_error_set("cannot read '%s': %s", archive, archive_error_string(in));
		goto out;
	}
	while ((r = archive_read_next_header(in, &e)) == ARCHIVE_OK) {
		const char *name = archive_entry_pathname(e), *rel, *link, *slash;

		if (!strcmp(name, "python") || !strcmp(name, "python/") || !strcmp(name, "./python/"))
			continue;
		if (!strncmp(name, "./", 2))
			name += 2;
		if (strncmp(name, prefix, strlen(prefix)) || !path_ok(name + strlen(prefix))) {
			err = ib_error_set("'%s': entry '%s' is outside python/: refusing the archive", archive, name);
			goto out;
		}
		rel = name + strlen(prefix);
		if ((link = archive_entry_hardlink(e))) {
			if (!strncmp(link, "./", 2))
				link += 2;
			if (strncmp(link, prefix, strlen(prefix)) || !path_ok(link + strlen(prefix))) {
				err = ib_error_set("'%s': hard link '%s' points outside python/: refusing the archive",
						   archive, name);
				goto out;
			}
			archive_entry_set_hardlink(e, link + strlen(prefix));
		}
		if ((link = archive_entry_symlink(e)) && !link_ok(rel, link)) {
			err = ib_error_set("'%s': symlink '%s' -> '%s' leaves the tree: refusing the archive", archive,
					   name, link);
			goto out;
		}
		/* the directory it goes in: beneath the root, reached without a link */
		if ((slash = strrchr(rel, '/'))) {
			char *parent = ib_xstrndup(rel, (size_t)(slash - rel));
			int pfd = ib_open_beneath(rootfd, parent, O_PATH | O_DIRECTORY), e2 = errno;
			free(parent);
			if (pfd >= 0)
				close(pfd);
			else if (e2 != ENOENT) {
				err = ib_error_set("'%s': entry '%s' would be written through a symlink: refusing the archive",
						   archive, name);
				goto out;
			}
		}
		archive_entry_set_pathname(e, rel);
		archive_entry_set_uid(e, 0);
		archive_entry_set_gid(e, 0);
		archive_entry_set_perm(e, archive_entry_perm(e) & 07755);
		if (archive_write_header(out, e) != ARCHIVE_OK) {
			err = ib_error_set("cannot unpack '%s' from '%s': %s: refusing the archive", name, archive,
					   archive_error_string(out));
			goto out;
		}
		if (archive_entry_size(e) > 0) {
			const void *buf;
			size_t size;
			la_int64_t off;
			while ((r = archive_read_data_block(in, &buf, &size, &off)) == ARCHIVE_OK) {
				if (archive_write_data_block(out, buf, size, off) != ARCHIVE_OK) {
					err = ib_error_set("cannot write '%s': %s", name, archive_error_string(out));
					goto out;
				}
			}
			if (r != ARCHIVE_EOF) {
				err = ib_error_set("cannot read '%s' in '%s': %s", name, archive,
						   archive_error_string(in));
				goto out;
			}
		}
		if (archive_write_finish_entry(out) != ARCHIVE_OK) {
			err = ib_error_set("cannot finish '%s': %s", name, archive_error_string(out));
			goto out;
		}
	}
	if (r != ARCHIVE_EOF)
		err = ib_error_set("cannot read '%s': %s", archive, archive_error_string(in));
out:
	if (archive_write_close(out) != ARCHIVE_OK && !err)
		err = ib_error_set("cannot unpack '%s': %s", archive, archive_error_string(out));
	archive_read_free(in);
	archive_write_free(out);
	return err;
}

struct unpack_args {
	const char *archive;
	int rootfd;
};

static int unpack_child(void *arg)
{
	struct unpack_args *u = arg;

	return unpack_here(u->archive, u->rootfd);
}

int ib_python_unpack(const char *archive, const char *dir)
{
	char *root = ib_xasprintf("%s/usr/local", dir);
	struct unpack_args u = { .archive = archive, .rootfd = -1 };
	int err;

	if ((err = ib_mkdir_p(root, 0755)) < 0)
		goto out;
	if ((u.rootfd = open(root, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)) < 0) {
		err = ib_error_set_errno(errno, "cannot open '%s'", root);
		goto out;
	}
	err = ib_in_child_at(u.rootfd, u.rootfd, unpack_child, &u, "unpacking the python archive failed");
out:
	if (u.rootfd >= 0)
		close(u.rootfd);
	free(root);
	return err;
}

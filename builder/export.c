#include "builder/export.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include "layer/overlay.h"
#include "layer/tree.h"
#include "layer/writer.h"
#include "lib/limits.h"
#include "lib/util.h"

ib_image_meta *ib_export_meta_of_plan(const ib_plan *p)
{
	ib_image_meta *m = ib_image_meta_new();
	char *canon = ib_spec_canonical(p->spec);

	snprintf(m->image_id, sizeof(m->image_id), "%s", p->image_id);
	m->base = ib_xstrdup(p->spec->base);
	m->arch = ib_xstrdup(p->arch);
	m->machine = ib_xstrdup(p->machine);
	m->python_version = p->spec->python_version ? ib_xstrdup(p->spec->python_version) : NULL;
	if (p->python) {
		m->has_python = true;
		snprintf(m->python.version, sizeof(m->python.version), "%s", p->python->version);
		snprintf(m->python.release, sizeof(m->python.release), "%s", p->python->release);
		snprintf(m->python.machine, sizeof(m->python.machine), "%s", p->python->machine);
		snprintf(m->python.sha256, sizeof(m->python.sha256), "%s", p->python->sha256);
	}
	json_object_update(m->env, p->env);
	m->nlayers = p->nlayers;
	m->layers = ib_xcalloc(p->nlayers, sizeof(*m->layers));
	for (size_t i = 0; i < p->nlayers; i++) {
		snprintf(m->layers[i].kind, sizeof(m->layers[i].kind), "%s", p->layers[i].kind);
		snprintf(m->layers[i].key, sizeof(m->layers[i].key), "%s", p->layers[i].key);
	}
	m->spec = json_loads(canon, 0, NULL);
	m->epoch = p->epoch;
	m->disk_size = p->spec->disk_size;
	free(canon);
	return m;
}

/* Quote for /etc/environment: KEY="value", shell double-quote escapes. */
static void env_line(ib_buf *out, const char *k, const char *v)
{
	ib_buf_printf(out, "%s=\"", k);
	for (const char *p = v; *p; p++) {
		if (*p == '"' || *p == '\\' || *p == '$' || *p == '`')
			ib_buf_puts(out, "\\");
		ib_buf_add(out, p, 1);
	}
	ib_buf_puts(out, "\"\n");
}

char *ib_export_find_init(const ib_config *cfg, const char *machine)
{
	char *path;

	if (cfg->program_dir) {
		path = ib_xasprintf("%s/ib-init-%s", cfg->program_dir, machine);
		if (access(path, X_OK) == 0)
			return path;
		free(path);
	}
	path = ib_xasprintf("/usr/lib/imagebuilder/ib-init-%s", machine);
	if (access(path, X_OK) == 0)
		return path;
	free(path);
	return NULL;
}

/*
 * Where an image gets its init.  An image without one of its own (in the
 * merged view: a whiteout or an opaque directory above an init hides it)
 * gets imagebuilder's at /sbin/init (through /sbin -> usr/sbin on
 * merged-/usr systems); one with an init (say systemd-sysv's) keeps it.
 * *out_rel is NULL for the latter; else the path to write and the init to
 * copy, with its digest.
 */
static int plan_init(char **out_rel, char **out_src, char sha[IB_SHA256_HEX], const char *const *layers, size_t n,
		     const ib_config *cfg, const char *machine)
{
	ib_overlay_entry e = IB_OVERLAY_ENTRY_INIT;
	const char *rel = "sbin/init";
	char *target = NULL;
	int err, r;

	*out_rel = *out_src = NULL;
	if ((r = ib_overlay_readlink(&target, layers, n, "sbin")) < 0)
		return r;
	if (r) {
		bool ok = !strcmp(target, "usr/sbin") || !strcmp(target, "/usr/sbin");
		err = ok ? 0 : ib_error_set("cannot install an init: /sbin links to '%.64s'", target);
		free(target);
		if (err)
			return err;
		rel = "usr/sbin/init";
	}
	r = ib_overlay_lookup(&e, layers, n, rel);
	ib_overlay_entry_clear(&e);
	if (r != 0)
		return r < 0 ? r : 0;
	*out_src = ib_export_find_init(cfg, machine);
	if (!*out_src)
		return ib_error_set("no init for %s beside the program or in /usr/lib/imagebuilder (make builds "
				    "build/ib-init-%s)", machine, machine);
	if ((err = ib_sha256_file(sha, *out_src)) < 0) {
		free(*out_src);
		*out_src = NULL;
		return err;
	}
	*out_rel = ib_xstrdup(rel);
	return 0;
}

static int install_init(const char *dir, const char *rel, const char *src)
{
	char *data = NULL, *dst = NULL, *parent = NULL;
	size_t len = 0;
	int err;

	if ((err = ib_read_file(&data, &len, src, 16 << 20)) < 0)
		goto out;
	dst = ib_xasprintf("%s/%s", dir, rel);
	parent = ib_xstrndup(dst, (size_t)(strrchr(dst, '/') - dst));
	if ((err = ib_mkdir_p(parent, 0755)) < 0)
		goto out;
	if ((err = ib_write_file_atomic(dst, data, len, 0755)) < 0)
		goto out;
	if (chmod(dst, 0755) < 0)
		err = ib_error_set_errno(errno, "cannot chmod '%s'", dst);
out:
	free(data);
	free(dst);
	free(parent);
	return err;
}

bool ib_export_init_stale(const ib_config *cfg, const ib_image_meta *meta)
{
	char sha[IB_SHA256_HEX] = "", *src;
	bool stale;

	if (!meta->init || strncmp(meta->init, "imagebuilder:", 13))
		return false;
	src = ib_export_find_init(cfg, meta->machine);
	if (src && ib_sha256_file(sha, src) < 0)
		sha[0] = '\0';
	free(src);
	stale = strcmp(meta->init + 13, sha) != 0;
	return stale;
}

/*
 * /etc/environment for the image: the lines of the merged stack's file
 * for variables the spec does not set, then the spec's env.
 */
static int environment_file(ib_buf *out, const json_t *env, const char *const *layers, size_t n)
{
	char *old = NULL;
	const char *k;
	json_t *v;
	int r;

	if ((r = ib_overlay_read_file(&old, NULL, layers, n, "etc/environment", IB_ENV_FILE_MAX,
				      "IB_ENV_FILE_MAX")) < 0)
		return r;
	for (char *line = old, *nl; line && *line; line = nl ? nl + 1 : NULL) {
		size_t klen = strcspn(line, "=\n");
		nl = strchr(line, '\n');
		char *name = ib_xstrndup(line, klen);
		if (!json_object_get(env, name)) {
			ib_buf_add(out, line, nl ? (size_t)(nl - line) : strlen(line));
			ib_buf_puts(out, "\n");
		}
		free(name);
	}
	json_object_foreach((json_t *)env, k, v)
		env_line(out, k, json_string_value(v));
	free(old);
	return 0;
}

/* Write a file of the metadata layer, its directories made as needed. */
static int put_file(const char *dir, const char *rel, const char *data, size_t len, mode_t mode)
{
	char *path = ib_xasprintf("%s/%s", dir, rel), *parent = ib_xstrndup(path, (size_t)(strrchr(path, '/') - path));
	int err;

	if ((err = ib_mkdir_p(parent, 0755)) == 0 && (err = ib_write_file_atomic(path, data, len, mode)) == 0 &&
	    chmod(path, mode) < 0)
		err = ib_error_set_errno(errno, "cannot chmod '%s'", path);
	free(path);
	free(parent);
	return err;
}

/* A whiteout in the metadata layer: rel of the layers below is gone from the image. */
static int put_whiteout(const char *dir, const char *rel)
{
	char *path = ib_xasprintf("%s/%s", dir, rel), *parent = ib_xstrndup(path, (size_t)(strrchr(path, '/') - path));
	int err;

	if ((err = ib_mkdir_p(parent, 0755)) == 0 && mknod(path, S_IFCHR | 0000, makedev(0, 0)) < 0)
		err = ib_error_set_errno(errno, "cannot make a whiteout at '%s'", path);
	free(path);
	free(parent);
	return err;
}

static bool has_line(const char *text, const char *addr, const char *name)
{
	for (const char *line = text; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL) {
		size_t n = strcspn(line, "\n"), a = strlen(addr);
		char *copy;
		bool found = false;

		if (n <= a || strncmp(line, addr, a) || (line[a] != ' ' && line[a] != '\t'))
			continue;
		copy = ib_xstrndup(line + a, n - a);
		for (char *tok = copy; *tok;) {
			size_t sp = strspn(tok, " \t"), len;
			tok += sp;
			len = strcspn(tok, " \t#");
			if (len == strlen(name) && !strncmp(tok, name, len))
				found = true;
			if (!len || tok[len] == '#')
				break;
			tok += len;
		}
		free(copy);
		if (found)
			return true;
	}
	return false;
}

#define SSH_KEYS_UNIT "ib-ssh-host-keys.service"

/* Is rel in the merged view?  1 yes, 0 no, <0 error. */
static int present(const char *const *layers, size_t n, const char *rel)
{
	ib_overlay_entry e = IB_OVERLAY_ENTRY_INIT;
	int r = ib_overlay_lookup(&e, layers, n, rel);

	ib_overlay_entry_clear(&e);
	return r;
}

/*
 * No identity baked in (see the README's table): an empty machine-id (a
 * first boot, machine-id(5)), no SSH host keys, a host name and an
 * /etc/hosts with localhost.  An image with systemd and ssh-keygen gets a
 * unit that makes the missing host keys at boot; imagebuilder's init does
 * it (and the machine-id) itself.
 */
static int neutral_identity(const char *dir, const char *const *layers, size_t n, bool ib_init)
{
	static const char hosts[] = "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n"
				    "ff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n";
	static const char unit[] =
		"# Made by imagebuilder: images ship without SSH host keys; each machine makes its own.\n"
		"[Unit]\nDescription=Generate the SSH host keys this machine lacks\n"
		"Before=ssh.service sshd.service\n\n"
		"[Service]\nType=oneshot\nExecStart=/usr/bin/ssh-keygen -A\n\n"
		"[Install]\nWantedBy=multi-user.target\n";
	ib_overlay_entry e = IB_OVERLAY_ENTRY_INIT;
	ib_strv names = IB_STRV_INIT;
	char *text = NULL;
	int err, r;

	if ((err = put_file(dir, "etc/machine-id", "", 0, 0444)) < 0)
		return err;
	/* dbus' copy, when it is a file of its own rather than a link to it */
	if ((r = ib_overlay_lookup(&e, layers, n, "var/lib/dbus/machine-id")) < 0)
		return r;
	if (r && S_ISREG(e.st.st_mode) && (err = put_whiteout(dir, "var/lib/dbus/machine-id")) < 0)
		goto out;
	ib_overlay_entry_clear(&e);
	if ((r = ib_overlay_list(&names, layers, n, "etc/ssh")) < 0) {
		err = r;
		goto out;
	}
	for (size_t i = 0; i < names.n && !err; i++)
		if (!strncmp(names.v[i], "ssh_host_", 9)) {
			char *rel = ib_xasprintf("etc/ssh/%s", names.v[i]);
			err = put_whiteout(dir, rel);
			free(rel);
		}
	if (err)
		goto out;
	if ((r = ib_overlay_read_file(&text, NULL, layers, n, "etc/hostname", 4096, "4 KiB")) < 0) {
		err = r;
		goto out;
	}
	if ((!r || !text[strspn(text, " \t\n")]) && (err = put_file(dir, "etc/hostname", "localhost\n", 10, 0644)) < 0)
		goto out;
	free(text);
	text = NULL;
	if ((r = ib_overlay_read_file(&text, NULL, layers, n, "etc/hosts", 1 << 20, "1 MiB")) < 0) {
		err = r;
		goto out;
	}
	if (!r) {
		err = put_file(dir, "etc/hosts", hosts, sizeof(hosts) - 1, 0644);
	} else if (!has_line(text, "127.0.0.1", "localhost") || !has_line(text, "::1", "localhost")) {
		ib_buf b = IB_BUF_INIT;
		ib_buf_puts(&b, text);
		if (b.len && b.ptr[b.len - 1] != '\n')
			ib_buf_puts(&b, "\n");
		if (!has_line(text, "127.0.0.1", "localhost"))
			ib_buf_puts(&b, "127.0.0.1\tlocalhost\n");
		if (!has_line(text, "::1", "localhost"))
			ib_buf_puts(&b, "::1\t\tlocalhost ip6-localhost ip6-loopback\n");
		err = put_file(dir, "etc/hosts", b.ptr, b.len, 0644);
		ib_buf_free(&b);
	}
	if (err)
		goto out;
	if (!ib_init) {
		int systemd = present(layers, n, "usr/lib/systemd/systemd");
		int keygen = present(layers, n, "usr/bin/ssh-keygen");
		if (systemd < 0 || keygen < 0) {
			err = IB_ERROR;
			goto out;
		}
		if (systemd && keygen) {
			char *link = ib_xasprintf("%s/etc/systemd/system/multi-user.target.wants", dir);
			err = put_file(dir, "etc/systemd/system/" SSH_KEYS_UNIT, unit, sizeof(unit) - 1, 0644);
			if (!err && (err = ib_mkdir_p(link, 0755)) == 0) {
				char *path = ib_xasprintf("%s/" SSH_KEYS_UNIT, link);
				if (symlink("../" SSH_KEYS_UNIT, path) < 0)
					err = ib_error_set_errno(errno, "cannot link '%s'", path);
				free(path);
			}
			free(link);
		}
	}
out:
	ib_overlay_entry_clear(&e);
	ib_strv_free(&names);
	free(text);
	return err;
}

/* The metadata layer: /etc/imagebuilder/image.json, the env in /etc/environment, the init. */
static int make_meta_layer(const char *dir, ib_image_meta *meta, const char *const *layers, size_t n,
			   const ib_config *cfg)
{
	ib_buf envfile = IB_BUF_INIT;
	char *path = NULL, *init_rel = NULL, *init_src = NULL, *final = NULL;
	char init_sha[IB_SHA256_HEX] = "", *init_field = NULL;
	int err = 0;

	if ((err = plan_init(&init_rel, &init_src, init_sha, layers, n, cfg, meta->machine)) < 0)
		goto out;
	init_field = init_rel ? ib_xasprintf("imagebuilder:%s", init_sha) : ib_xstrdup("image");
	if (meta->init && strcmp(meta->init, init_field)) {
		err = ib_error_set("the image was exported with init '%s', and this imagebuilder has '%s': build it "
				   "again to export it afresh", meta->init, init_field);
		goto out;
	}
	ib_image_meta_set_init(meta, init_field);
	final = ib_image_meta_dump(meta);

	path = ib_xasprintf("%s/etc/imagebuilder", dir);
	if ((err = ib_mkdir_p(path, 0755)) < 0)
		goto out;
	free(path);
	path = ib_xasprintf("%s/etc/imagebuilder/image.json", dir);
	if ((err = ib_write_file_atomic(path, final, strlen(final), 0644)) < 0)
		goto out;
	if (json_object_size(meta->env)) {
		if ((err = environment_file(&envfile, meta->env, layers, n)) < 0)
			goto out;
		free(path);
		path = ib_xasprintf("%s/etc/environment", dir);
		if ((err = ib_write_file_atomic(path, envfile.ptr, envfile.len, 0644)) < 0)
			goto out;
	}
	if (init_rel && (err = install_init(dir, init_rel, init_src)) < 0)
		goto out;
	/* images with a disk_size (this version's): none made before changes its bytes */
	if (meta->disk_size && (err = neutral_identity(dir, layers, n, init_rel != NULL)) < 0)
		goto out;
	err = ib_tree_normalise(dir, meta->epoch ? meta->epoch : IB_DEFAULT_EPOCH, NULL);
out:
	ib_buf_free(&envfile);
	free(path);
	free(init_rel);
	free(init_src);
	free(init_field);
	free(final);
	return err;
}

int ib_export_image(ib_cache *cache, const ib_config *cfg, const ib_image_info *img, const char *out_path,
		    bool tar, ib_image_meta **out_meta)
{
	char *scratch = NULL, *metadir = NULL, *doc = NULL;
	char **paths = NULL;
	const char **layers = NULL;
	ib_image_meta *meta = NULL;
	int64_t epoch = img->meta->epoch ? img->meta->epoch : IB_DEFAULT_EPOCH;
	int err, tmplock = -1, *locks = NULL;

	paths = ib_xcalloc(img->nlayers + 1, sizeof(*paths));
	layers = ib_xcalloc(img->nlayers + 1, sizeof(*layers));
	locks = ib_xmalloc((img->nlayers + 1) * sizeof(*locks));
	for (size_t i = 0; i < img->nlayers; i++)
		locks[i] = -1;
	for (size_t i = 0; i < img->nlayers; i++) {
		/* in use: gc must not remove a layer while it is read */
		if ((err = ib_cache_lock_layer(cache, img->layers[i], IB_LOCK_SHARED, NULL, 0, &locks[i], NULL)) < 0)
			goto out;
		int r = ib_cache_layer_get(cache, img->layers[i], NULL);
		paths[i] = ib_cache_layer_path(cache, img->layers[i]);
		layers[i] = paths[i];
		if (r <= 0) {
			err = r < 0 ? r : ib_error_set("layer '%s' of image '%s' is not in the cache",
						       img->layers[i], img->id);
			goto out;
		}
	}
	if ((err = ib_cache_mktemp(cache, &scratch, &tmplock)) < 0)
		goto out;
	metadir = ib_xasprintf("%s/meta", scratch);
	/* a copy: the export records its init in it */
	doc = ib_image_meta_dump(img->meta);
	if ((err = ib_image_meta_parse(&meta, doc)) < 0)
		goto out;
	if ((err = make_meta_layer(metadir, meta, layers, img->nlayers, cfg)) < 0)
		goto out;
	layers[img->nlayers] = metadir;
	ib_export_opts eo = { .image_id = img->id, .epoch = epoch, .size = img->meta->disk_size };
	if (tar)
		err = ib_tar_write(out_path, layers, img->nlayers + 1, &eo);
	else
		err = ib_ext4_write(out_path, layers, img->nlayers + 1, &eo, NULL);
	if (!err && out_meta) {
		*out_meta = meta;
		meta = NULL;
	}
out:
	if (paths)
		for (size_t i = 0; i < img->nlayers; i++)
			free(paths[i]);
	if (locks)
		for (size_t i = 0; i < img->nlayers; i++)
			ib_cache_unlock(locks[i]);
	free(locks);
	free(paths);
	free(layers);
	free(metadir);
	free(doc);
	ib_image_meta_free(meta);
	ib_cache_rmtemp(scratch, tmplock);
	free(scratch);
	return err;
}

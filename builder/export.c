#include "builder/export.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
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

/* The static init for machine: beside the program, or installed. */
static char *find_init(const ib_config *cfg, const char *machine)
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
	*out_src = find_init(cfg, machine);
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
	src = find_init(cfg, meta->machine);
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
	err = ib_tree_normalise(dir, meta->epoch ? meta->epoch : IB_DEFAULT_EPOCH);
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
	ib_export_opts eo = { .image_id = img->id, .epoch = epoch };
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

#include "builder/base.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "builder/binfmt.h"
#include "lib/limits.h"
#include "lib/util.h"

int ib_base_load(ib_basedef **out, const ib_config *cfg, const char *name)
{
	char *path = NULL, *json = NULL;
	size_t len = 0;
	int err;

	if (strchr(name, '/') || name[0] == '.')
		return ib_error_set("bad base name '%s'", name);
	path = ib_xasprintf("%s/%s.json", cfg->base_images, name);
	if ((err = ib_read_file(&json, &len, path, IB_DEFINITION_MAX)) < 0)
		ib_error_prefix("cannot load base definition '%s'", path);
	else
		err = ib_basedef_parse(out, name, json, len, path);
	free(json);
	free(path);
	return err;
}

/*
 * Bootstrap in memory?  IMAGEBUILDER_BOOTSTRAP_IN_MEMORY=0 never, =1
 * always, otherwise (auto) when at least 4 GiB are available.  The tmpfs may
 * take half of what is available.
 */
static bool bootstrap_in_memory(ib_bootstrap_memory want, unsigned long long *bytes)
{
	unsigned long long avail_kb = 0;
	char *meminfo = NULL, *line;

	if (want == IB_BOOTSTRAP_DISK)
		return false;
	if (ib_read_file(&meminfo, NULL, "/proc/meminfo", 1 << 16) == 0 &&
	    (line = strstr(meminfo, "MemAvailable:")))
		avail_kb = strtoull(line + strlen("MemAvailable:"), NULL, 10);
	free(meminfo);
	*bytes = avail_kb * 1024 / 2;
	if (want == IB_BOOTSTRAP_MEMORY)
		return *bytes > 0;
	return avail_kb >= 4ULL << 20;
}

/*
 * What mmdebstrap needs that Debian packages only recommend: named before
 * any work, with the package that has it.
 */
static int preflight(const ib_basedef *b)
{
	if (!ib_proc_available("mmdebstrap"))
		return ib_error_set("bootstrapping base '%s' needs mmdebstrap: install the Debian package mmdebstrap",
				    b->name);
	if (strcmp(b->machine, ib_binfmt_host_machine()) && !ib_proc_available("arch-test"))
		return ib_error_set("bootstrapping base '%s' (%s) on %s needs arch-test, which mmdebstrap uses for "
				    "foreign architectures: install the Debian package arch-test",
				    b->name, b->machine, ib_binfmt_host_machine());
	return 0;
}

int ib_base_bootstrap(const ib_basedef *b, const char *target, const ib_config *cfg, const ib_proc_opts *popts)
{
	const char *mirror = cfg->apt_mirror;
	int64_t epoch = cfg->epoch;
	ib_strv argv = IB_STRV_INIT, env = IB_STRV_INIT;
	ib_proc_opts o = *popts;
	char *ram = NULL, *ram_root = NULL;
	unsigned long long ram_bytes = 0;
	int err;

	if ((err = preflight(b)) < 0)
		return err;
	/*
	 * In memory, mmdebstrap's dpkg and apt wait for no disk: their fsyncs
	 * (each one a journal commit of everything written so far) are what
	 * makes a bootstrap on disk slow and its time erratic.  The finished
	 * tree is then copied to target by cp -a, in the same namespace.
	 */
	if (bootstrap_in_memory(cfg->bootstrap_memory, &ram_bytes)) {
		ram = ib_xasprintf("%s.ram", target);
		ram_root = ib_xasprintf("%s/root", ram);
		if (mkdir(ram, 0700) < 0) {
			err = ib_error_set_errno(errno, "cannot create '%s'", ram);
			goto out;
		}
		o.tmpfs = ram;
		o.tmpfs_bytes = ram_bytes;
		o.name = "mmdebstrap";
		ib_strv_push(&argv, "/bin/sh");
		ib_strv_push(&argv, "-c");
		ib_strv_push(&argv, "ram=$1 target=$2; shift 2; \"$@\" && exec cp -a -- \"$ram\" \"$target\"");
		ib_strv_push(&argv, "sh");
		ib_strv_push(&argv, ram_root);
		ib_strv_push(&argv, target);
	}
	ib_strv_push(&argv, "mmdebstrap");
	ib_strv_push(&argv, "--mode=root");
	ib_strv_push(&argv, "--format=directory");
	ib_strv_pushf(&argv, "--variant=%s", b->variant);
	ib_strv_pushf(&argv, "--architectures=%s", b->arch);
	if (*b->components)
		ib_strv_pushf(&argv, "--components=%s", b->components);
	if (*b->include)
		ib_strv_pushf(&argv, "--include=%s", b->include);
	/* the caller moves the package lists into the shared apt cache */
	ib_strv_push(&argv, "--skip=cleanup/apt/lists");
	/*
	 * No fsync per unpacked file: the layer is synced as a whole when it is
	 * committed, and a bootstrap that dies leaves no layer.  mmdebstrap
	 * writes the option to etc/dpkg/dpkg.cfg.d/99mmdebstrap, which
	 * ib_base_bootstrap removes again: the image never runs dpkg unsafely.
	 */
	ib_strv_push(&argv, "--dpkgopt=force-unsafe-io");
	/* package descriptions in other languages: nobody reads them in a build */
	ib_strv_push(&argv, "--aptopt=Acquire::Languages \"none\"");
	ib_strv_push(&argv, b->suite);
	ib_strv_push(&argv, ram_root ? ram_root : target);
	if (mirror && *mirror)
		ib_strv_push(&argv, mirror);

	ib_strv_push(&env, "PATH=" IB_HOST_PATH);
	ib_strv_push(&env, "LC_ALL=C.UTF-8");
	ib_strv_pushf(&env, "SOURCE_DATE_EPOCH=%lld", (long long)epoch);
	ib_strv_push(&env, "DEBIAN_FRONTEND=noninteractive");
	if (cfg->tmpdir)
		ib_strv_pushf(&env, "TMPDIR=%s", cfg->tmpdir);
	o.flags |= IB_PROC_ISOLATE;
	o.env = (const char *const *)env.v;
	err = ib_proc_run((const char *const *)argv.v, &o);
	if (!err) {
		char *opt = ib_xasprintf("%s/etc/dpkg/dpkg.cfg.d/99mmdebstrap", target);
		if (unlink(opt) < 0 && errno != ENOENT)
			err = ib_error_set_errno(errno, "cannot remove '%s'", opt);
		free(opt);
	}
	if (err && err != IB_ETIMEOUT && err != IB_ECANCELED)
		ib_error_prefix("cannot bootstrap base '%s'", b->name);
out:
	if (ram)
		rmdir(ram);
	free(ram);
	free(ram_root);
	ib_strv_free(&argv);
	ib_strv_free(&env);
	return err;
}

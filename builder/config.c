#include "builder/config.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "lib/util.h"
#include "spec/plan.h"

static const char *env_get(const char *const *envp, const char *name)
{
	size_t n = strlen(name);

	for (; envp && *envp; envp++)
		if (!strncmp(*envp, name, n) && (*envp)[n] == '=')
			return (*envp)[n + 1] ? *envp + n + 1 : NULL;
	return NULL;
}

void ib_config_set(char **field, const char *value)
{
	free(*field);
	*field = value && *value ? ib_xstrdup(value) : NULL;
}

static bool is_dir(const char *path)
{
	struct stat st;

	return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

static char *program_dir(void)
{
	char exe[PATH_MAX], *slash;
	ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);

	if (n <= 0)
		return NULL;
	exe[n] = '\0';
	if (!(slash = strrchr(exe, '/')))
		return NULL;
	*slash = '\0';
	return ib_xstrdup(exe);
}

/* build/imagebuilder in a checkout (or its tests), or PREFIX/bin/imagebuilder. */
static char *find_base_images(const char *prog)
{
	static const char *const rel[] = { "/../base-images", "/../../base-images",
					   "/../share/imagebuilder/base-images" };

	for (size_t i = 0; prog && i < sizeof(rel) / sizeof(rel[0]); i++) {
		char *dir = ib_xasprintf("%s%s", prog, rel[i]);
		if (is_dir(dir))
			return dir;
		free(dir);
	}
	return ib_xstrdup("/usr/share/imagebuilder/base-images");
}

int ib_config_init(ib_config *cfg, const char *const *envp)
{
	const char *v;
	uint64_t epoch;

	*cfg = (ib_config)IB_CONFIG_INIT;
	cfg->epoch = IB_DEFAULT_EPOCH;
	cfg->bootstrap_memory = IB_BOOTSTRAP_AUTO;
	cfg->program_dir = program_dir();
	ib_config_set(&cfg->cache_dir, env_get(envp, "IMAGEBUILDER_CACHE_DIR"));
	if (!cfg->cache_dir)
		cfg->cache_dir = ib_xstrdup(IB_CACHE_DIR_DEFAULT);
	ib_config_set(&cfg->apt_mirror, env_get(envp, "IMAGEBUILDER_APT_MIRROR"));
	ib_config_set(&cfg->pip_index_url, env_get(envp, "IMAGEBUILDER_PIP_INDEX_URL"));
	ib_config_set(&cfg->python_mirror, env_get(envp, "IMAGEBUILDER_PYTHON_MIRROR"));
	ib_config_set(&cfg->tmpdir, env_get(envp, "TMPDIR"));
	ib_config_set(&cfg->crash_at, env_get(envp, "IMAGEBUILDER_CRASH_AT"));
	ib_config_set(&cfg->base_images, env_get(envp, "IMAGEBUILDER_BASE_IMAGES"));
	if (!cfg->base_images)
		cfg->base_images = find_base_images(cfg->program_dir);
	ib_config_set(&cfg->python_versions, env_get(envp, "IMAGEBUILDER_PYTHON_VERSIONS"));
	if (!cfg->python_versions)
		cfg->python_versions = ib_xasprintf("%s/python-versions.json", cfg->base_images);
	if ((v = env_get(envp, "SOURCE_DATE_EPOCH"))) {
		if (ib_parse_u64(&epoch, v, (uint64_t)1 << 40) < 0) {
			ib_error_prefix("SOURCE_DATE_EPOCH");
			ib_config_clear(cfg);
			return IB_EINVALID;
		}
		cfg->epoch = (int64_t)epoch;
	}
	if ((v = env_get(envp, "IMAGEBUILDER_BOOTSTRAP_IN_MEMORY")))
		cfg->bootstrap_memory = !strcmp(v, "0") ? IB_BOOTSTRAP_DISK
					: !strcmp(v, "1") ? IB_BOOTSTRAP_MEMORY : IB_BOOTSTRAP_AUTO;
	return 0;
}

void ib_config_clear(ib_config *cfg)
{
	if (!cfg)
		return;
	free(cfg->cache_dir);
	free(cfg->apt_mirror);
	free(cfg->pip_index_url);
	free(cfg->python_mirror);
	free(cfg->python_versions);
	free(cfg->base_images);
	free(cfg->program_dir);
	free(cfg->tmpdir);
	free(cfg->crash_at);
	*cfg = (ib_config)IB_CONFIG_INIT;
}

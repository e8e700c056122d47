#include "builder/config.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cache/remote.h"
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

/* The first range of at least IB_IDMAP_COUNT ids that file (/etc/subuid) gives user; 0 none. */
static uint32_t subid_base(const char *file, const char *user)
{
	char *text = NULL, *line, *save = NULL;
	size_t len = 0, ulen = strlen(user);
	uint32_t base = 0;

	if (ib_read_file(&text, &len, file, 1 << 20) < 0) {
		ib_error_clear();
		return 0;
	}
	for (line = strtok_r(text, "\n", &save); line && !base; line = strtok_r(NULL, "\n", &save)) {
		uint64_t start, count;
		char *colon;

		if (strncmp(line, user, ulen) || line[ulen] != ':' || !(colon = strchr(line + ulen + 1, ':')))
			continue;
		*colon = '\0';
		if (ib_parse_u64(&start, line + ulen + 1, UINT32_MAX - IB_IDMAP_COUNT) == 0 &&
		    ib_parse_u64(&count, colon + 1, UINT32_MAX) == 0 && count >= IB_IDMAP_COUNT && start > 0)
			base = (uint32_t)start;
		ib_error_clear();
	}
	free(text);
	return base;
}

/* IMAGEBUILDER_IDMAP=UID[:GID], the user's subordinate ids, or the default. */
static int idmap_init(ib_config *cfg, const char *v)
{
	uint64_t u, g;
	const char *colon;

	if (!v) {
		cfg->idmap_uid = subid_base("/etc/subuid", IB_IDMAP_USER);
		cfg->idmap_gid = subid_base("/etc/subgid", IB_IDMAP_USER);
		if (!cfg->idmap_uid || !cfg->idmap_gid)
			cfg->idmap_uid = cfg->idmap_gid = IB_IDMAP_DEFAULT;
		return 0;
	}
	colon = strchr(v, ':');
	{
		char *first = colon ? ib_xstrndup(v, (size_t)(colon - v)) : ib_xstrdup(v);
		int err = ib_parse_u64(&u, first, UINT32_MAX - IB_IDMAP_COUNT);
		free(first);
		if (err < 0 || u == 0 || (colon && (ib_parse_u64(&g, colon + 1, UINT32_MAX - IB_IDMAP_COUNT) < 0 || !g))) {
			ib_error_set("IMAGEBUILDER_IDMAP: '%s' is not UID[:GID], the first of %u host ids (not 0) that "
				     "root and the other users of a build step map to", v, IB_IDMAP_COUNT);
			return IB_EINVALID;
		}
	}
	cfg->idmap_uid = (uint32_t)u;
	cfg->idmap_gid = colon ? (uint32_t)g : (uint32_t)u;
	return 0;
}

int ib_config_init(ib_config *cfg, const char *const *envp)
{
	const char *v;
	uint64_t epoch;

	*cfg = (ib_config)IB_CONFIG_INIT;
	cfg->epoch = IB_DEFAULT_EPOCH;
	cfg->limits = (ib_limits){ .memory = IB_LIMIT_MEMORY_DEFAULT, .pids = IB_LIMIT_PIDS_DEFAULT,
				   .disk = IB_LIMIT_DISK_DEFAULT };
	cfg->bootstrap_memory = IB_BOOTSTRAP_AUTO;
	cfg->program_dir = program_dir();
	ib_config_set(&cfg->cache_dir, env_get(envp, "IMAGEBUILDER_CACHE_DIR"));
	if (!cfg->cache_dir)
		cfg->cache_dir = ib_xstrdup(IB_CACHE_DIR_DEFAULT);
	ib_config_set(&cfg->apt_mirror, env_get(envp, "IMAGEBUILDER_APT_MIRROR"));
	ib_config_set(&cfg->pip_index_url, env_get(envp, "IMAGEBUILDER_PIP_INDEX_URL"));
	ib_config_set(&cfg->remote, env_get(envp, "IMAGEBUILDER_REMOTE"));
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
	if (idmap_init(cfg, env_get(envp, "IMAGEBUILDER_IDMAP")) < 0) {
		ib_config_clear(cfg);
		return IB_EINVALID;
	}
	cfg->remote_chunk = IB_REMOTE_CHUNK_DEFAULT;
	if ((v = env_get(envp, "IMAGEBUILDER_REMOTE_CHUNK_SIZE")) &&
	    ib_parse_size(&cfg->remote_chunk, v, (uint64_t)1 << 40) < 0) {
		ib_error_prefix("IMAGEBUILDER_REMOTE_CHUNK_SIZE");
		ib_config_clear(cfg);
		return IB_EINVALID;
	}
	if ((v = env_get(envp, "IMAGEBUILDER_RUNNER")) && ib_runner_parse(&cfg->runner, v) < 0) {
		ib_error_prefix("IMAGEBUILDER_RUNNER");
		ib_config_clear(cfg);
		return IB_EINVALID;
	}
	ib_config_set(&cfg->vm_kernel, env_get(envp, "IMAGEBUILDER_VM_KERNEL"));
	if ((v = env_get(envp, "IMAGEBUILDER_BOOTSTRAP_IN_MEMORY")))
		cfg->bootstrap_memory = !strcmp(v, "0") ? IB_BOOTSTRAP_DISK
					: !strcmp(v, "1") ? IB_BOOTSTRAP_MEMORY : IB_BOOTSTRAP_AUTO;
	return 0;
}

int ib_runner_parse(ib_runner_kind *out, const char *name)
{
	if (!strcmp(name, "namespace"))
		*out = IB_RUNNER_NAMESPACE;
	else if (!strcmp(name, "vm"))
		*out = IB_RUNNER_VM;
	else
		return ib_error_set("unknown runner '%s' (namespace or vm)", name), IB_EINVALID;
	return 0;
}

int ib_limits_set(ib_limits *lim, const char *name, const char *value)
{
	uint64_t v = 0;

	if (strcmp(value, "0") && strcmp(value, "none")) {
		if (!strcmp(name, "memory") || !strcmp(name, "disk")) {
			if (ib_parse_size(&v, value, 1ULL << 50) < 0)
				return IB_EINVALID;
			if (v < (16ULL << 20))
				return ib_error_set("'%s' is less than 16 MiB", value), IB_EINVALID;
		} else if (!strcmp(name, "pids")) {
			if (ib_parse_u64(&v, value, 1 << 22) < 0)
				return IB_EINVALID;
			if (v < 8)
				return ib_error_set("'%s' is fewer than 8 processes", value), IB_EINVALID;
		} else if (!strcmp(name, "cpus")) {
			const char *dot = strchr(value, '.');
			char *whole = ib_xstrndup(value, dot ? (size_t)(dot - value) : strlen(value));
			uint64_t w = 0, frac = 0, scale = 100;
			int err = ib_parse_u64(&w, *whole ? whole : "0", 4096);
			free(whole);
			if (!err && dot) {
				const char *d = dot + 1;
				if (!*d || strlen(d) > 3 || strspn(d, "0123456789") != strlen(d))
					err = ib_error_set("'%s' is not a number of CPUs (up to three decimals)", value);
				for (; !err && *d; d++, scale /= 10)
					frac += (uint64_t)(*d - '0') * scale;
			}
			if (err < 0)
				return IB_EINVALID;
			v = w * 1000 + frac;
			if (v < 10)
				return ib_error_set("'%s' is less than 0.01 CPU", value), IB_EINVALID;
		} else {
			return ib_error_set("no limit '%s'", name), IB_EINVALID;
		}
	}
	if (!strcmp(name, "memory"))
		lim->memory = v;
	else if (!strcmp(name, "pids"))
		lim->pids = v;
	else if (!strcmp(name, "cpus"))
		lim->cpus = v;
	else if (!strcmp(name, "disk"))
		lim->disk = v;
	else
		return ib_error_set("no limit '%s'", name), IB_EINVALID;
	return 0;
}

static bool over(uint64_t want, uint64_t max)
{
	return max && (!want || want > max);
}

const char *ib_limits_over(const ib_limits *want, const ib_limits *max)
{
	if (over(want->memory, max->memory))
		return "memory";
	if (over(want->pids, max->pids))
		return "pids";
	if (over(want->cpus, max->cpus))
		return "cpus";
	if (over(want->disk, max->disk))
		return "disk";
	return NULL;
}

void ib_limit_format(char out[32], const ib_limits *lim, const char *name)
{
	uint64_t v = !strcmp(name, "memory") ? lim->memory : !strcmp(name, "pids") ? lim->pids
		   : !strcmp(name, "cpus")   ? lim->cpus   : lim->disk;

	if (!v)
		snprintf(out, 32, "none");
	else if (!strcmp(name, "pids"))
		snprintf(out, 32, "%llu", (unsigned long long)v);
	else if (!strcmp(name, "cpus"))
		snprintf(out, 32, "%llu.%03llu", (unsigned long long)(v / 1000), (unsigned long long)(v % 1000));
	else
		ib_format_size(out, v);
}

void ib_limits_describe(char *out, size_t size, const ib_limits *lim)
{
	char m[32], p[32], c[32], d[32];

	ib_limit_format(m, lim, "memory");
	ib_limit_format(p, lim, "pids");
	ib_limit_format(c, lim, "cpus");
	ib_limit_format(d, lim, "disk");
	snprintf(out, size, "memory %s, pids %s, cpus %s, disk %s", m, p, c, d);
}

void ib_config_clear(ib_config *cfg)
{
	if (!cfg)
		return;
	free(cfg->cache_dir);
	free(cfg->apt_mirror);
	free(cfg->pip_index_url);
	free(cfg->remote);
	free(cfg->python_mirror);
	free(cfg->python_versions);
	free(cfg->base_images);
	free(cfg->program_dir);
	free(cfg->tmpdir);
	free(cfg->crash_at);
	free(cfg->vm_kernel);
	*cfg = (ib_config)IB_CONFIG_INIT;
}

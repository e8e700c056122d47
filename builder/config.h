#ifndef IB_CONFIG_H
#define IB_CONFIG_H

#include <stdint.h>

/*
 * Configuration: filled once, from the defaults, the environment and then
 * the command line's options, and passed down.  The library reads no
 * environment variable itself; this is the one place that knows their
 * names (CONTRACT.md section 4, README "Configuration").
 */

#define IB_CACHE_DIR_DEFAULT "/var/lib/imagebuilder"

typedef enum ib_bootstrap_memory {
	IB_BOOTSTRAP_AUTO = -1, /* in memory when at least 4 GiB are available */
	IB_BOOTSTRAP_DISK = 0,
	IB_BOOTSTRAP_MEMORY = 1,
} ib_bootstrap_memory;

typedef struct ib_config {
	char *cache_dir;        /* IMAGEBUILDER_CACHE_DIR, else IB_CACHE_DIR_DEFAULT */
	char *apt_mirror;       /* IMAGEBUILDER_APT_MIRROR; NULL: the host's apt sources */
	char *pip_index_url;    /* IMAGEBUILDER_PIP_INDEX_URL; NULL: pip's default */
	char *python_mirror;    /* IMAGEBUILDER_PYTHON_MIRROR; NULL: python-build-standalone's releases */
	char *python_versions;  /* IMAGEBUILDER_PYTHON_VERSIONS, else base_images/python-versions.json */
	char *base_images;      /* IMAGEBUILDER_BASE_IMAGES, else beside the program, else /usr/share/... */
	char *program_dir;      /* the running program's directory (its init binaries); NULL: unknown */
	char *tmpdir;           /* TMPDIR, passed on to mmdebstrap; NULL: unset */
	int64_t epoch;          /* SOURCE_DATE_EPOCH, else IB_DEFAULT_EPOCH */
	ib_bootstrap_memory bootstrap_memory; /* IMAGEBUILDER_BOOTSTRAP_IN_MEMORY: 0, 1, else auto */
	char *crash_at;         /* IMAGEBUILDER_CRASH_AT: a crash point to die at (tests); NULL: none */
} ib_config;

#define IB_CONFIG_INIT { 0 }

/*
 * The defaults, overridden by envp (NULL-terminated NAME=value strings,
 * such as environ; NULL: none).  An empty variable counts as unset.  A bad
 * value is IB_EINVALID with a message naming the variable.
 */
int ib_config_init(ib_config *cfg, const char *const *envp);
void ib_config_clear(ib_config *cfg);

/* Replace a string setting (an option given on the command line); NULL or "" unsets it. */
void ib_config_set(char **field, const char *value);

#endif

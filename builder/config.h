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

/* Where a build's steps run: namespaces on the host's kernel, or a throwaway VM. */
typedef enum ib_runner_kind {
	IB_RUNNER_NAMESPACE = 0,
	IB_RUNNER_VM = 1,
} ib_runner_kind;

/* "namespace" or "vm" to *out; IB_EINVALID with a message otherwise. */
int ib_runner_parse(ib_runner_kind *out, const char *name);

typedef enum ib_bootstrap_memory {
	IB_BOOTSTRAP_AUTO = -1, /* in memory when at least 4 GiB are available */
	IB_BOOTSTRAP_DISK = 0,
	IB_BOOTSTRAP_MEMORY = 1,
} ib_bootstrap_memory;

/*
 * What one build may use (every process of its steps together; 0: no
 * limit): --memory, --pids, --cpus and --disk of build, warm and serve.
 * For serve they are also the most a BuildImage request may ask for.
 */
typedef struct ib_limits {
	uint64_t memory;  /* bytes of memory, swap off (cgroup memory.max) */
	uint64_t pids;    /* processes and threads (pids.max) */
	uint64_t cpus;    /* thousandths of a CPU (cpu.max) */
	uint64_t disk;    /* bytes a build's steps may write */
} ib_limits;

#define IB_LIMIT_MEMORY_DEFAULT	(8ULL << 30)
#define IB_LIMIT_PIDS_DEFAULT	4096
#define IB_LIMIT_DISK_DEFAULT	(32ULL << 30)

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
	char *remote;           /* IMAGEBUILDER_REMOTE or --remote: an OCI registry repository; NULL: none */
	uint64_t remote_chunk;  /* IMAGEBUILDER_REMOTE_CHUNK_SIZE: blobs larger go up in chunks of it (0: whole) */
	ib_runner_kind runner;  /* IMAGEBUILDER_RUNNER or --runner: where steps run */
	char *vm_kernel;        /* IMAGEBUILDER_VM_KERNEL: the VM runner's kernel (.deb or image); NULL: Debian's cloud kernel */
	/*
	 * Root in a step's sandbox is host uid idmap_uid (gid idmap_gid),
	 * IB_IDMAP_COUNT ids from there: IMAGEBUILDER_IDMAP=UID[:GID], else
	 * the subordinate ids of the user "imagebuilder" (/etc/subuid,
	 * /etc/subgid), else IB_IDMAP_DEFAULT.
	 */
	uint32_t idmap_uid, idmap_gid;
	ib_limits limits;       /* IB_LIMIT_*_DEFAULT; options change them */
} ib_config;

#define IB_IDMAP_COUNT		65536u
#define IB_IDMAP_DEFAULT	1000000000u
#define IB_IDMAP_USER		"imagebuilder"

#define IB_CONFIG_INIT { 0 }

/*
 * The defaults, overridden by envp (NULL-terminated NAME=value strings,
 * such as environ; NULL: none).  An empty variable counts as unset.  A bad
 * value is IB_EINVALID with a message naming the variable.
 */
int ib_config_init(ib_config *cfg, const char *const *envp);
void ib_config_clear(ib_config *cfg);

/*
 * Set one limit from an option: name is "memory", "pids", "cpus" or
 * "disk"; value a size (memory, disk), a count (pids) or a number of CPUs
 * with up to three decimals (cpus); "0" or "none" lifts the limit.
 */
int ib_limits_set(ib_limits *lim, const char *name, const char *value);

/*
 * The first limit of want ("memory", "pids", "cpus" or "disk") that allows
 * more than max does (none allows more than any number), or NULL.
 */
const char *ib_limits_over(const ib_limits *want, const ib_limits *max);

/* One limit as the options take it: "8 GiB", "4096", "1.500", "none". */
void ib_limit_format(char out[32], const ib_limits *lim, const char *name);

/* "memory 8 GiB, pids 4096, cpus none, disk 32 GiB" */
void ib_limits_describe(char *out, size_t size, const ib_limits *lim);

/* Replace a string setting (an option given on the command line); NULL or "" unsets it. */
void ib_config_set(char **field, const char *value);

#endif

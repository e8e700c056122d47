#ifndef IB_BASE_H
#define IB_BASE_H

#include <stdint.h>

#include "proc.h"

/* A base image definition, read from base-images/<name>.json. */
typedef struct ib_base {
	char *name;         /* "debian_amd64" */
	char *suite;        /* "bookworm" */
	char *arch;         /* Debian architecture: "amd64" */
	char *machine;      /* uname -m in the image: "x86_64" */
	char *variant;      /* mmdebstrap variant: "minbase" */
	char *components;   /* "main,contrib" */
	char *include;      /* "ca-certificates,..." or "" */
	char *canonical;    /* canonical JSON of the definition */
} ib_base;

/* The directory holding base definitions (IMAGEBUILDER_BASE_IMAGES, else beside the program). */
const char *ib_base_dir(void);

/* Load a base by canonical name. */
int ib_base_load(ib_base **out, const char *name);
void ib_base_free(ib_base *base);

/*
 * Bootstrap the base into target (which must not exist) with mmdebstrap,
 * from mirror (NULL: the host's apt sources), clamped to epoch.  The package
 * lists apt downloaded are left in target/var/lib/apt/lists for the caller
 * to move into the shared apt cache (so the first apt step need not fetch
 * them again) or delete.
 */
int ib_base_bootstrap(const ib_base *base, const char *target, const char *mirror, int64_t epoch,
		      const ib_proc_opts *popts);

#endif

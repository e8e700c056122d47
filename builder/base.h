#ifndef IB_BASE_H
#define IB_BASE_H

#include "builder/config.h"
#include "builder/proc.h"
#include "spec/basedef.h"

/* Load base name's definition from cfg->base_images/<name>.json. */
int ib_base_load(ib_basedef **out, const ib_config *cfg, const char *name);

/*
 * Bootstrap the base into target (which must not exist) with mmdebstrap,
 * from cfg's mirror (none: the host's apt sources), clamped to cfg's epoch.
 * The package lists apt downloaded are left in target/var/lib/apt/lists
 * for the caller to move into the shared apt cache (so the first apt step
 * need not fetch them again) or delete.
 */
int ib_base_bootstrap(const ib_basedef *base, const char *target, const ib_config *cfg,
		      const ib_proc_opts *popts);

#endif

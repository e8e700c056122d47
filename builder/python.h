#ifndef IB_PYTHON_H
#define IB_PYTHON_H

#include "builder/config.h"
#include "builder/fetch.h"
#include "cache/cache.h"
#include "spec/pytable.h"

/*
 * The pinned python (spec/pytable.h): its version table read from
 * cfg->python_versions, its archive fetched into the cache's download
 * store and unpacked into the python layer.
 */

/*
 * Look version up for machine ("x86_64", "aarch64") in the configured
 * table.  An unknown version or machine is IB_EINVALID with a message
 * listing what the table has.
 */
int ib_python_resolve(ib_python_pin *out, const ib_config *cfg, const char *version, const char *machine);

/*
 * Make sure the archive is in the cache's download store (fetching it when
 * missing, checking its digest either way); *out_path is the archive.
 */
int ib_python_fetch(char **out_path, ib_cache *cache, const ib_python_pin *pin, const ib_fetch_opts *opts);

/*
 * Unpack the archive's python/ tree into dir/usr/local.  Entries outside
 * python/, absolute paths, ".." components and links that leave the tree
 * are refused.
 */
int ib_python_unpack(const char *archive, const char *dir);

#endif

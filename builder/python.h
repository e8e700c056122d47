#ifndef IB_PYTHON_H
#define IB_PYTHON_H

#include "cache/cache.h"
#include "fetch.h"

/*
 * The pinned python: python-build-standalone "install_only" archives,
 * named by a version table (base-images/python-versions.json, or the file
 * IMAGEBUILDER_PYTHON_VERSIONS names):
 *
 *   {"3.12.1": {"release": "20240107",
 *               "sha256": {"x86_64": "<hex>", "aarch64": "<hex>"}}, ...}
 *
 * The archive for version V on machine A is
 *   $IMAGEBUILDER_PYTHON_MIRROR/<release>/cpython-V+<release>-A-unknown-linux-gnu-install_only.tar.gz
 */
#define IB_PYTHON_MIRROR_DEFAULT "https://github.com/astral-sh/python-build-standalone/releases/download"

typedef struct ib_python_pin {
	char version[16];
	char release[32];
	char machine[16];
	char sha256[IB_SHA256_HEX];
	char *url; /* owned */
} ib_python_pin;

/*
 * Look version up for machine ("x86_64", "aarch64").  An unknown version or
 * machine is IB_EINVALID with a message listing what the table has.
 */
int ib_python_resolve(ib_python_pin *out, const char *version, const char *machine);
void ib_python_pin_clear(ib_python_pin *pin);

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

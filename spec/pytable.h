#ifndef IB_PYTABLE_H
#define IB_PYTABLE_H

#include <stddef.h>

#include "lib/hash.h"

/*
 * The python version table: which python-build-standalone "install_only"
 * archive a pinned version is, and its digest per machine
 * (base-images/python-versions.json, or the file IMAGEBUILDER_PYTHON_VERSIONS
 * names):
 *
 *   {"3.12.1": {"release": "20240107",
 *               "sha256": {"x86_64": "<hex>", "aarch64": "<hex>"}}, ...}
 *
 * The archive for version V on machine A is
 *   MIRROR/<release>/cpython-V+<release>-A-unknown-linux-gnu-install_only.tar.gz
 *
 * Looking a version up is pure: the caller reads the table.
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
 * Look version up for machine ("x86_64", "aarch64") in the table
 * json[0..len), which origin names in messages; mirror (NULL or "": the
 * default) is the base of the archive's URL.  An unknown version or
 * machine is IB_EINVALID with a message listing what the table has.
 */
int ib_pytable_lookup(ib_python_pin *out, const char *json, size_t len, const char *origin, const char *version,
		      const char *machine, const char *mirror);
void ib_python_pin_clear(ib_python_pin *pin);

#endif

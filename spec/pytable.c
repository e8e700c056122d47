#include "spec/pytable.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lib/util.h"

int ib_pytable_lookup(ib_python_pin *out, const char *json, size_t len, const char *origin, const char *version,
		      const char *machine, const char *mirror)
{
	json_t *doc = NULL, *ent, *sha;
	json_error_t jerr;
	const char *release, *digest;
	ib_python_pin pin = { 0 };
	int err = 0;

	doc = json_loadb(json, len, JSON_REJECT_DUPLICATES, &jerr);
	if (!json_is_object(doc)) {
		err = ib_error_set("cannot load the python version table '%s': %s", origin,
				   doc ? "not an object" : jerr.text);
		goto out;
	}
	ent = json_object_get(doc, version);
	if (!ent) {
		ib_buf known = IB_BUF_INIT;
		const char *k;
		json_t *v;
		json_object_foreach(doc, k, v) {
			(void)v;
			ib_buf_printf(&known, "%s%s", known.len ? ", " : "", k);
		}
		ib_error_set("python_version: '%s' is not in the python version table '%s'; known: %s", version,
			     origin, known.len ? known.ptr : "none");
		ib_buf_free(&known);
		err = IB_EINVALID;
		goto out;
	}
	release = json_string_value(json_object_get(ent, "release"));
	sha = json_object_get(ent, "sha256");
	digest = json_string_value(json_object_get(sha, machine));
	if (!release || !*release || strlen(release) >= sizeof(pin.release) || strpbrk(release, "/ ") ||
	    !json_is_object(sha)) {
		err = ib_error_set("python version table '%s': entry '%s' needs \"release\" and \"sha256\"", origin,
				   version);
		goto out;
	}
	if (!digest) {
		ib_error_set("python_version: '%s' has no archive for %s in '%s'", version, machine, origin);
		err = IB_EINVALID;
		goto out;
	}
	if (strlen(digest) != 64 || !ib_is_hex64(digest)) {
		err = ib_error_set("python version table '%s': '%s' %s digest is not 64 lowercase hex digits", origin,
				   version, machine);
		goto out;
	}
	snprintf(pin.version, sizeof(pin.version), "%s", version);
	snprintf(pin.release, sizeof(pin.release), "%s", release);
	snprintf(pin.machine, sizeof(pin.machine), "%s", machine);
	snprintf(pin.sha256, sizeof(pin.sha256), "%s", digest);
	if (!mirror || !*mirror)
		mirror = IB_PYTHON_MIRROR_DEFAULT;
	pin.url = ib_xasprintf("%s%s%s/cpython-%s+%s-%s-unknown-linux-gnu-install_only.tar.gz", mirror,
			       mirror[strlen(mirror) - 1] == '/' ? "" : "/", release, version, release, machine);
	*out = pin;
out:
	json_decref(doc);
	return err;
}

void ib_python_pin_clear(ib_python_pin *pin)
{
	if (!pin)
		return;
	free(pin->url);
	memset(pin, 0, sizeof(*pin));
}

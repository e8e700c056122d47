#ifndef IB_SPEC_H
#define IB_SPEC_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "lib/field.h"
#include "lib/hash.h"
#include "lib/util.h"

struct ib_step_ops;

/* One step of a spec: its kind and its validated argument. */
typedef struct ib_step {
	const struct ib_step_ops *ops;
	json_t *arg; /* owned: the array or object given for the step */
} ib_step;

/*
 * A parsed and validated spec.  Only ib_spec_parse() makes one; every field
 * has passed validation.
 */
typedef struct ib_spec {
	char *base;           /* canonical base name, aliases resolved: "debian_amd64" */
	char *python_version; /* "X.Y.Z", or NULL when not pinned */
	uint64_t disk_size;   /* bytes of the exported file system (IB_DISK_SIZE_DEFAULT when not given) */
	size_t nsteps;
	ib_step *steps;
} ib_spec;

/*
 * Parse and validate a spec document of len bytes (CONTRACT.md section 1;
 * the rules are listed in spec.c).  On bad input returns IB_EINVALID with a
 * message that starts with the offending field, e.g.
 * "steps[1].apt_install[0]: 'Foo;' is not a Debian package name"; "spec"
 * names the document itself.  Nothing is written to *out on failure; the
 * caller frees the result with ib_spec_free().
 */
int ib_spec_parse(ib_spec **out, const char *json, size_t len);

void ib_spec_free(ib_spec *spec);

/*
 * Canonical forms are what the keys hash, so they are part of the contract:
 * jansson's JSON_COMPACT | JSON_SORT_KEYS | JSON_ENSURE_ASCII (no white
 * space, object keys in byte order, everything outside ASCII and control
 * characters as \uXXXX with uppercase hex, as jansson writes them).
 * Key order, white space, escapes and base aliases in the input do not
 * change them; the order of list items does.
 */

/* {"kind":arg} for one step; the string is the caller's to free(). */
char *ib_step_canonical(const ib_step *step);

/*
 * {"base":"debian_amd64","disk_size":4294967296,"python_version":"3.12.1" or
 * null,"steps":[...]}, base resolved, disk_size in bytes (also when the
 * spec left it to the default); the caller's to free().
 */
char *ib_spec_canonical(const ib_spec *spec);

/*
 * The layer key chain; part of the contract (the same spec gives the same
 * ids on every machine), so never change it without a new version tag.
 * Each hash input is a sequence of fields, each followed by one NUL byte
 * (ib_sha256_field()); canonical forms never contain NUL, so the encoding is
 * unambiguous:
 *
 *   base key  = SHA-256("imagebuilder/layer/v1" \0 "base" \0 base_definition_canonical \0)
 *   step key  = SHA-256("imagebuilder/layer/v1" \0 "step" \0 parent_key_hex \0 step_canonical \0)
 *   image id  = SHA-256("imagebuilder/image/v2" \0 top_key_hex \0 disk_size_decimal \0)
 *
 * Keys are 64 lowercase hex digits.  The tags keep a layer key from ever
 * equalling an image id or a key of another kind.  The image id covers
 * disk_size (bytes, as a decimal number) and the layer keys do not:
 * another size re-exports the same layers.  (v1 ids, before disk_size, were
 * SHA-256("imagebuilder/image/v1" \0 top_key_hex \0).)
 */
void ib_key_base(char key[IB_SHA256_HEX], const char *base_definition_canonical);
void ib_key_step(char key[IB_SHA256_HEX], const char *parent_key, const char *step_canonical);
void ib_key_image(char id[IB_SHA256_HEX], const char *top_key, uint64_t disk_size);

/* Resolve a base name or alias to its canonical name; NULL when unknown. */
const char *ib_spec_base_name(const char *name);

#endif

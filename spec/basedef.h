#ifndef IB_BASEDEF_H
#define IB_BASEDEF_H

#include <stddef.h>

/*
 * A base image definition, as base-images/<name>.json holds it:
 *
 *   {"name": "debian_amd64", "suite": "bookworm", "architecture": "amd64",
 *    "machine": "x86_64", "variant": "minbase", "components": ["main"],
 *    "include": ["ca-certificates"]}
 *
 * Parsing is pure (the caller reads the file); the canonical form is what
 * the base layer's key covers.
 */
typedef struct ib_basedef {
	char *name;         /* "debian_amd64" */
	char *suite;        /* "bookworm" */
	char *arch;         /* Debian architecture: "amd64" */
	char *machine;      /* uname -m in the image: "x86_64" */
	char *variant;      /* mmdebstrap variant: "minbase" */
	char *components;   /* "main,contrib" or "" */
	char *include;      /* "ca-certificates,..." or "" */
	char *canonical;    /* canonical JSON of the definition */
} ib_basedef;

/*
 * Parse the definition of base name from json[0..len); origin (a path)
 * names it in messages.  The definition must name itself name.
 */
int ib_basedef_parse(ib_basedef **out, const char *name, const char *json, size_t len, const char *origin);
void ib_basedef_free(ib_basedef *def);

#endif

#ifndef IB_META_H
#define IB_META_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "lib/hash.h"

/*
 * An image's metadata: /etc/imagebuilder/image.json in the image, and the
 * same document in the cache index.  One typed struct, parsed once where
 * the document is read (the index) and written by ib_image_meta_dump(),
 * whose bytes are part of the image (JSON_INDENT(2) | JSON_SORT_KEYS).
 *
 *   {"image_id", "base", "arch", "machine", "python_version" (or null),
 *    "python": {"version", "release", "machine", "sha256"} (when pinned),
 *    "env": {NAME: value}, "layers": [{"index", "kind", "key"}],
 *    "spec": the canonical spec, "source_date_epoch", "disk_size",
 *    "init": "image" | "imagebuilder:<sha256>" (set by the export)}
 */

typedef struct ib_image_meta_layer {
	char kind[32];
	char key[IB_SHA256_HEX];
} ib_image_meta_layer;

typedef struct ib_image_meta {
	char image_id[IB_SHA256_HEX];
	char *base;            /* "debian_amd64"; NULL when unknown */
	char *arch;            /* Debian architecture: "amd64" */
	char *machine;         /* uname -m: "x86_64" (from arch for images made before it was kept) */
	char *python_version;  /* "3.12.1", or NULL when not pinned */
	bool has_python;       /* the pin below is set */
	struct {
		char version[16];
		char release[32];
		char machine[16];
		char sha256[IB_SHA256_HEX];
	} python;
	json_t *env;           /* object of strings: the variables the env steps set */
	size_t nlayers;
	ib_image_meta_layer *layers;
	json_t *spec;          /* the canonical spec document; NULL when unknown */
	int64_t epoch;         /* SOURCE_DATE_EPOCH the image was built with */
	uint64_t disk_size;    /* bytes of its file system; 0: sized to its content (before disk_size) */
	char *init;            /* "image", "imagebuilder:<sha256>", or NULL before export */
} ib_image_meta;

/* A new, empty document: env an empty object, epoch 0.  Fill it, then dump it. */
ib_image_meta *ib_image_meta_new(void);
void ib_image_meta_free(ib_image_meta *m);

/* Parse the document; a malformed one is an error naming the field. */
int ib_image_meta_parse(ib_image_meta **out, const char *json);

/* The document as JSON (a new reference) and as the exact text images hold (the caller's). */
json_t *ib_image_meta_json(const ib_image_meta *m);
char *ib_image_meta_dump(const ib_image_meta *m);

/* Set init, replacing what was there ("image" or "imagebuilder:<sha256>"). */
void ib_image_meta_set_init(ib_image_meta *m, const char *init);

#endif

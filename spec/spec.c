/*
 * The image spec: parsing, validation, canonical forms and the layer key
 * chain.
 *
 * Validation happens here, before anything runs, and every rejection is
 * IB_EINVALID with a message that starts with the field at fault:
 *
 *  - the document: at most IB_SPEC_MAX_BYTES, no NUL byte (raw, or as
 *    \u0000 in a string), valid UTF-8 JSON with no duplicate object key and
 *    nothing after the top value, nested at most IB_JSON_DEPTH_MAX deep;
 *  - the top value: an object with the keys base (required), disk_size,
 *    python_version and steps (optional), nothing else;
 *  - base: a string, a known base or alias (ib_spec_base_name());
 *  - disk_size: see parse_disk_size();
 *  - python_version: null (not pinned) or "X.Y.Z", each part 1 to 3 digits
 *    without a leading zero, so that one version has one spelling;
 *  - steps: an array of at most IB_SPEC_MAX_STEPS objects, each with
 *    exactly one key, a registered step kind, whose own validate() checks
 *    the argument; the env steps together set at most IB_ENV_MAX_VARS
 *    variables.
 */
#include "spec/spec.h"

#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lib/limits.h"
#include "steps/step.h"

/*
 * JSON_ALLOW_NUL lets a \u0000 through jansson so that the tree walk can
 * name the field that holds it; the walk then rejects it.
 */
#define LOAD_FLAGS (JSON_REJECT_DUPLICATES | JSON_DECODE_ANY | JSON_ALLOW_NUL)
#define CANONICAL_FLAGS (JSON_COMPACT | JSON_SORT_KEYS | JSON_ENSURE_ASCII)

#define KEY_LAYER_TAG "imagebuilder/layer/v1"
#define KEY_IMAGE_TAG "imagebuilder/image/v2"

static const struct {
	const char *name;
	const char *canonical;
} bases[] = {
	{ "debian_amd64", "debian_amd64" },
	{ "debian_arm64", "debian_arm64" },
	{ "debian_amd", "debian_amd64" },
	{ "debian_arm", "debian_arm64" },
};

#define KNOWN_BASES "debian_amd64, debian_arm64 (aliases debian_amd, debian_arm)"
#define KNOWN_KEYS "base, disk_size, python_version, steps"

const char *ib_spec_base_name(const char *name)
{
	if (!name)
		return NULL;
	for (size_t i = 0; i < sizeof(bases) / sizeof(bases[0]); i++)
		if (!strcmp(name, bases[i].name))
			return bases[i].canonical;
	return NULL;
}

/* "X.Y.Z": three parts of 1 to 3 digits, no leading zero but in "0". */
static bool python_version_ok(const char *s, size_t len)
{
	size_t i = 0;

	for (int part = 0; part < 3; part++) {
		size_t start = i;

		if (part > 0) {
			if (i >= len || s[i] != '.')
				return false;
			start = ++i;
		}
		while (i < len && s[i] >= '0' && s[i] <= '9')
			i++;
		if (i == start || i - start > 3 || (s[start] == '0' && i - start > 1))
			return false;
	}
	return i == len;
}

static const char *path_name(const ib_buf *path)
{
	return path->len ? path->ptr : "spec";
}

static void path_truncate(ib_buf *path, size_t len)
{
	path->len = len;
	if (path->ptr)
		path->ptr[len] = '\0';
}

/* Append ".key", or "['key']" for a key that is not a plain word. */
static void path_add_key(ib_buf *path, const char *key)
{
	char q[IB_FIELD_QUOTE_MAX];
	size_t len = strlen(key);
	bool plain = len > 0 && len < 64;

	for (size_t i = 0; plain && i < len; i++) {
		char c = key[i];

		plain = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
			(c >= '0' && c <= '9') || c == '_' || c == '-';
	}
	if (plain)
		ib_buf_printf(path, "%s%s", path->len ? "." : "", key);
	else
		ib_buf_printf(path, "[%s]", ib_field_quote(q, key, len));
}

/*
 * Reject what no field may hold, naming the field: a NUL byte in a string
 * (jansson already refuses one in a key) and nesting deeper than
 * IB_JSON_DEPTH_MAX.  jansson bounds its own recursion (2048 levels), so
 * this walk never sees more than that before it stops.
 */
static int check_tree(const json_t *v, ib_buf *path, int depth)
{
	size_t mark = path->len;
	int r = 0;

	if (json_is_string(v)) {
		if (memchr(json_string_value(v), '\0', json_string_length(v)))
			return ib_field_invalid("%s: contains a NUL byte", path_name(path));
		return 0;
	}
	if (!json_is_array(v) && !json_is_object(v))
		return 0;
	if (depth > IB_JSON_DEPTH_MAX)
		return ib_field_invalid("%s: nested more than %d levels deep",
				       path_name(path), IB_JSON_DEPTH_MAX);
	if (json_is_array(v)) {
		for (size_t i = 0; i < json_array_size(v) && r == 0; i++) {
			ib_buf_printf(path, "[%zu]", i);
			r = check_tree(json_array_get(v, i), path, depth + 1);
			path_truncate(path, mark);
		}
	} else {
		const char *key;
		json_t *child;

		/* jansson's iteration API takes a non-const object; it does not modify it. */
		json_object_foreach((json_t *)v, key, child) {
			path_add_key(path, key);
			r = check_tree(child, path, depth + 1);
			path_truncate(path, mark);
			if (r < 0)
				break;
		}
	}
	return r;
}

/* Line and column (both from 1) of byte offset off. */
static void position(const char *s, size_t off, size_t *line, size_t *col)
{
	*line = 1;
	*col = 1;
	for (size_t i = 0; i < off; i++) {
		if (s[i] == '\n') {
			(*line)++;
			*col = 1;
		} else {
			(*col)++;
		}
	}
}

/*
 * A raw NUL byte is never valid JSON.  To name the field that holds it,
 * parse a copy with each NUL spelt \u0000: when that parses, the tree walk
 * finds the field.  Otherwise (the NUL is outside a string, or the document
 * is broken elsewhere too) report where the first NUL is.
 */
static int reject_raw_nul(const char *json, size_t len)
{
	const char *nul = memchr(json, '\0', len);
	ib_buf copy = IB_BUF_INIT, path = IB_BUF_INIT;
	json_error_t jerr;
	json_t *root;
	size_t line, col;
	int r = 0;

	for (size_t i = 0; i < len; i++) {
		if (json[i])
			ib_buf_add(&copy, json + i, 1);
		else
			ib_buf_puts(&copy, "\\u0000");
	}
	root = json_loadb(copy.ptr, copy.len, LOAD_FLAGS, &jerr);
	if (root)
		r = check_tree(root, &path, 1);
	if (r == 0) {
		position(json, (size_t)(nul - json), &line, &col);
		r = ib_field_invalid("spec: NUL byte at line %zu, column %zu", line, col);
	}
	json_decref(root);
	ib_buf_free(&path);
	ib_buf_free(&copy);
	return r;
}

static int reject_json_error(const json_error_t *jerr)
{
	char text[IB_FIELD_QUOTE_MAX * 2];
	size_t o = 0;

	/* jansson quotes input in its text; keep the message plain ASCII. */
	for (const char *p = jerr->text; *p && o + 1 < sizeof(text); p++) {
		unsigned char c = (unsigned char)*p;

		text[o++] = c >= 0x20 && c < 0x7f ? (char)c : '?';
	}
	text[o] = '\0';
	if (jerr->line < 1)
		return ib_field_invalid("spec: not valid JSON: %s", text);
	return ib_field_invalid("spec: not valid JSON at line %d, column %d: %s",
			       jerr->line, jerr->column, text);
}

/*
 * disk_size: a whole number of bytes, as a JSON integer or a string of
 * digits with an optional binary suffix K, M, G or T (either case); a
 * multiple of the 4 KiB block, from IB_DISK_SIZE_MIN to IB_DISK_SIZE_MAX.
 */
static int parse_disk_size(uint64_t *out, const json_t *v)
{
	char q[IB_FIELD_QUOTE_MAX], num[24];
	uint64_t n, mult = 1;

	if (json_is_integer(v)) {
		if (json_integer_value(v) <= 0)
			return ib_field_invalid("disk_size: %lld is not a size in bytes", (long long)json_integer_value(v));
		n = (uint64_t)json_integer_value(v);
	} else if (json_is_string(v)) {
		const char *s = json_string_value(v);
		size_t len = json_string_length(v);

		if (len && strchr("kKmMgGtT", s[len - 1])) {
			switch (s[len - 1] | 0x20) {
			case 'k': mult = 1ULL << 10; break;
			case 'm': mult = 1ULL << 20; break;
			case 'g': mult = 1ULL << 30; break;
			default: mult = 1ULL << 40; break;
			}
			len--;
		}
		if (!len || len >= sizeof(num) || strspn(s, "0123456789") != len)
			return ib_field_invalid("disk_size: %s is not a size (bytes, or a number with K, M, G or T)",
						ib_field_quote(q, s, json_string_length(v)));
		memcpy(num, s, len);
		num[len] = '\0';
		if (ib_parse_u64(&n, num, IB_DISK_SIZE_MAX / mult) < 0)
			return ib_field_invalid("disk_size: %s is larger than %llu GiB", ib_field_quote(q, s, json_string_length(v)),
						(unsigned long long)(IB_DISK_SIZE_MAX >> 30));
		n *= mult;
	} else {
		return ib_field_invalid("disk_size: expected a number of bytes or a string like \"4G\", got %s",
					ib_field_type_name(v));
	}
	if (n < IB_DISK_SIZE_MIN || n > IB_DISK_SIZE_MAX)
		return ib_field_invalid("disk_size: %llu bytes; it must be from %llu MiB to %llu GiB", (unsigned long long)n,
					(unsigned long long)(IB_DISK_SIZE_MIN >> 20),
					(unsigned long long)(IB_DISK_SIZE_MAX >> 30));
	if (n % 4096)
		return ib_field_invalid("disk_size: %llu bytes is not a multiple of 4096 (the block size)",
					(unsigned long long)n);
	*out = n;
	return 0;
}

static int parse_step(ib_step *step, const json_t *v, size_t index, size_t *nenv)
{
	char field[64], q[IB_FIELD_QUOTE_MAX];
	const ib_step_ops *ops;
	const char *kind;
	json_t *arg;
	void *iter;
	int r;

	if (!json_is_object(v))
		return ib_field_invalid("steps[%zu]: expected an object with one key, the step kind (one of %s), got %s",
				       index, ib_step_kinds(), ib_field_type_name(v));
	if (json_object_size(v) != 1)
		return ib_field_invalid("steps[%zu]: %zu keys; a step has exactly one, its kind (one of %s)",
				       index, json_object_size(v), ib_step_kinds());
	iter = json_object_iter((json_t *)v);
	kind = json_object_iter_key(iter);
	arg = json_object_iter_value(iter);
	ops = ib_step_lookup(kind);
	if (!ops)
		return ib_field_invalid("steps[%zu]: unknown step kind %s; known: %s", index,
				       ib_field_quote(q, kind, strlen(kind)), ib_step_kinds());
	snprintf(field, sizeof(field), "steps[%zu].%s", index, ops->name);
	r = ops->validate(arg, field);
	if (r < 0)
		return r;
	if (ops->flags & IB_STEP_ENV) {
		*nenv += json_object_size(arg);
		if (*nenv > IB_ENV_MAX_VARS)
			return ib_field_invalid("%s: the env steps set more than %d variables in all",
					       field, IB_ENV_MAX_VARS);
	}
	step->arg = json_deep_copy(arg);
	if (!step->arg)
		return ib_error_set("out of memory");
	step->ops = ops;
	return 0;
}

static int parse_root(ib_spec *spec, const json_t *root)
{
	char q[IB_FIELD_QUOTE_MAX];
	const char *key, *base;
	json_t *v;
	size_t nenv = 0;
	int r;

	if (!json_is_object(root))
		return ib_field_invalid("spec: expected an object, got %s", ib_field_type_name(root));
	json_object_foreach((json_t *)root, key, v) {
		if (strcmp(key, "base") && strcmp(key, "disk_size") && strcmp(key, "python_version") &&
		    strcmp(key, "steps"))
			return ib_field_invalid("spec: unknown key %s; known: " KNOWN_KEYS,
					       ib_field_quote(q, key, strlen(key)));
	}

	v = json_object_get(root, "base");
	if (!v)
		return ib_field_invalid("base: missing; one of " KNOWN_BASES " is required");
	if (!json_is_string(v))
		return ib_field_invalid("base: expected a string, got %s", ib_field_type_name(v));
	base = ib_spec_base_name(json_string_value(v));
	if (!base)
		return ib_field_invalid("base: unknown base %s; known: " KNOWN_BASES,
				       ib_field_quote(q, json_string_value(v), json_string_length(v)));
	spec->base = ib_xstrdup(base);

	v = json_object_get(root, "python_version");
	if (v && !json_is_null(v)) {
		if (!json_is_string(v))
			return ib_field_invalid("python_version: expected a string \"X.Y.Z\" or null, got %s",
					       ib_field_type_name(v));
		if (!python_version_ok(json_string_value(v), json_string_length(v)))
			return ib_field_invalid("python_version: %s is not a version X.Y.Z (digits, 1 to 3 in each part, no leading zero)",
					       ib_field_quote(q, json_string_value(v), json_string_length(v)));
		spec->python_version = ib_xstrdup(json_string_value(v));
	}

	spec->disk_size = IB_DISK_SIZE_DEFAULT;
	v = json_object_get(root, "disk_size");
	if (v && !json_is_null(v) && (r = parse_disk_size(&spec->disk_size, v)) < 0)
		return r;

	v = json_object_get(root, "steps");
	if (!v)
		return 0;
	if (!json_is_array(v))
		return ib_field_invalid("steps: expected an array, got %s", ib_field_type_name(v));
	if (json_array_size(v) > IB_SPEC_MAX_STEPS)
		return ib_field_invalid("steps: %zu steps; at most %d are allowed",
				       json_array_size(v), IB_SPEC_MAX_STEPS);
	spec->steps = ib_xcalloc(json_array_size(v), sizeof(*spec->steps));
	for (size_t i = 0; i < json_array_size(v); i++) {
		r = parse_step(&spec->steps[i], json_array_get(v, i), i, &nenv);
		if (r < 0)
			return r;
		spec->nsteps++;
	}
	return 0;
}

int ib_spec_parse(ib_spec **out, const char *json, size_t len)
{
	ib_buf path = IB_BUF_INIT;
	ib_spec *spec = NULL;
	json_t *root = NULL;
	json_error_t jerr;
	int r;

	if (!json)
		json = "";
	if (len > IB_SPEC_MAX_BYTES) {
		r = ib_field_invalid("spec: %zu bytes; at most %d are allowed", len, IB_SPEC_MAX_BYTES);
		goto out;
	}
	if (memchr(json, '\0', len)) {
		r = reject_raw_nul(json, len);
		goto out;
	}
	root = json_loadb(json, len, LOAD_FLAGS, &jerr);
	if (!root) {
		r = reject_json_error(&jerr);
		goto out;
	}
	r = check_tree(root, &path, 1);
	if (r < 0)
		goto out;
	spec = ib_xcalloc(1, sizeof(*spec));
	r = parse_root(spec, root);
	if (r < 0)
		goto out;
	*out = spec;
	spec = NULL;
out:
	ib_spec_free(spec);
	json_decref(root);
	ib_buf_free(&path);
	return r;
}

void ib_spec_free(ib_spec *spec)
{
	if (!spec)
		return;
	for (size_t i = 0; i < spec->nsteps; i++)
		json_decref(spec->steps[i].arg);
	free(spec->steps);
	free(spec->python_version);
	free(spec->base);
	free(spec);
}

static int dump_to_buf(const char *data, size_t size, void *arg)
{
	ib_buf_add(arg, data, size);
	return 0;
}

/*
 * Dump through a callback so the string comes from our allocator, not
 * jansson's.  Failing means out of memory, which aborts as in util.c.
 */
static char *canonical(const json_t *v)
{
	ib_buf b = IB_BUF_INIT;

	if (json_dump_callback(v, dump_to_buf, &b, CANONICAL_FLAGS) < 0)
		abort();
	return ib_buf_detach(&b);
}

/* A new {"kind": copy of arg}; NULL when out of memory. */
static json_t *step_object(const ib_step *step)
{
	json_t *o = json_object();

	if (o && json_object_set_new(o, step->ops->name, json_deep_copy(step->arg)) < 0) {
		json_decref(o);
		o = NULL;
	}
	return o;
}

char *ib_step_canonical(const ib_step *step)
{
	json_t *o = step_object(step);
	char *s;

	if (!o)
		abort();
	s = canonical(o);
	json_decref(o);
	return s;
}

char *ib_spec_canonical(const ib_spec *spec)
{
	json_t *o = json_object(), *steps = json_array();
	char *s;

	if (!o || !steps)
		abort();
	for (size_t i = 0; i < spec->nsteps; i++)
		if (json_array_append_new(steps, step_object(&spec->steps[i])) < 0)
			abort();
	if (json_object_set_new(o, "base", json_string(spec->base)) < 0 ||
	    json_object_set_new(o, "disk_size", json_integer((json_int_t)spec->disk_size)) < 0 ||
	    json_object_set_new(o, "python_version",
				spec->python_version ? json_string(spec->python_version) : json_null()) < 0 ||
	    json_object_set_new(o, "steps", steps) < 0)
		abort();
	s = canonical(o);
	json_decref(o);
	return s;
}

void ib_key_base(char key[IB_SHA256_HEX], const char *base_definition_canonical)
{
	ib_sha256 *h = ib_sha256_new();

	ib_sha256_field(h, KEY_LAYER_TAG);
	ib_sha256_field(h, "base");
	ib_sha256_field(h, base_definition_canonical);
	ib_sha256_final_hex(h, key);
}

void ib_key_step(char key[IB_SHA256_HEX], const char *parent_key, const char *step_canonical)
{
	ib_sha256 *h = ib_sha256_new();

	ib_sha256_field(h, KEY_LAYER_TAG);
	ib_sha256_field(h, "step");
	ib_sha256_field(h, parent_key);
	ib_sha256_field(h, step_canonical);
	ib_sha256_final_hex(h, key);
}

void ib_key_image(char id[IB_SHA256_HEX], const char *top_key, uint64_t disk_size)
{
	ib_sha256 *h = ib_sha256_new();
	char size[24];

	snprintf(size, sizeof(size), "%llu", (unsigned long long)disk_size);
	ib_sha256_field(h, KEY_IMAGE_TAG);
	ib_sha256_field(h, top_key);
	ib_sha256_field(h, size);
	ib_sha256_final_hex(h, id);
}

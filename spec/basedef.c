#include "spec/basedef.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "lib/util.h"

static int get_string(char **out, json_t *doc, const char *key, const char *origin)
{
	json_t *v = json_object_get(doc, key);

	if (!json_is_string(v))
		return ib_error_set("base definition '%s': '%s' must be a string", origin, key);
	*out = ib_xstrdup(json_string_value(v));
	return 0;
}

/* A list of words, joined by commas (mmdebstrap's syntax); "" when absent. */
static int get_list(char **out, json_t *doc, const char *key, const char *origin)
{
	json_t *v = json_object_get(doc, key), *item;
	ib_buf b = IB_BUF_INIT;
	size_t i;

	if (!v) {
		*out = ib_xstrdup("");
		return 0;
	}
	if (!json_is_array(v))
		return ib_error_set("base definition '%s': '%s' must be a list", origin, key);
	json_array_foreach(v, i, item) {
		const char *s = json_string_value(item);
		if (!s || !*s || strpbrk(s, ", \t\n")) {
			ib_buf_free(&b);
			return ib_error_set("base definition '%s': bad entry in '%s'", origin, key);
		}
		if (i)
			ib_buf_puts(&b, ",");
		ib_buf_puts(&b, s);
	}
	*out = ib_buf_detach(&b);
	return 0;
}

int ib_basedef_parse(ib_basedef **out, const char *name, const char *json, size_t len, const char *origin)
{
	ib_basedef *b = NULL;
	json_t *doc = NULL;
	json_error_t jerr;
	int err = 0;

	doc = json_loadb(json, len, JSON_REJECT_DUPLICATES, &jerr);
	if (!json_is_object(doc)) {
		err = ib_error_set("cannot load base definition '%s': %s", origin, doc ? "not an object" : jerr.text);
		goto out;
	}
	b = ib_xcalloc(1, sizeof(*b));
	if ((err = get_string(&b->name, doc, "name", origin)) < 0 ||
	    (err = get_string(&b->suite, doc, "suite", origin)) < 0 ||
	    (err = get_string(&b->arch, doc, "architecture", origin)) < 0 ||
	    (err = get_string(&b->machine, doc, "machine", origin)) < 0 ||
	    (err = get_string(&b->variant, doc, "variant", origin)) < 0 ||
	    (err = get_list(&b->components, doc, "components", origin)) < 0 ||
	    (err = get_list(&b->include, doc, "include", origin)) < 0)
		goto out;
	if (strcmp(b->name, name)) {
		err = ib_error_set("base definition '%s' names itself '%s'", origin, b->name);
		goto out;
	}
	b->canonical = json_dumps(doc, JSON_COMPACT | JSON_SORT_KEYS | JSON_ENSURE_ASCII);
	if (!b->canonical)
		abort();
out:
	json_decref(doc);
	if (err) {
		ib_basedef_free(b);
		return err;
	}
	*out = b;
	return 0;
}

void ib_basedef_free(ib_basedef *b)
{
	if (!b)
		return;
	free(b->name);
	free(b->suite);
	free(b->arch);
	free(b->machine);
	free(b->variant);
	free(b->components);
	free(b->include);
	free(b->canonical);
	free(b);
}

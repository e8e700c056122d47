#include "layer/meta.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lib/util.h"

ib_image_meta *ib_image_meta_new(void)
{
	ib_image_meta *m = ib_xcalloc(1, sizeof(*m));

	m->env = json_object();
	return m;
}

void ib_image_meta_free(ib_image_meta *m)
{
	if (!m)
		return;
	free(m->base);
	free(m->arch);
	free(m->machine);
	free(m->python_version);
	json_decref(m->env);
	free(m->layers);
	json_decref(m->spec);
	free(m->init);
	free(m);
}

void ib_image_meta_set_init(ib_image_meta *m, const char *init)
{
	free(m->init);
	m->init = init ? ib_xstrdup(init) : NULL;
}

/* A string member into a fixed buffer, or a missing optional one. */
static int get_fixed(char *dst, size_t size, json_t *doc, const char *key, bool required)
{
	json_t *v = json_object_get(doc, key);

	if (!v && !required)
		return 0;
	if (!json_is_string(v) || json_string_length(v) >= size)
		return ib_error_set("image metadata: '%s' must be a string of fewer than %zu bytes", key, size);
	memcpy(dst, json_string_value(v), json_string_length(v) + 1);
	return 0;
}

/* A string member, or NULL when absent or null. */
static int get_string(char **dst, json_t *doc, const char *key)
{
	json_t *v = json_object_get(doc, key);

	if (!v || json_is_null(v))
		return 0;
	if (!json_is_string(v))
		return ib_error_set("image metadata: '%s' must be a string", key);
	*dst = ib_xstrdup(json_string_value(v));
	return 0;
}

int ib_image_meta_parse(ib_image_meta **out, const char *json)
{
	ib_image_meta *m = ib_image_meta_new();
	json_t *doc = NULL, *v, *py, *layers;
	json_error_t jerr;
	const char *k;
	size_t i;
	int err = 0;

	doc = json_loads(json ? json : "", JSON_REJECT_DUPLICATES, &jerr);
	if (!json_is_object(doc)) {
		err = ib_error_set("image metadata: %s", doc ? "not an object" : jerr.text);
		goto out;
	}
	if ((err = get_fixed(m->image_id, sizeof(m->image_id), doc, "image_id", true)) < 0 ||
	    (err = get_string(&m->base, doc, "base")) < 0 || (err = get_string(&m->arch, doc, "arch")) < 0 ||
	    (err = get_string(&m->machine, doc, "machine")) < 0 ||
	    (err = get_string(&m->python_version, doc, "python_version")) < 0 ||
	    (err = get_string(&m->init, doc, "init")) < 0)
		goto out;
	if (!m->arch)
		m->arch = ib_xstrdup("amd64");
	if (!m->machine) /* images indexed before "machine" was kept */
		m->machine = ib_xstrdup(!strcmp(m->arch, "arm64") ? "aarch64" : "x86_64");
	if ((py = json_object_get(doc, "python")) && !json_is_null(py)) {
		if (!json_is_object(py) ||
		    (err = get_fixed(m->python.version, sizeof(m->python.version), py, "version", true)) < 0 ||
		    (err = get_fixed(m->python.release, sizeof(m->python.release), py, "release", true)) < 0 ||
		    (err = get_fixed(m->python.machine, sizeof(m->python.machine), py, "machine", true)) < 0 ||
		    (err = get_fixed(m->python.sha256, sizeof(m->python.sha256), py, "sha256", true)) < 0) {
			err = err ? err : ib_error_set("image metadata: 'python' must be an object");
			goto out;
		}
		m->has_python = true;
	}
	if ((v = json_object_get(doc, "env")) && !json_is_null(v)) {
		if (!json_is_object(v)) {
			err = ib_error_set("image metadata: 'env' must be an object");
			goto out;
		}
		json_object_foreach(v, k, py) {
			if (!json_is_string(py)) {
				err = ib_error_set("image metadata: env '%s' must be a string", k);
				goto out;
			}
		}
		json_object_update(m->env, v);
	}
	layers = json_object_get(doc, "layers");
	if (layers && !json_is_array(layers)) {
		err = ib_error_set("image metadata: 'layers' must be an array");
		goto out;
	}
	m->layers = ib_xcalloc(json_array_size(layers) + 1, sizeof(*m->layers));
	json_array_foreach(layers, i, v) {
		if ((err = get_fixed(m->layers[i].kind, sizeof(m->layers[i].kind), v, "kind", true)) < 0 ||
		    (err = get_fixed(m->layers[i].key, sizeof(m->layers[i].key), v, "key", true)) < 0)
			goto out;
		m->nlayers++;
	}
	if ((v = json_object_get(doc, "spec")) && !json_is_null(v))
		m->spec = json_incref(v);
	if ((v = json_object_get(doc, "disk_size")) && !json_is_null(v)) {
		if (!json_is_integer(v) || json_integer_value(v) < 0) {
			err = ib_error_set("image metadata: 'disk_size' must be a number of bytes");
			goto out;
		}
		m->disk_size = (uint64_t)json_integer_value(v);
	}
	if ((v = json_object_get(doc, "source_date_epoch")) && !json_is_null(v)) {
		if (!json_is_integer(v)) {
			err = ib_error_set("image metadata: 'source_date_epoch' must be an integer");
			goto out;
		}
		m->epoch = json_integer_value(v);
	}
out:
	json_decref(doc);
	if (err) {
		ib_image_meta_free(m);
		return err;
	}
	*out = m;
	return 0;
}

json_t *ib_image_meta_json(const ib_image_meta *m)
{
	json_t *doc = json_object(), *layers = json_array();

	for (size_t i = 0; i < m->nlayers; i++)
		json_array_append_new(layers, json_pack("{s:i, s:s, s:s}", "index", (int)i, "kind", m->layers[i].kind,
							"key", m->layers[i].key));
	json_object_set_new(doc, "image_id", json_string(m->image_id));
	json_object_set_new(doc, "base", m->base ? json_string(m->base) : json_null());
	json_object_set_new(doc, "arch", json_string(m->arch ? m->arch : ""));
	json_object_set_new(doc, "machine", json_string(m->machine ? m->machine : ""));
	json_object_set_new(doc, "python_version", m->python_version ? json_string(m->python_version) : json_null());
	if (m->has_python)
		json_object_set_new(doc, "python", json_pack("{s:s, s:s, s:s, s:s}", "version", m->python.version,
							      "release", m->python.release, "machine",
							      m->python.machine, "sha256", m->python.sha256));
	json_object_set_new(doc, "env", json_deep_copy(m->env));
	json_object_set_new(doc, "layers", layers);
	json_object_set_new(doc, "spec", m->spec ? json_deep_copy(m->spec) : json_null());
	json_object_set_new(doc, "source_date_epoch", json_integer(m->epoch));
	if (m->disk_size)
		json_object_set_new(doc, "disk_size", json_integer((json_int_t)m->disk_size));
	if (m->init)
		json_object_set_new(doc, "init", json_string(m->init));
	return doc;
}

char *ib_image_meta_dump(const ib_image_meta *m)
{
	json_t *doc = ib_image_meta_json(m);
	char *s = json_dumps(doc, JSON_INDENT(2) | JSON_SORT_KEYS);

	json_decref(doc);
	if (!s)
		abort();
	return s;
}

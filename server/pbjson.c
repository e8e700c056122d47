/*
 * proto3 JSON for the ImageBuilder schema, walked from protobuf-c's
 * descriptors: one generic mapping instead of a hand-written copy per
 * message.  The layout it relies on is protobuf-c's (protobuf-c.h): a
 * field's value at its offset; for a repeated field the count (size_t) at
 * its quantifier_offset and an array at its offset; for a oneof member the
 * case (uint32_t, the member's field number) at its quantifier_offset.
 */
#include "server/pbjson.h"

#include <math.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "lib/util.h"

/* The schema's json_name where it is not the field's own name (decision 12 of the .proto). */
static const char *json_name(const ProtobufCFieldDescriptor *f)
{
	return !strcmp(f->name, "base_image") ? "base" : f->name;
}

static bool is(const ProtobufCMessageDescriptor *d, const char *name)
{
	return !strcmp(d->name, name);
}

static bool is_wrapper(const ProtobufCMessageDescriptor *d)
{
	size_t n = strlen(d->name);

	return !strncmp(d->name, "google.protobuf.", 16) && n > 21 && !strcmp(d->name + n - 5, "Value") &&
	       d->n_fields == 1 && !strcmp(d->fields[0].name, "value");
}

/* A map field: a repeated message whose type is the generated XxxEntry {key = 1; value = 2}. */
static bool is_map(const ProtobufCFieldDescriptor *f)
{
	const ProtobufCMessageDescriptor *d = f->descriptor;
	size_t n;

	if (f->label != PROTOBUF_C_LABEL_REPEATED || f->type != PROTOBUF_C_TYPE_MESSAGE)
		return false;
	n = strlen(d->short_name);
	return n > 5 && !strcmp(d->short_name + n - 5, "Entry") && d->n_fields == 2 &&
	       !strcmp(d->fields[0].name, "key") && !strcmp(d->fields[1].name, "value");
}

static void *at(const void *m, unsigned offset)
{
	return (char *)m + offset;
}

/* ---- message to JSON ---- */

static json_t *msg_to_json(const ProtobufCMessage *m);

json_t *srv_json_base64(const void *data, size_t len)
{
	char *out = ib_xmalloc(4 * ((len + 2) / 3) + 1);
	json_t *j;

	EVP_EncodeBlock((unsigned char *)out, data, (int)len);
	j = json_string(out);
	free(out);
	return j;
}

static json_t *number(double v)
{
	if (isfinite(v) && v == floor(v) && fabs(v) < 9007199254740992.0)
		return json_integer((json_int_t)v);
	return json_real(v);
}

/* One value of field f at p; NULL (error set) when it cannot be said in JSON. */
static json_t *value_to_json(const ProtobufCFieldDescriptor *f, const void *p)
{
	switch (f->type) {
	case PROTOBUF_C_TYPE_INT32:
	case PROTOBUF_C_TYPE_SINT32:
	case PROTOBUF_C_TYPE_SFIXED32: return json_integer(*(const int32_t *)p);
	case PROTOBUF_C_TYPE_UINT32:
	case PROTOBUF_C_TYPE_FIXED32: return json_integer(*(const uint32_t *)p);
	case PROTOBUF_C_TYPE_INT64:
	case PROTOBUF_C_TYPE_SINT64:
	case PROTOBUF_C_TYPE_SFIXED64: return json_integer(*(const int64_t *)p);
	case PROTOBUF_C_TYPE_UINT64:
	case PROTOBUF_C_TYPE_FIXED64:
		if (*(const uint64_t *)p > INT64_MAX)
			return ib_error_set("%s: %llu is too large", f->name, (unsigned long long)*(const uint64_t *)p),
			       NULL;
		return json_integer((json_int_t) * (const uint64_t *)p);
	case PROTOBUF_C_TYPE_FLOAT: return number(*(const float *)p);
	case PROTOBUF_C_TYPE_DOUBLE: return number(*(const double *)p);
	case PROTOBUF_C_TYPE_BOOL: return json_boolean(*(const protobuf_c_boolean *)p);
	case PROTOBUF_C_TYPE_ENUM: {
		const ProtobufCEnumValue *v = protobuf_c_enum_descriptor_get_value(f->descriptor, *(const int *)p);
		return v ? json_string(v->name) : json_integer(*(const int *)p);
	}
	case PROTOBUF_C_TYPE_STRING: {
		const char *s = *(char *const *)p;
		return json_string(s ? s : "");
	}
	case PROTOBUF_C_TYPE_BYTES: return srv_json_base64(((const ProtobufCBinaryData *)p)->data, ((const ProtobufCBinaryData *)p)->len);
	case PROTOBUF_C_TYPE_MESSAGE: {
		const ProtobufCMessage *sub = *(ProtobufCMessage *const *)p;
		return sub ? msg_to_json(sub) : json_null();
	}
	}
	return ib_error_set("%s: a type this server does not know", f->name), NULL;
}

/* The proto3 default: left out of the JSON. */
static bool is_default(const ProtobufCFieldDescriptor *f, const void *p)
{
	switch (f->type) {
	case PROTOBUF_C_TYPE_INT32:
	case PROTOBUF_C_TYPE_SINT32:
	case PROTOBUF_C_TYPE_SFIXED32:
	case PROTOBUF_C_TYPE_UINT32:
	case PROTOBUF_C_TYPE_FIXED32: return *(const uint32_t *)p == 0;
	case PROTOBUF_C_TYPE_INT64:
	case PROTOBUF_C_TYPE_SINT64:
	case PROTOBUF_C_TYPE_SFIXED64:
	case PROTOBUF_C_TYPE_UINT64:
	case PROTOBUF_C_TYPE_FIXED64: return *(const uint64_t *)p == 0;
	case PROTOBUF_C_TYPE_FLOAT: return *(const float *)p == 0;
	case PROTOBUF_C_TYPE_DOUBLE: return *(const double *)p == 0;
	case PROTOBUF_C_TYPE_BOOL: return !*(const protobuf_c_boolean *)p;
	case PROTOBUF_C_TYPE_ENUM: return *(const int *)p == 0;
	case PROTOBUF_C_TYPE_STRING: return !*(char *const *)p || !**(char *const *)p;
	case PROTOBUF_C_TYPE_BYTES: return ((const ProtobufCBinaryData *)p)->len == 0;
	case PROTOBUF_C_TYPE_MESSAGE: return !*(ProtobufCMessage *const *)p;
	}
	return true;
}

static size_t elem_size(const ProtobufCFieldDescriptor *f)
{
	switch (f->type) {
	case PROTOBUF_C_TYPE_INT64:
	case PROTOBUF_C_TYPE_SINT64:
	case PROTOBUF_C_TYPE_SFIXED64:
	case PROTOBUF_C_TYPE_UINT64:
	case PROTOBUF_C_TYPE_FIXED64: return 8;
	case PROTOBUF_C_TYPE_DOUBLE: return sizeof(double);
	case PROTOBUF_C_TYPE_FLOAT: return sizeof(float);
	case PROTOBUF_C_TYPE_BOOL: return sizeof(protobuf_c_boolean);
	case PROTOBUF_C_TYPE_ENUM: return sizeof(int);
	case PROTOBUF_C_TYPE_STRING: return sizeof(char *);
	case PROTOBUF_C_TYPE_BYTES: return sizeof(ProtobufCBinaryData);
	case PROTOBUF_C_TYPE_MESSAGE: return sizeof(ProtobufCMessage *);
	default: return 4;
	}
}

static json_t *timestamp_to_json(const ProtobufCMessage *m)
{
	int64_t secs = *(const int64_t *)at(m, m->descriptor->fields[0].offset);
	int32_t nanos = *(const int32_t *)at(m, m->descriptor->fields[1].offset);
	time_t t = (time_t)secs;
	struct tm tm;
	char buf[64];

	if (!gmtime_r(&t, &tm))
		return ib_error_set("a timestamp out of range"), NULL;
	snprintf(buf, sizeof(buf), "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900, tm.tm_mon + 1,
		 tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec, (int)(nanos / 1000000));
	return json_string(buf);
}

static json_t *msg_to_json(const ProtobufCMessage *m)
{
	const ProtobufCMessageDescriptor *d = m->descriptor;
	json_t *obj;

	if (m->n_unknown_fields)
		return ib_error_set("%s: field %u is not in this server's schema", d->name,
				    (unsigned)m->unknown_fields[0].tag), NULL;
	if (is(d, "google.protobuf.Value")) {
		uint32_t kind = *(const uint32_t *)at(m, d->fields[0].quantifier_offset);
		for (unsigned i = 0; i < d->n_fields; i++) {
			const ProtobufCFieldDescriptor *f = &d->fields[i];
			if (f->id != kind)
				continue;
			if (!strcmp(f->name, "null_value"))
				return json_null();
			return value_to_json(f, at(m, f->offset));
		}
		return json_null();
	}
	if (is(d, "google.protobuf.ListValue")) {
		const ProtobufCFieldDescriptor *f = &d->fields[0];
		size_t n = *(const size_t *)at(m, f->quantifier_offset);
		ProtobufCMessage **v = *(ProtobufCMessage ***)at(m, f->offset);
		json_t *arr = json_array();
		for (size_t i = 0; i < n; i++) {
			json_t *e = msg_to_json(v[i]);
			if (!e) {
				json_decref(arr);
				return NULL;
			}
			json_array_append_new(arr, e);
		}
		return arr;
	}
	if (is(d, "google.protobuf.Timestamp"))
		return timestamp_to_json(m);
	if (is_wrapper(d))
		return value_to_json(&d->fields[0], at(m, d->fields[0].offset));

	obj = json_object();
	for (unsigned i = 0; i < d->n_fields; i++) {
		const ProtobufCFieldDescriptor *f = &d->fields[i];
		json_t *v;

		if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) {
			if (*(const uint32_t *)at(m, f->quantifier_offset) != f->id)
				continue;
			v = value_to_json(f, at(m, f->offset));
		} else if (f->label == PROTOBUF_C_LABEL_REPEATED) {
			size_t n = *(const size_t *)at(m, f->quantifier_offset);
			const char *arr = *(char *const *)at(m, f->offset);
			if (!n)
				continue;
			v = is_map(f) || is(d, "google.protobuf.Struct") ? json_object() : json_array();
			for (size_t k = 0; k < n && v; k++) {
				const void *p = arr + k * elem_size(f);
				if (json_is_object(v)) {
					const ProtobufCMessage *e = *(ProtobufCMessage *const *)p;
					const ProtobufCMessageDescriptor *ed = e->descriptor;
					const char *key = *(char *const *)at(e, ed->fields[0].offset);
					json_t *ev = value_to_json(&ed->fields[1], at(e, ed->fields[1].offset));
					if (!ev) {
						json_decref(v);
						v = NULL;
						break;
					}
					json_object_set_new(v, key ? key : "", ev);
				} else {
					json_t *ev = value_to_json(f, p);
					if (!ev) {
						json_decref(v);
						v = NULL;
						break;
					}
					json_array_append_new(v, ev);
				}
			}
		} else {
			if (is_default(f, at(m, f->offset)))
				continue;
			v = value_to_json(f, at(m, f->offset));
		}
		if (!v) {
			json_decref(obj);
			return NULL;
		}
		json_object_set_new(obj, json_name(f), v);
	}
	if (is(d, "google.protobuf.Struct")) {
		/* {"fields": {...}} is the map itself */
		json_t *fields = json_incref(json_object_get(obj, "fields"));
		json_decref(obj);
		return fields ? fields : json_object();
	}
	return obj;
}

json_t *srv_pb_to_json(const ProtobufCMessage *m)
{
	return msg_to_json(m);
}

/* ---- JSON to message ---- */

static int msg_from_json(const ProtobufCMessageDescriptor *d, json_t *j, ProtobufCMessage **out, const char *path);

static ProtobufCMessage *new_msg(const ProtobufCMessageDescriptor *d)
{
	ProtobufCMessage *m = ib_xcalloc(1, d->sizeof_message);

	d->message_init(m);
	return m;
}

static int wrong(const char *path, const char *want, json_t *v)
{
	static const char *const names[] = { "an object", "an array", "a string", "an integer", "a number",
					     "true", "false", "null" };

	return ib_error_set("%s: must be %s, not %s", path, want, names[json_typeof(v)]);
}

static int u64_of(json_t *v, uint64_t *out)
{
	if (json_is_integer(v) && json_integer_value(v) >= 0) {
		*out = (uint64_t)json_integer_value(v);
		return 0;
	}
	if (json_is_string(v) && ib_parse_u64(out, json_string_value(v), UINT64_MAX) == 0)
		return 0;
	ib_error_clear();
	return -1;
}

static int timestamp_from_json(ProtobufCMessage *m, json_t *v, const char *path)
{
	const ProtobufCMessageDescriptor *d = m->descriptor;
	struct tm tm = { 0 };
	int ms = 0, n = 0;
	const char *s = json_string_value(v);

	if (!s || sscanf(s, "%4d-%2d-%2dT%2d:%2d:%2d%n", &tm.tm_year, &tm.tm_mon, &tm.tm_mday, &tm.tm_hour,
			 &tm.tm_min, &tm.tm_sec, &n) != 6)
		return ib_error_set("%s: must be an RFC 3339 time in UTC", path);
	if (s[n] == '.')
		sscanf(s + n + 1, "%3d", &ms);
	tm.tm_year -= 1900;
	tm.tm_mon -= 1;
	*(int64_t *)at(m, d->fields[0].offset) = (int64_t)timegm(&tm);
	*(int32_t *)at(m, d->fields[1].offset) = ms * 1000000;
	return 0;
}

/* One value of field f from v into p. */
static int value_from_json(const ProtobufCFieldDescriptor *f, json_t *v, void *p, const char *path)
{
	uint64_t u;

	switch (f->type) {
	case PROTOBUF_C_TYPE_INT32:
	case PROTOBUF_C_TYPE_SINT32:
	case PROTOBUF_C_TYPE_SFIXED32:
	case PROTOBUF_C_TYPE_UINT32:
	case PROTOBUF_C_TYPE_FIXED32:
		if (u64_of(v, &u) < 0 || u > UINT32_MAX)
			return wrong(path, "a 32-bit number", v);
		*(uint32_t *)p = (uint32_t)u;
		return 0;
	case PROTOBUF_C_TYPE_INT64:
	case PROTOBUF_C_TYPE_SINT64:
	case PROTOBUF_C_TYPE_SFIXED64:
	case PROTOBUF_C_TYPE_UINT64:
	case PROTOBUF_C_TYPE_FIXED64:
		if (u64_of(v, &u) < 0)
			return wrong(path, "a whole number", v);
		*(uint64_t *)p = u;
		return 0;
	case PROTOBUF_C_TYPE_FLOAT:
	case PROTOBUF_C_TYPE_DOUBLE:
		if (!json_is_number(v))
			return wrong(path, "a number", v);
		if (f->type == PROTOBUF_C_TYPE_FLOAT)
			*(float *)p = (float)json_number_value(v);
		else
			*(double *)p = json_number_value(v);
		return 0;
	case PROTOBUF_C_TYPE_BOOL:
		if (!json_is_boolean(v))
			return wrong(path, "true or false", v);
		*(protobuf_c_boolean *)p = json_is_true(v);
		return 0;
	case PROTOBUF_C_TYPE_ENUM: {
		const ProtobufCEnumValue *ev = json_is_string(v)
			? protobuf_c_enum_descriptor_get_value_by_name(f->descriptor, json_string_value(v))
			: NULL;
		if (!ev)
			return wrong(path, "one of the enum's names", v);
		*(int *)p = ev->value;
		return 0;
	}
	case PROTOBUF_C_TYPE_STRING:
		if (!json_is_string(v))
			return wrong(path, "a string", v);
		*(char **)p = ib_xstrndup(json_string_value(v), json_string_length(v));
		return 0;
	case PROTOBUF_C_TYPE_BYTES: {
		ProtobufCBinaryData *b = p;
		size_t len;
		int n;
		if (!json_is_string(v) || (len = json_string_length(v)) % 4)
			return wrong(path, "base64", v);
		b->data = ib_xmalloc(len / 4 * 3 + 1);
		n = EVP_DecodeBlock(b->data, (const unsigned char *)json_string_value(v), (int)len);
		if (n < 0) {
			free(b->data);
			b->data = NULL;
			return wrong(path, "base64", v);
		}
		/* EVP_DecodeBlock counts the padding's bytes */
		for (size_t k = len; k > 0 && json_string_value(v)[k - 1] == '='; k--)
			n--;
		b->len = (size_t)n;
		return 0;
	}
	case PROTOBUF_C_TYPE_MESSAGE:
		return msg_from_json(f->descriptor, v, (ProtobufCMessage **)p, path);
	}
	return ib_error_set("%s: a type this server does not know", path);
}

static int fields_from_json(ProtobufCMessage *m, json_t *j, const char *path)
{
	const ProtobufCMessageDescriptor *d = m->descriptor;

	if (!json_is_object(j))
		return wrong(path, "an object", j);
	for (unsigned i = 0; i < d->n_fields; i++) {
		const ProtobufCFieldDescriptor *f = &d->fields[i];
		json_t *v = json_object_get(j, json_name(f));
		char *sub;
		int err = 0;

		if (!v || json_is_null(v))
			continue;
		sub = ib_xasprintf("%s.%s", path, json_name(f));
		if (f->label == PROTOBUF_C_LABEL_REPEATED) {
			size_t n = is_map(f) ? json_object_size(v) : json_array_size(v), k = 0;
			char *arr;

			if (is_map(f) ? !json_is_object(v) : !json_is_array(v)) {
				err = wrong(sub, is_map(f) ? "an object" : "an array", v);
				free(sub);
				return err;
			}
			arr = ib_xcalloc(n ? n : 1, elem_size(f));
			*(char **)at(m, f->offset) = arr;
			*(size_t *)at(m, f->quantifier_offset) = n;
			if (is_map(f)) {
				const char *key;
				json_t *ev;
				const ProtobufCMessageDescriptor *ed = f->descriptor;
				json_object_foreach(v, key, ev) {
					ProtobufCMessage *e = new_msg(ed);
					((ProtobufCMessage **)arr)[k++] = e;
					*(char **)at(e, ed->fields[0].offset) = ib_xstrdup(key);
					if ((err = value_from_json(&ed->fields[1], ev, at(e, ed->fields[1].offset), sub)) < 0)
						break;
				}
			} else {
				for (; k < n && !err; k++)
					err = value_from_json(f, json_array_get(v, k), arr + k * elem_size(f), sub);
			}
		} else {
			if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF)
				*(uint32_t *)at(m, f->quantifier_offset) = f->id;
			err = value_from_json(f, v, at(m, f->offset), sub);
		}
		free(sub);
		if (err)
			return err;
	}
	return 0;
}

/* ListValue and Struct: the JSON array or object is their one field's. */
static int wrapped_from_json(ProtobufCMessage *m, const char *field, bool shape_ok, const char *shape,
			     json_t *j, const char *path)
{
	json_t *wrap;
	int err;

	if (!shape_ok)
		return wrong(path, shape, j);
	wrap = json_pack("{s:O}", field, j);
	err = fields_from_json(m, wrap, path);
	json_decref(wrap);
	return err;
}

static int msg_from_json(const ProtobufCMessageDescriptor *d, json_t *j, ProtobufCMessage **out, const char *path)
{
	ProtobufCMessage *m = new_msg(d);

	*out = m;
	if (is(d, "google.protobuf.Value")) {
		const char *want = json_is_null(j) ? "null_value" : json_is_boolean(j) ? "bool_value"
				 : json_is_number(j) ? "number_value" : json_is_string(j) ? "string_value"
				 : json_is_object(j) ? "struct_value" : "list_value";
		const ProtobufCFieldDescriptor *f = protobuf_c_message_descriptor_get_field_by_name(d, want);
		*(uint32_t *)at(m, f->quantifier_offset) = f->id;
		if (f->type == PROTOBUF_C_TYPE_ENUM)
			return 0; /* NULL_VALUE = 0 */
		return value_from_json(f, j, at(m, f->offset), path);
	}
	if (is(d, "google.protobuf.ListValue"))
		return wrapped_from_json(m, "values", json_is_array(j), "an array", j, path);
	if (is(d, "google.protobuf.Struct"))
		return wrapped_from_json(m, "fields", json_is_object(j), "an object", j, path);
	if (is(d, "google.protobuf.Timestamp"))
		return timestamp_from_json(m, j, path);
	if (is_wrapper(d))
		return value_from_json(&d->fields[0], j, at(m, d->fields[0].offset), path);
	return fields_from_json(m, j, path);
}

int srv_pb_from_json(const ProtobufCMessageDescriptor *d, json_t *doc, ProtobufCMessage **out)
{
	int err = msg_from_json(d, doc, out, d->short_name);

	if (err) {
		protobuf_c_message_free_unpacked(*out, NULL);
		*out = NULL;
	}
	return err;
}

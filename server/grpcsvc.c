/*
 * The two services every gRPC tool looks for: grpc.health.v1.Health and
 * server reflection (grpc.reflection.v1 and v1alpha, the same messages).
 * Reflection answers from the descriptor set protoc-c made at build time
 * (build/gen/descriptor-set.c), so clients need no .proto.
 */
#include "server/server-internal.h"

#include <google/protobuf/descriptor.pb-c.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

extern const unsigned char ib_descriptor_set[];
extern const size_t ib_descriptor_set_len;

/* The services this server answers, for health and list_services. */
static const char *const services[] = {
	"imagebuilder.v1.ImageBuilder",
	"grpc.health.v1.Health",
	"grpc.reflection.v1.ServerReflection",
	"grpc.reflection.v1alpha.ServerReflection",
};
#define NSERVICES (sizeof(services) / sizeof(services[0]))

json_t *srv_health_status(ib_server *srv, const char *service)
{
	bool known = !*service, draining;

	for (size_t i = 0; i < NSERVICES && !known; i++)
		known = !strcmp(service, services[i]);
	if (!known)
		return NULL;
	pthread_mutex_lock(&srv->mu);
	draining = srv->draining;
	pthread_mutex_unlock(&srv->mu);
	return json_pack("{s:s}", "status", draining ? "NOT_SERVING" : "SERVING");
}

/* ---- reflection ---- */

static Google__Protobuf__FileDescriptorSet *fileset;
static pthread_once_t fileset_once = PTHREAD_ONCE_INIT;

static void load_fileset(void)
{
	fileset = google__protobuf__file_descriptor_set__unpack(NULL, ib_descriptor_set_len, ib_descriptor_set);
}

static bool prefixed(const char *full, const char *prefix, const char *name)
{
	size_t n = strlen(prefix);

	if (*prefix && (strncmp(full, prefix, n) || full[n] != '.'))
		return false;
	return !strcmp(full + (*prefix ? n + 1 : 0), name);
}

/* Does message m (named within scope) or one nested in it have the full name? */
static bool message_has(const Google__Protobuf__DescriptorProto *m, const char *scope, const char *full)
{
	char *name = *scope ? ib_xasprintf("%s.%s", scope, m->name) : ib_xstrdup(m->name);
	bool hit = !strcmp(full, name);

	for (size_t i = 0; !hit && i < m->n_nested_type; i++)
		hit = message_has(m->nested_type[i], name, full);
	for (size_t i = 0; !hit && i < m->n_enum_type; i++)
		hit = prefixed(full, name, m->enum_type[i]->name);
	free(name);
	return hit;
}

static bool file_has(const Google__Protobuf__FileDescriptorProto *f, const char *full)
{
	const char *pkg = f->package ? f->package : "";

	for (size_t i = 0; i < f->n_message_type; i++)
		if (message_has(f->message_type[i], pkg, full))
			return true;
	for (size_t i = 0; i < f->n_enum_type; i++)
		if (prefixed(full, pkg, f->enum_type[i]->name))
			return true;
	for (size_t i = 0; i < f->n_service; i++) {
		const Google__Protobuf__ServiceDescriptorProto *s = f->service[i];
		char *sname;
		bool hit = prefixed(full, pkg, s->name);

		sname = *pkg ? ib_xasprintf("%s.%s", pkg, s->name) : ib_xstrdup(s->name);
		for (size_t j = 0; !hit && j < s->n_method; j++)
			hit = prefixed(full, sname, s->method[j]->name);
		free(sname);
		if (hit)
			return true;
	}
	return false;
}

static Google__Protobuf__FileDescriptorProto *file_named(const char *name)
{
	for (size_t i = 0; i < fileset->n_file; i++)
		if (!strcmp(fileset->file[i]->name, name))
			return fileset->file[i];
	return NULL;
}

/* f and the files it imports, each once, as base64 FileDescriptorProto bytes. */
static void add_file(json_t *out, json_t *seen, const Google__Protobuf__FileDescriptorProto *f)
{
	size_t len;
	uint8_t *bytes;

	if (json_object_get(seen, f->name))
		return;
	json_object_set_new(seen, f->name, json_true());
	len = google__protobuf__file_descriptor_proto__get_packed_size(f);
	bytes = ib_xmalloc(len ? len : 1);
	google__protobuf__file_descriptor_proto__pack(f, bytes);
	json_array_append_new(out, srv_json_base64(bytes, len));
	free(bytes);
	for (size_t i = 0; i < f->n_dependency; i++) {
		const Google__Protobuf__FileDescriptorProto *d = file_named(f->dependency[i]);
		if (d)
			add_file(out, seen, d);
	}
}

static json_t *files_answer(const Google__Protobuf__FileDescriptorProto *f)
{
	json_t *files = json_array(), *seen = json_object();

	add_file(files, seen, f);
	json_decref(seen);
	return json_pack("{s:{s:o}}", "file_descriptor_response", "file_descriptor_proto", files);
}

static json_t *error_answer(ib_connect_code code, const char *message)
{
	return json_pack("{s:{s:i, s:s}}", "error_response", "error_code", (int)code + 1, "error_message", message);
}

/* A request field by its name or its lowerCamelCase JSON name (a JSON client may send either). */
static json_t *get(json_t *request, const char *snake, const char *camel)
{
	json_t *v = json_object_get(request, snake);

	return v ? v : json_object_get(request, camel);
}

json_t *srv_reflect(json_t *request)
{
	const char *by_name = json_string_value(get(request, "file_by_filename", "fileByFilename"));
	const char *symbol = json_string_value(get(request, "file_containing_symbol", "fileContainingSymbol"));
	json_t *ext = get(request, "all_extension_numbers_of_type", "allExtensionNumbersOfType");
	json_t *ans = NULL, *original = json_deep_copy(request);
	const Google__Protobuf__FileDescriptorProto *f = NULL;

	pthread_once(&fileset_once, load_fileset);
	if (!fileset) {
		ans = error_answer(IB_CONNECT_INTERNAL, "the descriptor set does not parse");
	} else if (get(request, "list_services", "listServices")) {
		json_t *list = json_array();
		for (size_t i = 0; i < NSERVICES; i++)
			json_array_append_new(list, json_pack("{s:s}", "name", services[i]));
		ans = json_pack("{s:{s:o}}", "list_services_response", "service", list);
	} else if (by_name) {
		ans = (f = file_named(by_name)) ? files_answer(f) : error_answer(IB_CONNECT_NOT_FOUND, "no such file");
	} else if (symbol) {
		for (size_t i = 0; i < fileset->n_file && !f; i++)
			if (file_has(fileset->file[i], symbol))
				f = fileset->file[i];
		ans = f ? files_answer(f) : error_answer(IB_CONNECT_NOT_FOUND, "no such symbol");
	} else if (json_is_string(ext)) {
		/* this schema extends nothing */
		ans = json_pack("{s:{s:O, s:[]}}", "all_extension_numbers_response", "base_type_name", ext,
				"extension_number");
	} else {
		ans = error_answer(IB_CONNECT_NOT_FOUND, "no extensions here");
	}
	json_object_set_new(ans, "valid_host", json_string(""));
	json_object_set_new(ans, "original_request", original);
	return ans;
}

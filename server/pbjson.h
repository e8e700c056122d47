#ifndef IB_PBJSON_H
#define IB_PBJSON_H

#include <jansson.h>
#include <protobuf-c/protobuf-c.h>

/*
 * The proto3 JSON mapping between protobuf-c messages of the ImageBuilder
 * schema (proto/imagebuilder/v1/imagebuilder.proto) and the JSON documents
 * the handlers read and write, so that one handler serves every codec.
 * Field names are the schema's json_name, which is each field's own name
 * but for base_image ("base"); enums are their value names; 64-bit
 * integers are JSON numbers (strings are accepted); bytes are base64; the
 * well-known types Value, ListValue, Struct, Timestamp and the wrappers
 * have their JSON forms.
 */

/*
 * A request message as its JSON document: fields that hold their default
 * are left out, as a proto3 JSON printer does.  NULL (error set) when the
 * message holds a field this schema does not know (a client on another
 * version of it must not have fields silently dropped).
 */
json_t *srv_pb_to_json(const ProtobufCMessage *m);

/*
 * An answer's JSON document as a message of type d (freed with
 * protobuf_c_message_free_unpacked(m, NULL)): null and unknown keys are
 * left unset.  <0 (error set) when a value has the wrong type.
 */
int srv_pb_from_json(const ProtobufCMessageDescriptor *d, json_t *doc, ProtobufCMessage **out);

/* len bytes as a JSON string in base64 (with padding), the JSON form of bytes. */
json_t *srv_json_base64(const void *data, size_t len);

#endif

#ifndef IB_REMOTE_H
#define IB_REMOTE_H

/*
 * An OCI distribution registry repository shared by builder nodes
 * (--remote URL, IMAGEBUILDER_REMOTE): http(s)://HOST[:PORT]/REPO.
 *
 * The client speaks the distribution API with libcurl: manifests by tag,
 * blobs by digest (checked as they come), blob uploads (monolithic, or
 * chunked for large blobs), and the
 * two ways registries ask for credentials: HTTP basic, and the bearer
 * token challenge (WWW-Authenticate: Bearer realm=...,service=...,scope=...).
 * Credentials follow docker and podman: $REGISTRY_AUTH_FILE, else
 * $DOCKER_CONFIG/config.json, else ~/.docker/config.json, else
 * $XDG_RUNTIME_DIR/containers/auth.json ("auths": {"HOST[:PORT]": {"auth":
 * base64("user:password")}}).  TLS is verified; plain HTTP only where the
 * URL says http://.  Safe to use from several threads at once.
 */

#include <jansson.h>
#include <stdint.h>

typedef struct ib_remote ib_remote;

int ib_remote_open(ib_remote **out, const char *url);
void ib_remote_close(ib_remote *r);
/* The URL as given, for messages. */
const char *ib_remote_url(const ib_remote *r);

#define IB_REMOTE_CHUNK_DEFAULT ((uint64_t)64 << 20)
/*
 * Blobs larger than bytes go up in chunks of that size (the chunked
 * upload flow: some registries and proxies cap a request's body); 0 sends
 * every blob in one request.  IB_REMOTE_CHUNK_DEFAULT unless set.
 */
void ib_remote_set_chunk(ib_remote *r, uint64_t bytes);
/* Transfers stop (IB_ETIMEOUT, IB_ECANCELED) at ib_now() >= deadline (0: never) or when *cancel is set. */
void ib_remote_set_abort(ib_remote *r, double deadline, volatile int *cancel);

/* The manifest at tag: 1 and *out, 0 when there is none, <0 (error set) when the registry fails. */
int ib_remote_manifest_get(ib_remote *r, const char *tag, json_t **out);
/* Put a manifest (a JSON document) under tag. */
int ib_remote_manifest_put(ib_remote *r, const char *tag, const char *manifest);

/*
 * Blob digest ("sha256:<hex>"), at most max bytes, to sink as it arrives
 * (sink returns <0, error set, to stop).  The bytes must have that digest,
 * checked at the end (IB_EINVALID when they do not): whatever the sink
 * made of them is to be trusted only when this returns 0.
 */
typedef int (*ib_remote_sink)(void *arg, const void *data, size_t len);
int ib_remote_blob_stream(ib_remote *r, const char *digest, uint64_t max, ib_remote_sink sink, void *arg);
/* Does the registry have the blob? 1 yes, 0 no, <0 error. */
int ib_remote_blob_exists(ib_remote *r, const char *digest);
/* Upload the file at path as blob digest, unless the registry has it. */
int ib_remote_blob_put(ib_remote *r, const char *digest, const char *path);
/* The same from memory. */
int ib_remote_blob_put_mem(ib_remote *r, const char *digest, const void *data, size_t len);

#endif

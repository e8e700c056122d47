/*
 * Layers to and from the remote (share.h).
 */
#include "builder/share.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include "layer/blob.h"
#include "layer/compact.h"
#include "layer/tree.h"
#include "lib/error.h"
#include "lib/limits.h"
#include "lib/util.h"

#define EMPTY_CONFIG "{}"
#define EMPTY_TYPE "application/vnd.oci.empty.v1+json"
#define LAYER_BLOB_MAX ((uint64_t)64 << 30) /* bytes of a layer blob taken from a remote */
#define ANN "dev.imagebuilder.layer."

static char *tag_of(const char *key)
{
	return ib_xasprintf("layer-%s", key);
}

/*
 * What the remote is known to have (pushed, or seen there), for this
 * process: a cached build asks the registry nothing again (serve answers
 * every cached BuildImage so) for MEMO_TTL seconds, after which a
 * registry that lost a tag gets it back.  Keys are "URL tag".
 */
#define MEMO_TTL 600.0
#define MEMO_MAX 65536
static pthread_mutex_t memo_mu = PTHREAD_MUTEX_INITIALIZER;
static json_t *memo;

static bool memo_has(ib_remote *r, const char *tag)
{
	char *k = ib_xasprintf("%s %s", ib_remote_url(r), tag);
	bool has;

	pthread_mutex_lock(&memo_mu);
	has = memo && ib_now() - json_real_value(json_object_get(memo, k)) < MEMO_TTL;
	pthread_mutex_unlock(&memo_mu);
	free(k);
	return has;
}

static void memo_add(ib_remote *r, const char *tag)
{
	char *k = ib_xasprintf("%s %s", ib_remote_url(r), tag);

	pthread_mutex_lock(&memo_mu);
	if (!memo)
		memo = json_object();
	if (json_object_size(memo) >= MEMO_MAX)
		json_object_clear(memo);
	json_object_set_new(memo, k, json_real(ib_now()));
	pthread_mutex_unlock(&memo_mu);
	free(k);
}

static const char *annotation(json_t *m, const char *name)
{
	char *k = ib_xasprintf(ANN "%s", name);
	const char *v = json_string_value(json_object_get(json_object_get(m, "annotations"), k));

	free(k);
	return v ? v : "";
}

int ib_share_layer_exists(ib_remote *r, const char *key)
{
	char *tag = tag_of(key);
	json_t *m = NULL;
	int err = memo_has(r, tag) ? 1 : ib_remote_manifest_get(r, tag, &m);

	if (err > 0)
		memo_add(r, tag);
	json_decref(m);
	free(tag);
	return err;
}

/* What may follow a layer's archive in its blob (tar's record padding, zstd's epilogue). */
#define BLOB_TRAILER_MAX (1 << 20)

/* The unpacker of a pull, in a thread of its own: it reads what the download writes. */
struct unpack_job {
	int fd;
	const char *dir;
	uint64_t max_bytes;
	int err;
	char msg[IB_ERROR_MAX];
};

static void *unpack_thread(void *arg)
{
	struct unpack_job *j = arg;
	char buf[16384];
	size_t left = BLOB_TRAILER_MAX;
	ssize_t n;

	if ((j->err = ib_layer_blob_unpack_fd(j->fd, j->dir, IB_TREE_ENTRIES_MAX, j->max_bytes)) < 0)
		snprintf(j->msg, sizeof(j->msg), "%s", ib_error_last());
	/* what the archive left of the stream: a little is padding; more, or a failure, ends the download */
	while (!j->err && left && ((n = read(j->fd, buf, sizeof(buf))) > 0 || (n < 0 && errno == EINTR)))
		left -= n > 0 ? ((size_t)n < left ? (size_t)n : left) : 0;
	shutdown(j->fd, SHUT_RDWR);
	return NULL;
}

static int to_socket(void *arg, const void *data, size_t len)
{
	int fd = *(int *)arg;

	while (len) {
		ssize_t n = send(fd, data, len, MSG_NOSIGNAL);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return ib_error_set_errno(errno, "the unpacker stopped reading");
		data = (const char *)data + n;
		len -= (size_t)n;
	}
	return 0;
}

/*
 * The blob digest into the empty directory upper, unpacked as it arrives:
 * download and unpack overlap.  Nothing here is trusted until this
 * returns 0 (the digest checked at the end).
 */
static int pull_into(ib_remote *r, const char *digest, uint64_t size, const char *upper, uint64_t max_bytes)
{
	struct unpack_job j = { .dir = upper, .max_bytes = max_bytes };
	pthread_t t;
	int sv[2], err;

	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
		return ib_error_set_errno(errno, "cannot make a socket pair");
	j.fd = sv[0];
	if ((err = pthread_create(&t, NULL, unpack_thread, &j)) != 0) {
		close(sv[0]);
		close(sv[1]);
		return ib_error_set_errno(err, "cannot start the unpacker");
	}
	err = ib_remote_blob_stream(r, digest, size, to_socket, &sv[1]);
	shutdown(sv[1], SHUT_WR); /* the end of the stream, whoever else holds this end */
	close(sv[1]);
	pthread_join(t, NULL);
	close(sv[0]);
	/* a corrupt blob breaks the unpacking too: the digest says it best; else the unpacker's reason */
	if (err == IB_EINVALID)
		return err;
	if (j.err)
		return ib_error_set("corrupt, or not a layer: %s", j.msg) < 0 ? j.err : 0;
	return err;
}

int ib_share_pull(ib_remote *r, ib_cache *cache, const ib_share_layer *l, const ib_walk_opts *opts,
		  uint64_t max_bytes)
{
	char *tag = tag_of(l->key), *scratch = NULL, *upper = NULL;
	json_t *m = NULL, *layer;
	const char *digest, *tree;
	json_int_t size;
	char version[16];
	ib_layer_seal seal;
	int err, lockfd = -1;
	double t0 = ib_now();

	if ((err = ib_remote_manifest_get(r, tag, &m)) <= 0)
		goto out; /* none (0), or the remote failed */
	layer = json_array_get(json_object_get(m, "layers"), 0);
	digest = json_string_value(json_object_get(layer, "digest"));
	tree = annotation(m, "tree_digest");
	snprintf(version, sizeof(version), "%d", IB_TREE_DIGEST_CURRENT);
	if (strcmp(annotation(m, "tree_digest_version"), version)) {
		err = ib_error_set("manifest %s has a tree digest of another version (%s)", tag,
				   annotation(m, "tree_digest_version"));
		goto out;
	}
	size = json_integer_value(json_object_get(layer, "size"));
	if (!digest || strcmp(annotation(m, "key"), l->key) || strlen(tree) != 64 || size <= 0 ||
	    (uint64_t)size > LAYER_BLOB_MAX ||
	    !json_is_string(json_object_get(layer, "mediaType")) ||
	    strcmp(json_string_value(json_object_get(layer, "mediaType")), IB_SHARE_LAYER_BLOB)) {
		err = ib_error_set("manifest %s is not a layer of this key", tag);
		goto out;
	}
	if ((err = ib_cache_mktemp(cache, &scratch, &lockfd)) < 0)
		goto out;
	upper = ib_xasprintf("%s/upper", scratch);
	if (mkdir(upper, 0755) < 0) {
		err = ib_error_set_errno(errno, "cannot create '%s'", upper);
		goto out;
	}
	if ((err = pull_into(r, digest, (uint64_t)size, upper, max_bytes)) < 0)
		goto out;
	if ((err = ib_cache_layer_seal(upper, opts, &seal)) < 0)
		goto out;
	if (strcmp(seal.digest, tree)) {
		err = ib_error_set("the pulled tree has digest %.12s, its manifest says %.12s: corrupt", seal.digest, tree);
		goto out;
	}
	err = ib_cache_layer_commit_sealed(cache, l->key, *l->parent ? l->parent : NULL, l->kind, l->step, upper,
					   ib_now() - t0, &seal, NULL);
	if (!err)
		err = 1;
out:
	if (err < 0)
		ib_error_prefix("layer %.12s from %s", l->key, ib_remote_url(r));
	ib_cache_rmtemp(scratch, lockfd);
	free(scratch);
	free(upper);
	free(tag);
	json_decref(m);
	return err;
}

/*
 * An artifact manifest over blobs already uploaded (layers, taken) with
 * annotations (taken), under tag: the empty config goes up first.  1
 * put, <0 failed.  Keys sorted, no time in it: the same artifact gives the
 * same manifest on every node.
 */
static int put_artifact(ib_remote *r, const char *tag, const char *type, json_t *layers, json_t *annotations)
{
	char empty[IB_SHA256_HEX], *ed, *manifest;
	json_t *doc;
	int err;

	ib_sha256_hex(empty, EMPTY_CONFIG, strlen(EMPTY_CONFIG));
	ed = ib_xasprintf("sha256:%s", empty);
	doc = json_pack("{s:i, s:s, s:s, s:{s:s, s:s, s:i}, s:o, s:o}", "schemaVersion", 2, "mediaType",
			"application/vnd.oci.image.manifest.v1+json", "artifactType", type, "config", "mediaType",
			EMPTY_TYPE, "digest", ed, "size", (int)strlen(EMPTY_CONFIG), "layers", layers, "annotations",
			annotations);
	if (!doc || !layers || !annotations)
		err = ib_error_set("cannot make the manifest of %s (a name that is not UTF-8?)", tag);
	else if ((err = ib_remote_blob_put_mem(r, ed, EMPTY_CONFIG, strlen(EMPTY_CONFIG))) == 0) {
		manifest = json_dumps(doc, JSON_COMPACT | JSON_SORT_KEYS);
		err = ib_remote_manifest_put(r, tag, manifest);
		free(manifest);
	}
	json_decref(doc);
	free(ed);
	return err < 0 ? err : 1;
}

int ib_share_push(ib_remote *r, ib_cache *cache, const ib_share_layer *l, const ib_walk_opts *opts)
{
	char *tag = tag_of(l->key), *scratch = NULL, *blob = NULL, *dir = NULL, *bd = NULL;
	char digest[IB_SHA256_HEX], tree[IB_SHA256_HEX], version[16];
	json_t *m = NULL;
	uint64_t size;
	int err = 0, lockfd = -1;

	/* one manifest per key: there already, nothing to do */
	if (memo_has(r, tag) || (err = ib_remote_manifest_get(r, tag, &m)) != 0) {
		if (err >= 0)
			memo_add(r, tag);
		err = err < 0 ? err : 0;
		goto out;
	}
	if ((err = ib_cache_layer_get(cache, l->key, NULL)) <= 0) {
		if (!err)
			err = ib_error_set("not in the cache");
		goto out;
	}
	if ((err = ib_cache_mktemp(cache, &scratch, &lockfd)) < 0)
		goto out;
	blob = ib_xasprintf("%s/layer.tar.zst", scratch);
	dir = ib_cache_layer_path(cache, l->key);
	if ((err = ib_layer_blob_pack(dir, blob, opts, digest, &size)) < 0)
		goto out;
	/* the tree digest a puller checks: this version's (a row of an older one keeps its own) */
	if ((err = ib_tree_digest(tree, dir, IB_TREE_DIGEST_CURRENT, opts, NULL, NULL)) < 0)
		goto out;
	bd = ib_xasprintf("sha256:%s", digest);
	if ((err = ib_remote_blob_put(r, bd, blob)) < 0)
		goto out;
	snprintf(version, sizeof(version), "%d", IB_TREE_DIGEST_CURRENT);
	err = put_artifact(r, tag, IB_SHARE_LAYER_TYPE,
			   json_pack("[{s:s, s:s, s:I}]", "mediaType", IB_SHARE_LAYER_BLOB, "digest", bd, "size",
				     (json_int_t)size),
			   json_pack("{s:s, s:s, s:s, s:s, s:s, s:s}", ANN "key", l->key, ANN "parent", l->parent,
				     ANN "kind", l->kind, ANN "step", l->step ? l->step : "", ANN "tree_digest", tree,
				     ANN "tree_digest_version", version));
	if (err > 0)
		memo_add(r, tag);
out:
	if (err < 0)
		ib_error_prefix("pushing layer %.12s to %s", l->key, ib_remote_url(r));
	ib_cache_rmtemp(scratch, lockfd);
	free(scratch);
	free(blob);
	free(dir);
	free(tag);
	free(bd);
	json_decref(m);
	return err;
}

/* ---- images ---- */

#define IMG "dev.imagebuilder.image."
#define IMAGE_MAX ((uint64_t)1 << 40) /* bytes of an image taken from a remote */

/* Upload blob path, and describe it in the manifest's layer list. */
static int add_blob(ib_remote *r, json_t *layers, const char *type, const ib_artifact_info *a)
{
	char *d = ib_xasprintf("sha256:%s", a->sha256);
	int err = ib_remote_blob_put(r, d, a->path);

	if (!err)
		json_array_append_new(layers, json_pack("{s:s, s:s, s:I}", "mediaType", type, "digest", d, "size",
							(json_int_t)a->bytes));
	free(d);
	return err;
}

int ib_share_image_push(ib_remote *r, ib_cache *cache, const char *image_id)
{
	char *tag = ib_xasprintf("image-%s", image_id);
	char sha[IB_SHA256_HEX], bytes[32];
	ib_artifact_info zst = { 0 }, bmap = { 0 };
	ib_image_info info = { 0 };
	json_t *m = NULL, *layers = json_array();
	int err = 0;

	if (memo_has(r, tag) || (err = ib_remote_manifest_get(r, tag, &m)) != 0) {
		if (err >= 0)
			memo_add(r, tag);
		err = err < 0 ? err : 0;
		goto out;
	}
	if ((err = ib_cache_image_get(cache, image_id, &info)) <= 0) {
		if (!err)
			err = ib_error_set("not in the cache");
		goto out;
	}
	if ((err = ib_cache_image_digest(cache, image_id, sha)) < 0 ||
	    (err = ib_cache_image_artifact(cache, image_id, IB_ARTIFACT_ZST, &zst)) < 0 ||
	    (err = ib_cache_image_artifact(cache, image_id, IB_ARTIFACT_BMAP, &bmap)) < 0)
		goto out;
	if ((err = add_blob(r, layers, IB_SHARE_IMAGE_ZST, &zst)) < 0 ||
	    (err = add_blob(r, layers, IB_SHARE_IMAGE_BMAP, &bmap)) < 0)
		goto out;
	snprintf(bytes, sizeof(bytes), "%llu", (unsigned long long)info.ext4_bytes);
	err = put_artifact(r, tag, IB_SHARE_IMAGE_TYPE, json_incref(layers),
			   json_pack("{s:s, s:s, s:s, s:s, s:s}", IMG "id", image_id, IMG "ext4_sha256", sha,
				     IMG "ext4_bytes", bytes, IMG "arch", info.arch, IMG "base",
				     info.meta && info.meta->base ? info.meta->base : ""));
	if (err > 0)
		memo_add(r, tag);
out:
	if (err < 0)
		ib_error_prefix("pushing image %.12s to %s", image_id, ib_remote_url(r));
	ib_artifact_info_clear(&zst);
	ib_artifact_info_clear(&bmap);
	ib_image_info_clear(&info);
	json_decref(m);
	json_decref(layers);
	free(tag);
	return err;
}

static int to_unzstd(void *arg, const void *data, size_t len)
{
	return ib_unzstd_write(arg, data, len);
}

struct to_file {
	int fd;
	const char *path;
};

static int to_file(void *arg, const void *data, size_t len)
{
	struct to_file *f = arg;

	return ib_write_all(f->fd, data, len) < 0 ? ib_error_set_errno(errno, "cannot write '%s'", f->path) : 0;
}

/* The blob as it is (the .zst): checked by its digest. */
static int pull_raw(ib_remote *r, const char *digest, uint64_t blob_size, const char *path)
{
	struct to_file f = { open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600), path };
	int err;

	if (f.fd < 0)
		return ib_error_set_errno(errno, "cannot create '%s'", path);
	err = ib_remote_blob_stream(r, digest, blob_size, to_file, &f);
	if (!err && fsync(f.fd) < 0)
		err = ib_error_set_errno(errno, "cannot sync '%s'", path);
	close(f.fd);
	return err;
}

int ib_share_image_pull(ib_remote *r, const char *image_id, const char *out_path, bool zst)
{
	char *tag = ib_xasprintf("image-%s", image_id), *tmp = ib_xasprintf("%s.part", out_path);
	const char *digest = NULL, *id, *bytes;
	json_t *m = NULL, *l, *ann;
	ib_unzstd *u = NULL;
	uint64_t size = 0;
	json_int_t blob_size = 0;
	struct stat st;
	size_t i;
	int err;

	if ((err = ib_remote_manifest_get(r, tag, &m)) <= 0) {
		if (!err)
			err = ib_error_set("%s has no image %s", ib_remote_url(r), image_id) < 0 ? IB_ENOTFOUND : 0;
		goto out;
	}
	json_array_foreach(json_object_get(m, "layers"), i, l)
		if (json_is_string(json_object_get(l, "mediaType")) &&
		    !strcmp(json_string_value(json_object_get(l, "mediaType")), IB_SHARE_IMAGE_ZST)) {
			digest = json_string_value(json_object_get(l, "digest"));
			blob_size = json_integer_value(json_object_get(l, "size"));
		}
	ann = json_object_get(m, "annotations");
	id = json_string_value(json_object_get(ann, IMG "id"));
	bytes = json_string_value(json_object_get(ann, IMG "ext4_bytes"));
	if (!digest || !id || strcmp(id, image_id) || !bytes || ib_parse_u64(&size, bytes, IMAGE_MAX) < 0 ||
	    blob_size <= 0 || (uint64_t)blob_size > IMAGE_MAX) {
		err = ib_error_set("manifest %s is not this image's", tag);
		goto out;
	}
	if (zst) {
		if ((err = pull_raw(r, digest, (uint64_t)blob_size, tmp)) < 0)
			goto out;
		goto done;
	}
	/*
	 * Decompressed as it arrives: the blob's sha256 is checked at its end,
	 * each zstd frame's content checksum at the frame's, and the size
	 * against the manifest's.  (The ext4's own sha256, in the annotations,
	 * would cost a read of every byte, holes too: seconds for an image.)
	 */
	if ((err = ib_unzstd_open(&u, tmp, size)) < 0)
		goto out;
	err = ib_remote_blob_stream(r, digest, (uint64_t)blob_size, to_unzstd, u);
	if (ib_unzstd_close(u, !err) < 0 && !err)
		err = IB_ERROR;
	if (err < 0)
		goto out;
	if (stat(tmp, &st) < 0) {
		err = ib_error_set_errno(errno, "cannot stat '%s'", tmp);
		goto out;
	}
	if ((uint64_t)st.st_size != size) {
		err = ib_error_set("the pulled image has %lld bytes, its manifest says %llu: corrupt",
				   (long long)st.st_size, (unsigned long long)size);
		goto out;
	}
done:
	if (chmod(tmp, 0644) < 0 || rename(tmp, out_path) < 0)
		err = ib_error_set_errno(errno, "cannot move the image to '%s'", out_path);
out:
	if (err < 0)
		ib_error_prefix("image %.12s from %s", image_id, ib_remote_url(r));
	unlink(tmp);
	json_decref(m);
	free(tag);
	free(tmp);
	return err;
}

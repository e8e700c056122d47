#include "builder/gitsrc.h"

#include <errno.h>
#include <fcntl.h>
#include <git2.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>

#include "lib/crash.h"
#include "lib/hash.h"
#include "lib/limits.h"
#include "lib/util.h"

static int git_fail(const char *what, const char *subject)
{
	const git_error *e = git_error_last();

	return ib_error_set("%s '%s': %s", what, subject, e && e->message ? e->message : "unknown libgit2 error");
}

/*
 * A new bare mirror of url at path: made at path.new-<pid> and renamed into
 * place once its remote is set, so a mirror at path is always complete
 * (a crash leaves a .new-<pid> dir, which gc collects).
 */
static int create_mirror(const char *path, const char *url)
{
	char *tmp = ib_xasprintf("%s.new-%ld", path, (long)getpid());
	git_repository *repo = NULL;
	git_remote *remote = NULL;
	int err = 0;

	ib_rm_rf(tmp);
	if (git_repository_init(&repo, tmp, 1) < 0) {
		err = git_fail("cannot create the git mirror", tmp);
		goto out;
	}
	if (git_remote_create_with_fetchspec(&remote, repo, "origin", url, "+refs/*:refs/*") < 0) {
		err = git_fail("cannot set up the git mirror", tmp);
		goto out;
	}
	IB_CRASH_POINT("git-mirror:after-init");
	if (rename(tmp, path) < 0)
		err = ib_error_set_errno(errno, "cannot move the git mirror into '%s'", path);
out:
	git_remote_free(remote);
	git_repository_free(repo);
	if (err)
		ib_rm_rf(tmp);
	free(tmp);
	return err;
}

/* Open (creating when missing) the bare mirror and fetch every ref from url. */
static int update_mirror(git_repository **out, const char *path, const char *url)
{
	git_repository *repo = NULL;
	git_remote *remote = NULL;
	git_fetch_options fo;
	int err = 0;

	git_fetch_options_init(&fo, GIT_FETCH_OPTIONS_VERSION);
	if (git_repository_open_bare(&repo, path) == 0 && git_remote_lookup(&remote, repo, "origin") < 0) {
		/* a mirror an earlier version left half made: make it anew */
		git_repository_free(repo);
		repo = NULL;
		ib_rm_rf(path);
	}
	if (!repo) {
		if ((err = create_mirror(path, url)) < 0)
			return err;
		if (git_repository_open_bare(&repo, path) < 0)
			return git_fail("cannot open the git mirror", path);
		if (git_remote_lookup(&remote, repo, "origin") < 0) {
			err = git_fail("cannot read the git mirror", path);
			goto out;
		}
	}
	if (strcmp(git_remote_url(remote), url)) {
		err = ib_error_set("git mirror '%s' belongs to '%s', not '%s'", path, git_remote_url(remote), url);
		goto out;
	}
	fo.prune = GIT_FETCH_PRUNE;
	fo.download_tags = GIT_REMOTE_DOWNLOAD_TAGS_ALL;
	if (git_remote_fetch(remote, NULL, &fo, "imagebuilder warm") < 0) {
		err = git_fail("cannot fetch", url);
		goto out;
	}
	IB_CRASH_POINT("git-mirror:after-fetch");
out:
	git_remote_free(remote);
	if (err) {
		git_repository_free(repo);
		return err;
	}
	*out = repo;
	return 0;
}

struct walk {
	git_repository *repo;
	const char *prefix; /* "dir/" or "" */
	ib_git_files *out;
	int err;
};

static int walk_cb(const char *root, const git_tree_entry *entry, void *arg)
{
	struct walk *w = arg;
	const char *name = git_tree_entry_name(entry);
	size_t len = strlen(name);
	git_blob *blob = NULL;
	ib_git_file *f;

	if (git_tree_entry_type(entry) != GIT_OBJECT_BLOB || len < 6 || strcmp(name + len - 5, ".json"))
		return 0;
	if (git_blob_lookup(&blob, w->repo, git_tree_entry_id(entry)) < 0) {
		w->err = git_fail("cannot read", name);
		return -1;
	}
	if (git_blob_rawsize(blob) > IB_SPEC_MAX_BYTES) {
		w->err = ib_error_set("'%s%s%s' is larger than %d bytes", w->prefix, root, name, IB_SPEC_MAX_BYTES);
		git_blob_free(blob);
		return -1;
	}
	w->out->files = ib_xrealloc(w->out->files, (w->out->n + 1) * sizeof(*w->out->files));
	f = &w->out->files[w->out->n++];
	f->path = ib_xasprintf("%s%s%s", w->prefix, root, name);
	f->len = (size_t)git_blob_rawsize(blob);
	f->data = ib_xmalloc(f->len + 1);
	memcpy(f->data, git_blob_rawcontent(blob), f->len);
	f->data[f->len] = '\0';
	git_blob_free(blob);
	return 0;
}

static int cmp_files(const void *a, const void *b)
{
	return strcmp(((const ib_git_file *)a)->path, ((const ib_git_file *)b)->path);
}

int ib_git_read_specs(ib_git_files *out, const char *cache_dir, const char *url, const char *ref, const char *dir)
{
	char hex[IB_SHA256_HEX];
	char *mirrors = ib_xasprintf("%s/git", cache_dir), *path = NULL, *lock = NULL, *prefix = NULL;
	git_repository *repo = NULL;
	git_object *obj = NULL;
	git_commit *commit = NULL;
	git_tree *root = NULL, *tree = NULL;
	git_tree_entry *sub = NULL;
	ib_git_files files = { 0 };
	int err = 0, lockfd = -1;

	/* reference counted: the last shutdown frees libgit2's global and thread state */
	git_libgit2_init();
	ib_sha256_hex(hex, url, strlen(url));
	path = ib_xasprintf("%s/%.16s.git", mirrors, hex);
	lock = ib_xasprintf("%s/%.16s.lock", mirrors, hex);
	if ((err = ib_mkdir_p(mirrors, 0755)) < 0)
		goto out;
	/* one fetch at a time into a mirror */
	lockfd = open(lock, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
	if (lockfd < 0 || flock(lockfd, LOCK_EX) < 0) {
		err = ib_error_set_errno(errno, "cannot lock '%s'", lock);
		goto out;
	}
	if ((err = update_mirror(&repo, path, url)) < 0)
		goto out;
	if (git_revparse_single(&obj, repo, ref) < 0) {
		err = ib_error_set("ref '%s' is not in '%s'", ref, url);
		goto out;
	}
	if (git_object_peel((git_object **)&commit, obj, GIT_OBJECT_COMMIT) < 0) {
		err = ib_error_set("ref '%s' of '%s' does not name a commit", ref, url);
		goto out;
	}
	git_oid_tostr(files.commit, sizeof(files.commit), git_commit_id(commit));
	if (git_commit_tree(&root, commit) < 0) {
		err = git_fail("cannot read the tree of", ref);
		goto out;
	}
	if (dir && *dir && strcmp(dir, ".") && strcmp(dir, "/")) {
		size_t dl = strlen(dir);
		while (dl > 1 && dir[dl - 1] == '/')
			dl--;
		prefix = ib_xasprintf("%.*s/", (int)dl, dir);
		prefix[dl] = '\0';
		if (git_tree_entry_bypath(&sub, root, prefix) < 0 || git_tree_entry_type(sub) != GIT_OBJECT_TREE) {
			err = ib_error_set("'%s' is not a directory at '%s' of '%s'", prefix, ref, url);
			goto out;
		}
		prefix[dl] = '/';
		if (git_tree_lookup(&tree, repo, git_tree_entry_id(sub)) < 0) {
			err = git_fail("cannot read", dir);
			goto out;
		}
	}
	struct walk w = { .repo = repo, .prefix = prefix ? prefix : "", .out = &files };
	if (git_tree_walk(tree ? tree : root, GIT_TREEWALK_PRE, walk_cb, &w) < 0) {
		err = w.err ? w.err : git_fail("cannot walk the tree of", ref);
		goto out;
	}
	if (files.n)
		qsort(files.files, files.n, sizeof(*files.files), cmp_files);
out:
	git_tree_entry_free(sub);
	git_tree_free(tree);
	git_tree_free(root);
	git_commit_free(commit);
	git_object_free(obj);
	git_repository_free(repo);
	if (lockfd >= 0)
		close(lockfd);
	free(mirrors);
	free(path);
	free(lock);
	free(prefix);
	git_libgit2_shutdown();
	if (err) {
		ib_git_files_clear(&files);
		return err;
	}
	*out = files;
	return 0;
}

void ib_git_files_clear(ib_git_files *f)
{
	if (!f)
		return;
	for (size_t i = 0; i < f->n; i++) {
		free(f->files[i].path);
		free(f->files[i].data);
	}
	free(f->files);
	memset(f, 0, sizeof(*f));
}

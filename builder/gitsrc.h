#ifndef IB_GITSRC_H
#define IB_GITSRC_H

#include <stddef.h>

/*
 * Spec files read straight from a git repository's objects with libgit2:
 * the repository is mirrored (bare, every ref fetched as it is) into
 * CACHE/git/<hash of the URL>.git, reused and fetched again on every run;
 * nothing is checked out and the source repository is only read.
 */
typedef struct ib_git_file {
	char *path; /* in the repository: "specs/web.json" */
	char *data; /* NUL-terminated */
	size_t len;
} ib_git_file;

typedef struct ib_git_files {
	char commit[41]; /* the commit REF resolved to */
	size_t n;
	ib_git_file *files; /* sorted by path */
} ib_git_files;

/*
 * Every *.json file under dir (NULL or "": the whole tree) at ref (a
 * branch, tag or commit) of the repository at url (https://, file://, or a
 * local path).
 */
int ib_git_read_specs(ib_git_files *out, const char *cache_dir, const char *url, const char *ref, const char *dir);
void ib_git_files_clear(ib_git_files *f);

#endif

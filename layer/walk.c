#include "layer/walk.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/xattr.h>
#include <unistd.h>

#include "lib/limits.h"
#include "lib/util.h"

/* One directory being walked: its fd, its sorted names, the next one. */
struct frame {
	int fd;
	char **names;
	size_t n, next;
	size_t path_len;   /* length of its path in the walk's path buffer */
	ib_walk_entry self; /* for leave(); name and path point into the frame's parent and the path buffer */
	char *name;         /* owned copy of self.name */
};

static int cmp_names(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The sorted names of the directory open as fd ("." and ".." left out); fd stays open. */
static int read_names(int fd, const char *path, char ***out, size_t *out_n, size_t *entries)
{
	int dup_fd = fcntl(fd, F_DUPFD_CLOEXEC, 0);
	DIR *d;
	struct dirent *de;
	char **names = NULL;
	size_t n = 0, cap = 0;

	if (dup_fd < 0 || !(d = fdopendir(dup_fd))) {
		int err = ib_error_set_errno(errno, "cannot read '%s'", *path ? path : "/");
		if (dup_fd >= 0)
			close(dup_fd);
		return err;
	}
	while ((errno = 0, de = readdir(d))) {
		if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
			continue;
		if (++*entries > IB_TREE_ENTRIES_MAX) {
			closedir(d);
			for (size_t i = 0; i < n; i++)
				free(names[i]);
			free(names);
			return ib_error_set("more than %d entries (IB_TREE_ENTRIES_MAX): refusing the tree",
					    IB_TREE_ENTRIES_MAX);
		}
		if (n == cap) {
			cap = cap ? cap * 2 : 32;
			names = ib_xrealloc(names, cap * sizeof(*names));
		}
		names[n++] = ib_xstrdup(de->d_name);
	}
	closedir(d);
	if (n)
		qsort(names, n, sizeof(*names), cmp_names);
	*out = names;
	*out_n = n;
	return 0;
}

static void frame_free(struct frame *f)
{
	if (f->fd >= 0)
		close(f->fd);
	for (size_t i = 0; i < f->n; i++)
		free(f->names[i]);
	free(f->names);
	free(f->name);
}

int ib_walk_check_time(const ib_walk_opts *opts)
{
	if (!opts)
		return 0;
	if (opts->cancel && *opts->cancel) {
		ib_error_set("cancelled");
		return IB_ECANCELED;
	}
	if (opts->deadline > 0 && ib_now() >= opts->deadline) {
		ib_error_set("timed out");
		return IB_ETIMEOUT;
	}
	return 0;
}

void ib_walk_free_names(char **names, size_t n)
{
	for (size_t i = 0; i < n; i++)
		free(names[i]);
	free(names);
}

/* Sorted xattr names of an entry (not following it); *out NULL when none. */
int ib_walk_xattrs(const ib_walk_entry *e, char ***out, size_t *out_n)
{
	char buf[IB_XATTR_LIST_MAX], path[64 + 256];
	ssize_t len;
	char **names = NULL;
	size_t n = 0;

	*out = NULL;
	*out_n = 0;
	ib_walk_proc_path(path, e);
	len = llistxattr(path, buf, sizeof(buf));
	if (len < 0) {
		if (errno == ENOTSUP)
			return 0;
		return ib_error_set_errno(errno, "cannot list attributes of '%s'", e->path);
	}
	for (ssize_t off = 0; off < len; off += (ssize_t)strlen(buf + off) + 1)
		n++;
	if (!n)
		return 0;
	names = ib_xcalloc(n, sizeof(*names));
	n = 0;
	for (ssize_t off = 0; off < len; off += (ssize_t)strlen(buf + off) + 1)
		names[n++] = ib_xstrdup(buf + off);
	qsort(names, n, sizeof(*names), cmp_names);
	*out = names;
	*out_n = n;
	return 0;
}

void ib_walk_proc_path(char out[64 + 256], const ib_walk_entry *e)
{
	snprintf(out, 64 + 256, "/proc/self/fd/%d/%s", e->dirfd, e->name);
}

int ib_walk(const char *root, const ib_walk_opts *opts, const ib_walk_ops *ops, void *arg)
{
	struct frame *stack = ib_xcalloc(IB_TREE_DEPTH_MAX + 2, sizeof(*stack));
	ib_buf path = IB_BUF_INIT;
	size_t depth = 0, entries = 0, visited = 0;
	const char *what = opts && opts->what ? opts->what : root;
	int err = 0, r;

	ib_buf_puts(&path, "");
	stack[0].fd = open(root, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	if (stack[0].fd < 0) {
		err = ib_error_set_errno(errno, "cannot open '%s'", root);
		goto out;
	}
	stack[0].self = (ib_walk_entry){ .dirfd = stack[0].fd, .name = ".", .path = "", .fd = stack[0].fd };
	if (fstat(stack[0].fd, &stack[0].self.st) < 0) {
		err = ib_error_set_errno(errno, "cannot stat '%s'", root);
		goto out;
	}
	if ((r = ops->enter(arg, &stack[0].self)) < 0) {
		err = r;
		goto out;
	}
	if (r == 0 && (err = read_names(stack[0].fd, "", &stack[0].names, &stack[0].n, &entries)) < 0)
		goto out;

	for (;;) {
		struct frame *f = &stack[depth];
		ib_walk_entry e;
		char *name;

		if (f->next == f->n) {
			/* the directory is done */
			path.len = f->path_len;
			path.ptr[path.len] = '\0';
			f->self.path = path.ptr;
			if (ops->leave && (err = ops->leave(arg, &f->self)) < 0)
				goto out;
			if (depth == 0)
				break;
			frame_free(f);
			memset(f, 0, sizeof(*f));
			depth--;
			path.len = stack[depth].path_len;
			path.ptr[path.len] = '\0';
			continue;
		}
		if ((++visited & 1023) == 0 && (err = ib_walk_check_time(opts)) < 0)
			goto out;
		name = f->names[f->next++];
		path.len = f->path_len;
		if (path.len)
			ib_buf_puts(&path, "/");
		ib_buf_puts(&path, name);
		if (path.len >= IB_TREE_PATH_MAX) {
			err = ib_error_set("'%.200s...' in %s is a path longer than %d bytes (IB_TREE_PATH_MAX)", path.ptr,
					   what, IB_TREE_PATH_MAX);
			goto out;
		}
		e = (ib_walk_entry){ .dirfd = f->fd, .name = name, .path = path.ptr, .fd = -1, .depth = depth + 1 };
		if (fstatat(f->fd, name, &e.st, AT_SYMLINK_NOFOLLOW) < 0) {
			err = ib_error_set_errno(errno, "cannot stat '%s' in %s", path.ptr, what);
			goto out;
		}
		if (!S_ISDIR(e.st.st_mode)) {
			if ((err = ops->enter(arg, &e)) < 0)
				goto out;
			path.len = f->path_len;
			path.ptr[path.len] = '\0';
			continue;
		}
		if (depth + 1 > IB_TREE_DEPTH_MAX) {
			err = ib_error_set("'%.200s...' in %s is nested deeper than %d directories (IB_TREE_DEPTH_MAX)",
					   path.ptr, what, IB_TREE_DEPTH_MAX);
			goto out;
		}
		e.fd = openat(f->fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
		if (e.fd < 0 && errno == EACCES) {
			/* overlayfs leaves work/ dirs with mode 000; the walker is root */
			fchmodat(f->fd, name, e.st.st_mode | 0700, 0);
			e.fd = openat(f->fd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
		}
		if (e.fd < 0) {
			err = ib_error_set_errno(errno, "cannot open '%s' in %s", path.ptr, what);
			goto out;
		}
		depth++;
		stack[depth] = (struct frame){ .fd = e.fd, .path_len = path.len, .name = ib_xstrdup(name) };
		e.name = stack[depth].name;
		stack[depth].self = e;
		if ((r = ops->enter(arg, &stack[depth].self)) < 0) {
			err = r;
			goto out;
		}
		if (r == 0 && (err = read_names(e.fd, path.ptr, &stack[depth].names, &stack[depth].n, &entries)) < 0)
			goto out;
	}
out:
	for (size_t i = 0; i <= depth; i++)
		frame_free(&stack[i]);
	free(stack);
	ib_buf_free(&path);
	return err;
}

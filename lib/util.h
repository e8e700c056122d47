#ifndef IB_UTIL_H
#define IB_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "lib/error.h"

/*
 * Small helpers shared by every module.  Allocation failures abort: there is
 * nothing sensible a builder can do without memory (as redis' zmalloc).
 */

void *ib_xmalloc(size_t n);
void *ib_xcalloc(size_t n, size_t size);
void *ib_xrealloc(void *p, size_t n);
char *ib_xstrdup(const char *s);
char *ib_xstrndup(const char *s, size_t n);
char *ib_xasprintf(const char *fmt, ...) IB_PRINTF(1, 2);

/* A growable byte buffer, always NUL-terminated. */
typedef struct ib_buf {
	char *ptr;
	size_t len;
	size_t cap;
} ib_buf;

#define IB_BUF_INIT { NULL, 0, 0 }

void ib_buf_grow(ib_buf *b, size_t extra);
void ib_buf_add(ib_buf *b, const void *data, size_t len);
void ib_buf_puts(ib_buf *b, const char *s);
void ib_buf_printf(ib_buf *b, const char *fmt, ...) IB_PRINTF(2, 3);
void ib_buf_reset(ib_buf *b);
/* Hand the string to the caller; the buffer is empty afterwards. */
char *ib_buf_detach(ib_buf *b);
void ib_buf_free(ib_buf *b);

/* A NULL-terminated vector of owned strings (argv, env). */
typedef struct ib_strv {
	char **v;
	size_t n;
	size_t cap;
} ib_strv;

#define IB_STRV_INIT { NULL, 0, 0 }

void ib_strv_push(ib_strv *sv, const char *s);
void ib_strv_pushf(ib_strv *sv, const char *fmt, ...) IB_PRINTF(2, 3);
void ib_strv_free(ib_strv *sv);

/* mkdir -p; mode for every created directory. */
int ib_mkdir_p(const char *path, mode_t mode);

/*
 * rm -rf that never crosses into another file system and never follows
 * symlinks.  A missing path is success.
 */
int ib_rm_rf(const char *path);
/* The same for name in the directory parent (an fd, or AT_FDCWD). */
int ib_rm_rf_at(int parent, const char *name);

/*
 * openat2() of rel beneath the directory rootfd: no symlink followed (not
 * even in the middle), no magic link, no "..", no other file system.  A
 * host-side look into a tree a step wrote goes through this.  The fd, or
 * -1 with errno (ELOOP or EXDEV for a path that tries to leave).
 */
int ib_open_beneath(int rootfd, const char *rel, int flags);

/*
 * fn(arg) in a child process whose working directory is dirfd (an
 * unpacker that works with relative paths, where libarchive's guards
 * hold): its result, with the child's error message; what names the
 * work when the child dies without one.  The child keeps no descriptor
 * but 0-2 and keep_fd (-1: none): not another thread's locks, sockets or
 * stream ends.
 */
int ib_in_child_at(int dirfd, int keep_fd, int (*fn)(void *arg), void *arg, const char *what);

/* Read a whole file (at most max bytes, else error); *out is NUL-terminated. */
int ib_read_file(char **out, size_t *out_len, const char *path, size_t max);

/*
 * Write a file atomically: a temporary beside it, fsync, rename.  The
 * directory is fsynced too.
 */
int ib_write_file_atomic(const char *path, const void *data, size_t len, mode_t mode);

/*
 * An output file made whole or not at all.  ib_output_open() creates a
 * temporary beside path (*tmp, open as *fd); ib_output_commit() sets its
 * mode, syncs it, renames it over path and syncs the directory.  The caller
 * closes fd, and on failure unlinks and frees *tmp.
 */
int ib_output_open(const char *path, char **tmp, int *fd);
int ib_output_commit(const char *tmp, int fd, const char *path, mode_t mode);

/* fsync the directory that holds path. */
int ib_fsync_parent(const char *path);

/* write(2) all of it, retrying on EINTR and short writes. */
int ib_write_all(int fd, const void *data, size_t len);

/*
 * Allocated bytes (st_blocks) under path, a file or a tree, not following
 * links nor leaving its file system; 0 when it cannot be read.
 */
/* "512 MiB", "3 GiB", "1000 bytes": the largest unit that divides it. */
void ib_format_size(char out[32], uint64_t bytes);

uint64_t ib_du(const char *path);

/* A size: a whole number with an optional binary suffix (512, 20K, 300M, 10G, 1T), at most max. */
int ib_parse_size(uint64_t *out, const char *s, uint64_t max);

/* fsync a directory by path. */
int ib_fsync_dir(const char *path);

/*
 * In a child after fork() that does not exec at once: close every fd above
 * 2 but a and b (-1: none), so that descriptors other threads of a
 * multi-threaded parent had open (pipes, locks, sockets) do not live on in
 * it.
 */
void ib_close_fds_except(int a, int b);

/* Called with each chunk of a program's output (a step's, mmdebstrap's). */
typedef void (*ib_output_cb)(const char *data, size_t len, void *arg);

/* Monotonic clock in seconds. */
double ib_now(void);

/* Parse a non-negative decimal integer with range check. */
int ib_parse_u64(uint64_t *out, const char *s, uint64_t max);

/* Lowercase hex of len bytes into out (2*len+1 bytes). */
void ib_hex(char *out, const unsigned char *data, size_t len);

/* True when s is 64 lowercase hex digits (a key or image id). */
bool ib_is_hex64(const char *s);

/*
 * Copy size bytes of in to out (both open; out empty): a reflink where the
 * file system has them, else only the data ranges (SEEK_DATA), so holes
 * stay holes; src and dst name them in messages.
 */
int ib_copy_data(int in, int out, off_t size, const char *src, const char *dst);

/*
 * Copy a file keeping holes (SEEK_DATA/SEEK_HOLE), trying a reflink first.
 * dst is created (or truncated) with mode.
 */
int ib_copy_sparse(const char *src, const char *dst, mode_t mode);

#endif

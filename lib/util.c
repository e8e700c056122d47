#include "lib/util.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <fts.h>
#include <limits.h>
#include <linux/fs.h>
#include <linux/openat2.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "lib/limits.h"

static void oom(void)
{
	fputs("imagebuilder: out of memory\n", stderr);
	abort();
}

void *ib_xmalloc(size_t n)
{
	void *p = malloc(n ? n : 1);

	if (!p)
		oom();
	return p;
}

void *ib_xcalloc(size_t n, size_t size)
{
	void *p = calloc(n ? n : 1, size ? size : 1);

	if (!p)
		oom();
	return p;
}

void *ib_xrealloc(void *p, size_t n)
{
	void *q = realloc(p, n ? n : 1);

	if (!q)
		oom();
	return q;
}

char *ib_xstrdup(const char *s)
{
	char *p = strdup(s);

	if (!p)
		oom();
	return p;
}

char *ib_xstrndup(const char *s, size_t n)
{
	char *p = strndup(s, n);

	if (!p)
		oom();
	return p;
}

char *ib_xasprintf(const char *fmt, ...)
{
	va_list ap;
	char *p;
	int r;

	va_start(ap, fmt);
	r = vasprintf(&p, fmt, ap);
	va_end(ap);
	if (r < 0)
		oom();
	return p;
}

void ib_buf_grow(ib_buf *b, size_t extra)
{
	size_t need = b->len + extra + 1;

	if (need <= b->cap)
		return;
	if (need < b->cap * 2)
		need = b->cap * 2;
	if (need < 64)
		need = 64;
	b->ptr = ib_xrealloc(b->ptr, need);
	b->cap = need;
}

void ib_buf_add(ib_buf *b, const void *data, size_t len)
{
	ib_buf_grow(b, len);
	if (len)
		memcpy(b->ptr + b->len, data, len);
	b->len += len;
	b->ptr[b->len] = '\0';
}

void ib_buf_puts(ib_buf *b, const char *s)
{
	ib_buf_add(b, s, strlen(s));
}

void ib_buf_printf(ib_buf *b, const char *fmt, ...)
{
	va_list ap;
	char probe[1];
	int n;

	va_start(ap, fmt);
	n = vsnprintf(probe, sizeof(probe), fmt, ap);
	va_end(ap);
	if (n < 0)
		return;
	ib_buf_grow(b, (size_t)n);
	va_start(ap, fmt);
	vsnprintf(b->ptr + b->len, (size_t)n + 1, fmt, ap);
	va_end(ap);
	b->len += (size_t)n;
}

void ib_buf_reset(ib_buf *b)
{
	b->len = 0;
	if (b->ptr)
		b->ptr[0] = '\0';
}

char *ib_buf_detach(ib_buf *b)
{
	char *p = b->ptr ? b->ptr : ib_xstrdup("");

	b->ptr = NULL;
	b->len = b->cap = 0;
	return p;
}

void ib_buf_free(ib_buf *b)
{
	free(b->ptr);
	b->ptr = NULL;
	b->len = b->cap = 0;
}

void ib_strv_push(ib_strv *sv, const char *s)
{
	if (sv->n + 2 > sv->cap) {
		sv->cap = sv->cap ? sv->cap * 2 : 8;
		sv->v = ib_xrealloc(sv->v, sv->cap * sizeof(*sv->v));
	}
	sv->v[sv->n++] = ib_xstrdup(s);
	sv->v[sv->n] = NULL;
}

void ib_strv_pushf(ib_strv *sv, const char *fmt, ...)
{
	va_list ap;
	char *p;

	va_start(ap, fmt);
	if (vasprintf(&p, fmt, ap) < 0)
		oom();
	va_end(ap);
	ib_strv_push(sv, p);
	free(p);
}

void ib_strv_free(ib_strv *sv)
{
	for (size_t i = 0; i < sv->n; i++)
		free(sv->v[i]);
	free(sv->v);
	sv->v = NULL;
	sv->n = sv->cap = 0;
}

int ib_mkdir_p(const char *path, mode_t mode)
{
	char *p = ib_xstrdup(path);
	int err = 0;

	for (char *s = p + 1; ; s++) {
		if (*s != '/' && *s != '\0')
			continue;
		char c = *s;
		*s = '\0';
		if (mkdir(p, mode) < 0 && errno != EEXIST) {
			err = ib_error_set_errno(errno, "cannot create directory '%s'", p);
			break;
		}
		*s = c;
		if (!c)
			break;
	}
	free(p);
	return err;
}

/* Open a directory to remove: overlayfs leaves work/ dirs with mode 000. */
static int open_doomed_dir(int parent, const char *name)
{
	int fd = openat(parent, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);

	if (fd < 0 && errno == EACCES) {
		fchmodat(parent, name, 0700, 0);
		fd = openat(parent, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
	}
	return fd;
}

/* The first entry of the directory fd but "." and "..", or NULL (name in buf). */
static int first_entry(int fd, char *buf, size_t size, bool *found)
{
	int d2 = fcntl(fd, F_DUPFD_CLOEXEC, 0);
	DIR *d = d2 >= 0 ? fdopendir(d2) : NULL;
	struct dirent *de;

	*found = false;
	if (!d) {
		if (d2 >= 0)
			close(d2);
		return -1;
	}
	/* the duplicate shares fd's offset, which an earlier look moved */
	rewinddir(d);
	while ((de = readdir(d))) {
		if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
			continue;
		snprintf(buf, size, "%s", de->d_name);
		*found = true;
		break;
	}
	closedir(d);
	return 0;
}

/*
 * Iterative, with one directory open at a time whatever the depth: it
 * goes down by name and back up by "..", which nothing else changes in a
 * tree being removed.  Never follows a symlink, never crosses into another
 * file system.
 */
int ib_rm_rf_at(int parent, const char *name)
{
	ib_strv names = IB_STRV_INIT;
	struct stat st;
	char entry[256];
	int cur = -1, err = 0;
	dev_t dev;

	if (fstatat(parent, name, &st, AT_SYMLINK_NOFOLLOW) < 0)
		return errno == ENOENT ? 0 : ib_error_set_errno(errno, "cannot stat '%s'", name);
	if (!S_ISDIR(st.st_mode)) {
		if (unlinkat(parent, name, 0) < 0 && errno != ENOENT)
			return ib_error_set_errno(errno, "cannot remove '%s'", name);
		return 0;
	}
	dev = st.st_dev;
	if ((cur = open_doomed_dir(parent, name)) < 0)
		return ib_error_set_errno(errno, "cannot open '%s'", name);
	for (;;) {
		bool found;

		if (first_entry(cur, entry, sizeof(entry), &found) < 0) {
			err = ib_error_set_errno(errno, "cannot read a directory under '%s'", name);
			break;
		}
		if (!found) {
			/* empty: up, and remove it there */
			int up;

			if (!names.n) {
				close(cur);
				cur = -1;
				if (unlinkat(parent, name, AT_REMOVEDIR) < 0 && errno != ENOENT)
					err = ib_error_set_errno(errno, "cannot remove '%s'", name);
				break;
			}
			up = openat(cur, "..", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
			close(cur);
			cur = up;
			if (cur < 0) {
				err = ib_error_set_errno(errno, "cannot go back up under '%s'", name);
				break;
			}
			if (unlinkat(cur, names.v[names.n - 1], AT_REMOVEDIR) < 0 && errno != ENOENT) {
				err = ib_error_set_errno(errno, "cannot remove '%s' under '%s'", names.v[names.n - 1], name);
				break;
			}
			free(names.v[--names.n]);
			names.v[names.n] = NULL;
			continue;
		}
		if (fstatat(cur, entry, &st, AT_SYMLINK_NOFOLLOW) < 0) {
			err = ib_error_set_errno(errno, "cannot stat '%s' under '%s'", entry, name);
			break;
		}
		if (!S_ISDIR(st.st_mode)) {
			if (unlinkat(cur, entry, 0) < 0 && errno != ENOENT) {
				err = ib_error_set_errno(errno, "cannot remove '%s' under '%s'", entry, name);
				break;
			}
			continue;
		}
		if (st.st_dev != dev) {
			err = ib_error_set("refusing to remove '%s': another file system is mounted there", entry);
			break;
		}
		{
			int down = open_doomed_dir(cur, entry);
			if (down < 0) {
				err = ib_error_set_errno(errno, "cannot open '%s' under '%s'", entry, name);
				break;
			}
			close(cur);
			cur = down;
			ib_strv_push(&names, entry);
		}
	}
	if (cur >= 0)
		close(cur);
	ib_strv_free(&names);
	return err;
}

int ib_open_beneath(int rootfd, const char *rel, int flags)
{
	struct open_how how = {
		.flags = (uint64_t)(flags | O_CLOEXEC | O_NOFOLLOW),
		.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV,
	};

	return (int)syscall(SYS_openat2, rootfd, *rel ? rel : ".", &how, sizeof(how));
}

int ib_rm_rf(const char *path)
{
	struct stat st;

	if (lstat(path, &st) < 0)
		return errno == ENOENT ? 0 : ib_error_set_errno(errno, "cannot stat '%s'", path);
	return ib_rm_rf_at(AT_FDCWD, path);
}

int ib_read_file(char **out, size_t *out_len, const char *path, size_t max)
{
	ib_buf b = IB_BUF_INIT;
	char chunk[65536];
	int fd, err = 0;
	ssize_t n;

	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return errno == ENOENT ? (ib_error_set_errno(errno, "cannot open '%s'", path), IB_ENOTFOUND)
				       : ib_error_set_errno(errno, "cannot open '%s'", path);
	for (;;) {
		n = read(fd, chunk, sizeof(chunk));
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			err = ib_error_set_errno(errno, "cannot read '%s'", path);
			break;
		}
		if (n == 0)
			break;
		if (b.len + (size_t)n > max) {
			err = ib_error_set("'%s' is larger than %zu bytes", path, max);
			break;
		}
		ib_buf_add(&b, chunk, (size_t)n);
	}
	close(fd);
	if (err) {
		ib_buf_free(&b);
		return err;
	}
	if (out_len)
		*out_len = b.len;
	*out = ib_buf_detach(&b);
	return 0;
}

int ib_write_all(int fd, const void *data, size_t len)
{
	const char *p = data;

	while (len) {
		ssize_t n = write(fd, p, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -1;
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

int ib_fsync_dir(const char *path)
{
	int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	int err = 0;

	if (fd < 0)
		return ib_error_set_errno(errno, "cannot open '%s'", path);
	if (fsync(fd) < 0)
		err = ib_error_set_errno(errno, "cannot sync '%s'", path);
	close(fd);
	return err;
}

int ib_parse_size(uint64_t *out, const char *s, uint64_t max)
{
	size_t len = strlen(s);
	uint64_t mult = 1, v;
	char num[32];

	if (len && strchr("kKmMgGtT", s[len - 1])) {
		switch (s[len - 1] | 0x20) {
		case 'k': mult = 1ULL << 10; break;
		case 'm': mult = 1ULL << 20; break;
		case 'g': mult = 1ULL << 30; break;
		case 't': mult = 1ULL << 40; break;
		}
		len--;
	}
	if (!len || len >= sizeof(num))
		return ib_error_set("'%s' is not a size (a number, optionally with K, M, G or T)", s);
	memcpy(num, s, len);
	num[len] = '\0';
	if (ib_parse_u64(&v, num, max / mult) < 0)
		return IB_ERROR;
	*out = v * mult;
	return 0;
}

int ib_fsync_parent(const char *path)
{
	char *dir = ib_xstrdup(path), *slash = strrchr(dir, '/');
	int err;

	if (slash)
		*slash = '\0';
	err = ib_fsync_dir(!slash ? "." : *dir ? dir : "/");
	free(dir);
	return err;
}

int ib_output_open(const char *path, char **out_tmp, int *out_fd)
{
	char *tmp = ib_xasprintf("%s.tmp.XXXXXX", path);
	int fd = mkostemp(tmp, O_CLOEXEC);

	if (fd < 0) {
		int err = ib_error_set_errno(errno, "cannot create '%s'", tmp);
		free(tmp);
		return err;
	}
	*out_tmp = tmp;
	*out_fd = fd;
	return 0;
}

int ib_output_commit(const char *tmp, int fd, const char *path, mode_t mode)
{
	if (fchmod(fd, mode) < 0)
		return ib_error_set_errno(errno, "cannot set the mode of '%s'", tmp);
	if (fsync(fd) < 0)
		return ib_error_set_errno(errno, "cannot write '%s'", tmp);
	if (rename(tmp, path) < 0)
		return ib_error_set_errno(errno, "cannot rename '%s' to '%s'", tmp, path);
	return ib_fsync_parent(path);
}

int ib_write_file_atomic(const char *path, const void *data, size_t len, mode_t mode)
{
	char *tmp = ib_xasprintf("%s.tmp.%ld", path, (long)getpid());
	int fd, err = 0;

	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
	if (fd < 0) {
		err = ib_error_set_errno(errno, "cannot create '%s'", tmp);
		goto out;
	}
	if (ib_write_all(fd, data, len) < 0 || fsync(fd) < 0) {
		err = ib_error_set_errno(errno, "cannot write '%s'", tmp);
		close(fd);
		unlink(tmp);
		goto out;
	}
	if (close(fd) < 0) {
		err = ib_error_set_errno(errno, "cannot write '%s'", tmp);
		unlink(tmp);
		goto out;
	}
	if (rename(tmp, path) < 0) {
		err = ib_error_set_errno(errno, "cannot rename '%s'", tmp);
		unlink(tmp);
		goto out;
	}
	err = ib_fsync_parent(path);
out:
	free(tmp);
	return err;
}

void ib_close_fds_except(int a, int b)
{
	int keep[2] = { a < b ? a : b, a < b ? b : a };
	unsigned from = 3;

	for (int i = 0; i < 2; i++) {
		if (keep[i] < 3)
			continue;
		if ((unsigned)keep[i] > from)
			close_range(from, (unsigned)keep[i] - 1, 0);
		from = (unsigned)keep[i] + 1;
	}
	close_range(from, ~0U, 0);
}

double ib_now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int ib_parse_u64(uint64_t *out, const char *s, uint64_t max)
{
	unsigned long long v;
	char *end;

	if (!s || !*s || *s == '-' || *s == '+' || *s == ' ')
		return ib_error_set("'%s' is not a number", s ? s : "");
	errno = 0;
	v = strtoull(s, &end, 10);
	if (errno || *end)
		return ib_error_set("'%s' is not a number", s);
	if (v > max)
		return ib_error_set("'%s' is larger than %llu", s, (unsigned long long)max);
	*out = v;
	return 0;
}

void ib_hex(char *out, const unsigned char *data, size_t len)
{
	static const char digits[] = "0123456789abcdef";

	for (size_t i = 0; i < len; i++) {
		out[2 * i] = digits[data[i] >> 4];
		out[2 * i + 1] = digits[data[i] & 15];
	}
	out[2 * len] = '\0';
}

bool ib_is_hex64(const char *s)
{
	size_t i;

	for (i = 0; i < 64; i++)
		if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
			return false;
	return s[64] == '\0';
}

#define COPY_BUF (1 << 20)

int ib_copy_data(int in, int out, off_t size, const char *src, const char *dst)
{
	char *buf = NULL;
	off_t data, hole;
	int err = 0;

	if (ioctl(out, FICLONE, in) == 0)
		return 0;
	for (data = 0; data < size; data = hole) {
		data = lseek(in, data, SEEK_DATA);
		if (data < 0) {
			if (errno == ENXIO)
				break;
			err = ib_error_set_errno(errno, "cannot seek '%s'", src);
			goto out;
		}
		hole = lseek(in, data, SEEK_HOLE);
		if (hole < 0) {
			err = ib_error_set_errno(errno, "cannot seek '%s'", src);
			goto out;
		}
		loff_t off_in = data, off_out = data;
		size_t left = (size_t)(hole - data);
		while (left && !buf) {
			ssize_t n = copy_file_range(in, &off_in, out, &off_out, left, 0);
			if (n < 0 && errno == EINTR)
				continue;
			if (n < 0 && (errno == EXDEV || errno == EOPNOTSUPP || errno == ENOSYS || errno == EINVAL)) {
				/* another file system (a tmpfs /tmp): copy through a buffer from here on */
				buf = ib_xmalloc(COPY_BUF);
				break;
			}
			if (n <= 0) {
				err = ib_error_set_errno(n < 0 ? errno : EIO, "cannot copy '%s' to '%s'", src, dst);
				goto out;
			}
			left -= (size_t)n;
		}
		while (left) {
			ssize_t n = pread(in, buf, left < COPY_BUF ? left : COPY_BUF, off_in);
			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0) {
				err = ib_error_set_errno(n < 0 ? errno : EIO, "cannot read '%s'", src);
				goto out;
			}
			for (ssize_t done = 0; done < n;) {
				ssize_t w = pwrite(out, buf + done, (size_t)(n - done), off_out + done);
				if (w < 0 && errno == EINTR)
					continue;
				if (w <= 0) {
					err = ib_error_set_errno(w < 0 ? errno : EIO, "cannot write '%s'", dst);
					goto out;
				}
				done += w;
			}
			off_in += n;
			off_out += n;
			left -= (size_t)n;
		}
	}
	if (ftruncate(out, size) < 0)
		err = ib_error_set_errno(errno, "cannot size '%s'", dst);
out:
	free(buf);
	return err;
}

int ib_copy_sparse(const char *src, const char *dst, mode_t mode)
{
	int in = -1, out = -1, err = 0;
	struct stat st;

	in = open(src, O_RDONLY | O_CLOEXEC);
	if (in < 0)
		return ib_error_set_errno(errno, "cannot open '%s'", src);
	if (fstat(in, &st) < 0) {
		err = ib_error_set_errno(errno, "cannot stat '%s'", src);
		goto out;
	}
	out = open(dst, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
	if (out < 0) {
		err = ib_error_set_errno(errno, "cannot create '%s'", dst);
		goto out;
	}
	err = ib_copy_data(in, out, st.st_size, src, dst);
out:
	if (out >= 0 && close(out) < 0 && !err)
		err = ib_error_set_errno(errno, "cannot write '%s'", dst);
	if (err && out >= 0)
		unlink(dst);
	if (in >= 0)
		close(in);
	return err;
}

void ib_format_size(char out[32], uint64_t b)
{
	static const char *const units[] = { "bytes", "KiB", "MiB", "GiB", "TiB" };
	size_t u = 0;
	uint64_t whole = b;

	while (u + 1 < sizeof(units) / sizeof(units[0]) && whole >= 1024 && whole % 1024 == 0) {
		whole /= 1024;
		u++;
	}
	snprintf(out, 32, "%llu %s", (unsigned long long)whole, units[u]);
}

uint64_t ib_du(const char *path)
{
	char *const argv[] = { (char *)path, NULL };
	FTS *fts = fts_open(argv, FTS_PHYSICAL | FTS_XDEV | FTS_NOCHDIR, NULL);
	FTSENT *e;
	uint64_t bytes = 0;

	if (!fts)
		return 0;
	while ((e = fts_read(fts)))
		if (e->fts_info != FTS_DP && e->fts_info != FTS_NS && e->fts_statp)
			bytes += (uint64_t)e->fts_statp->st_blocks * 512;
	fts_close(fts);
	return bytes;
}

int ib_in_child_at(int dirfd, int keep_fd, int (*fn)(void *arg), void *arg, const char *what)
{
	int pipefd[2], err = 0, ws = 0;
	char msg[IB_ERROR_MAX];
	size_t got = 0;
	ssize_t n;
	pid_t pid;

	if (pipe2(pipefd, O_CLOEXEC) < 0)
		return ib_error_set_errno(errno, "cannot create a pipe");
	/* a child: the working directory is per process */
	if ((pid = fork()) < 0) {
		err = ib_error_set_errno(errno, "cannot fork");
		close(pipefd[0]);
		close(pipefd[1]);
		return err;
	}
	if (pid == 0) {
		close(pipefd[0]);
		if (fchdir(dirfd) < 0) {
			err = ib_error_set_errno(errno, "cannot enter the directory for %s", what);
		} else {
			ib_close_fds_except(pipefd[1], keep_fd);
			err = fn(arg);
		}
		if (err)
			ib_write_all(pipefd[1], ib_error_last(), strlen(ib_error_last()));
		_exit(err ? 1 : 0);
	}
	close(pipefd[1]);
	msg[0] = '\0';
	while (got < sizeof(msg) - 1) {
		n = read(pipefd[0], msg + got, sizeof(msg) - 1 - got);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		got += (size_t)n;
		msg[got] = '\0';
	}
	close(pipefd[0]);
	while (waitpid(pid, &ws, 0) < 0 && errno == EINTR)
		;
	if (!WIFEXITED(ws) || WEXITSTATUS(ws) != 0)
		return ib_error_set("%s", msg[0] ? msg : what);
	return 0;
}

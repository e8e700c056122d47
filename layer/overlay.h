#ifndef IB_OVERLAY_H
#define IB_OVERLAY_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/stat.h>

/*
 * The overlay rules, in one place.  A layer is an overlayfs upper
 * directory; a stack of them (bottom first) is read the way overlayfs
 * reads it:
 *
 *  - a character device 0:0 is a whiteout: the name is hidden in every
 *    lower layer and the whiteout itself is not shown;
 *  - a directory with xattr trusted.overlay.opaque="y" hides everything
 *    below it in lower layers;
 *  - any non-directory hides a directory of the same name below it;
 *  - a directory over a directory merges: the union of the contents, the
 *    higher layer winning name by name;
 *  - the layers' roots always merge (opacity does not apply to them).
 *
 * trusted.overlay.* xattrs are bookkeeping: normalising a layer strips
 * them but for the opaque marker, and the merged view never shows them.  A
 * layer that relies on redirect_dir, metacopy or xattr whiteouts
 * (trusted.overlay.redirect, .metacopy, .whiteout) is refused: the kernel
 * does not make those with the builder's mount options, and their meaning
 * lies outside the layer.  Reading trusted.* needs CAP_SYS_ADMIN: without
 * it opaque directories would go unseen, so readers run as root.
 *
 * Users: the merged walk (layerfs.c), normalising (tree.c), and path
 * lookups on a stack (export's /etc/environment and init).
 */

#define IB_OVL_XATTR_PREFIX	"trusted.overlay."
#define IB_OVL_XATTR_OPAQUE	"trusted.overlay.opaque"

/* Is this (lstat) a whiteout? */
bool ib_overlay_is_whiteout(const struct stat *st);

typedef enum ib_overlay_xattr_kind {
	IB_OVL_XATTR_CONTENT,     /* not overlay's: part of the file (user.*, security.*, ...) */
	IB_OVL_XATTR_OPAQUE_MARK, /* trusted.overlay.opaque: kept on directories */
	IB_OVL_XATTR_BOOKKEEPING, /* other trusted.overlay.*: dropped */
	IB_OVL_XATTR_UNSUPPORTED, /* redirect, metacopy, whiteout: the layer is refused */
} ib_overlay_xattr_kind;

/* What an xattr name means to the overlay rules. */
ib_overlay_xattr_kind ib_overlay_xattr(const char *name);

/*
 * Is the open directory fd opaque?  A redirect on it is refused (its
 * content would live elsewhere); what names it in messages.
 */
int ib_overlay_dir_opaque(int fd, bool *out, const char *what);

/*
 * One path looked up in a stack: where the entry the merged view shows
 * lives.  dirfd is its parent directory in that layer (O_PATH, owned),
 * name its last component, so that the caller opens or reads it with
 * openat()/readlinkat() and O_NOFOLLOW, never through a path.
 */
typedef struct ib_overlay_entry {
	size_t layer;       /* index into the stack */
	struct stat st;     /* lstat() of the entry in that layer */
	int dirfd;
	char name[256];
} ib_overlay_entry;

#define IB_OVERLAY_ENTRY_INIT { 0, { 0 }, -1, "" }

/*
 * Look rel ("etc/environment", no leading slash) up in the merged view of
 * layers[0..n) (bottom first), component by component with the rules
 * above.  No symlink is followed: a symlink in the middle of rel ends the
 * lookup as absent (the caller resolves links it means to follow).
 * Returns 1 and fills *out, 0 when the merged view has no such entry, <0
 * on error.  Release *out with ib_overlay_entry_clear().
 */
int ib_overlay_lookup(ib_overlay_entry *out, const char *const *layers, size_t n, const char *rel);
void ib_overlay_entry_clear(ib_overlay_entry *e);

/*
 * Read the regular file rel of the merged view, at most max bytes (more is
 * an error naming the limit, limit_name).  1 and *out (NUL-terminated,
 * the caller's) when present, 0 when absent or not a regular file.
 */
int ib_overlay_read_file(char **out, size_t *out_len, const char *const *layers, size_t n, const char *rel,
			 size_t max, const char *limit_name);

/*
 * The names in the directory rel of the merged view (whiteouts and what
 * they hide left out), sorted: 1 and *out (a NULL-terminated vector, free
 * with ib_strv_free), 0 when rel is absent or not a directory.  rel "" is
 * the root.
 */
struct ib_strv;
int ib_overlay_list(struct ib_strv *out, const char *const *layers, size_t n, const char *rel);

/* The target of the symlink rel of the merged view: 1 and *out (owned), 0 when absent or not a link. */
int ib_overlay_readlink(char **out, const char *const *layers, size_t n, const char *rel);

#endif

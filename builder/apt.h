#ifndef IB_APT_H
#define IB_APT_H

#include <stdbool.h>
#include <time.h>

/*
 * The apt state builds of one architecture share in the cache:
 *
 *   CACHE/apt/<arch>/lists   package lists, bound over /var/lib/apt/lists
 *   CACHE/apt/<arch>/cache   .deb files, bound over /var/cache/apt
 *   CACHE/apt/<arch>.lock    one apt at a time on them (flock, across processes)
 *
 * A build that just fetched the lists (its base bootstrap, or an
 * apt_install step) lets its next apt step skip the update, while the
 * lists dir's mtime is still the one it saw under the lock and no other
 * kind of step ran in between (which may have changed the sources).
 */
typedef struct ib_apt {
	char *lists;
	char *cache;
	char *lock;
	bool fresh;             /* this build left the lists current */
	struct timespec mtime;  /* the lists dir's mtime then */
} ib_apt;

/* Make the dirs of arch under cache_dir (and drop 0.1.0's apt/<arch>/archives). */
int ib_apt_open(ib_apt *apt, const char *cache_dir, const char *arch);
void ib_apt_close(ib_apt *apt);

/* Take the lock (waits); release with ib_cache_unlock() or close(). */
int ib_apt_lock(const ib_apt *apt, int *out_fd);

/* With the lock held: remember the lists as this build left them / are they still? */
void ib_apt_mark_fresh(ib_apt *apt);
bool ib_apt_still_fresh(const ib_apt *apt);

/*
 * Move the package lists a bootstrap downloaded (upper/var/lib/apt/lists)
 * into the shared lists, where this build's apt steps find them current;
 * the base keeps an empty lists dir, as mmdebstrap's own cleanup leaves it.
 */
int ib_apt_harvest(ib_apt *apt, const char *upper);

#endif

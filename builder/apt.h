#ifndef IB_APT_H
#define IB_APT_H

#include <stdbool.h>
#include <time.h>

/*
 * The apt state builds of one architecture share in the cache, and what a
 * build keeps of its own:
 *
 *   CACHE/apt/<arch>/lists   package lists as a base bootstrap fetched them
 *                            (checked by apt against the keyring of a base
 *                            made from the mirror); written only by the
 *                            builder, never by a step
 *   CACHE/apt/<arch>.lock    the builder's writes take it exclusively, apt
 *                            steps shared (flock, across processes)
 *   <build scratch>/apt/     this build's own upper and work dirs: a step
 *                            sees the shared lists through an overlay on
 *                            them, and what its apt-get update (or a hook)
 *                            writes stays with this build
 *
 * .deb files are not shared: a step downloads into its own layer, and the
 * junk removal drops them from it.  A build that just fetched the lists
 * (its base bootstrap, or an apt_install step into its own upper) lets its
 * next apt step skip the update, until a step of another kind runs (which
 * may have changed the sources).
 */
typedef struct ib_apt {
	char *lists;
	char *lock;
	char *private;  /* <build scratch>/apt: upper/ and work/ */
	bool fresh;     /* this build left its view of the lists current */
} ib_apt;

/* The shared dirs of arch under cache_dir (dropping what older versions shared), this build's in scratch. */
int ib_apt_open(ib_apt *apt, const char *cache_dir, const char *arch, const char *scratch);
void ib_apt_close(ib_apt *apt);

/* Take the lock (waits): exclusive to write the shared lists, shared to use them. */
int ib_apt_lock(const ib_apt *apt, bool exclusive, int *out_fd);

void ib_apt_mark_fresh(ib_apt *apt);

/*
 * Move the package lists a bootstrap downloaded (upper/var/lib/apt/lists)
 * into the shared lists; the base keeps an empty lists dir, as
 * mmdebstrap's own cleanup leaves it.
 */
int ib_apt_harvest(ib_apt *apt, const char *upper);

#endif

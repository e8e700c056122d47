#ifndef IB_COPY_H
#define IB_COPY_H

#include "layer/walk.h"

/*
 * Copy a finished upper dir to another file system, as it is: types,
 * owners, modes (setuid included), times, xattrs (overlayfs markers
 * included), device numbers, hard links (as links), holes (as holes).
 * The walk follows no link in src; dst must not exist and is made beneath
 * its parent by openat() alone.  On error dst is left for the caller to
 * remove.  opts gives the walk's limits, deadline and cancel flag.
 */
int ib_tree_copy(const char *src, const char *dst, const ib_walk_opts *opts);

#endif

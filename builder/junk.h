#ifndef IB_JUNK_H
#define IB_JUNK_H

/*
 * What a finished layer must not keep: files that only record when or how
 * a step ran (logs, caches, backups), so that they neither bloat the layer
 * nor make two builds of one spec differ.
 */

/* Remove them from a finished upper dir (only what the layer itself wrote). */
int ib_junk_remove(const char *upper);

/*
 * A fresh base keeps from the machine that bootstrapped it a resolver
 * configuration and a host name: made neutral (an empty resolv.conf,
 * "localhost").
 */
int ib_junk_neutralise_base(const char *upper);

#endif

#ifndef IB_PROC_H
#define IB_PROC_H

#include <stdbool.h>

#include "lib/util.h"

/*
 * Run a host program (mmdebstrap, e2fsck) with its output passed to a
 * callback.  With IB_PROC_ISOLATE it runs as the first process of new mount
 * and PID namespaces, so that every mount it makes and every process it
 * starts disappear with it, also when it is killed.
 */
#define IB_PROC_ISOLATE 0x1

/* The PATH host programs run with (mmdebstrap and what it runs). */
#define IB_HOST_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

/* Is program an executable file in one of IB_HOST_PATH's directories? */
bool ib_proc_available(const char *program);

typedef struct ib_proc_opts {
	unsigned flags;
	const char *name;        /* the program, for messages; NULL: argv[0] */
	const char *const *env; /* NULL: inherit */
	ib_output_cb output;     /* NULL: output discarded */
	void *output_arg;
	double deadline;         /* ib_now() value; 0: none */
	volatile int *cancel;
	/*
	 * With IB_PROC_ISOLATE: a tmpfs of tmpfs_bytes mounted on this (existing)
	 * directory before the program starts, seen only by it and gone with it.
	 */
	const char *tmpfs;
	unsigned long long tmpfs_bytes;
} ib_proc_opts;

/*
 * Returns 0 when the program exited 0; IB_ETIMEOUT / IB_ECANCELED after
 * killing it; IB_ERROR naming the program and its status otherwise.
 */
int ib_proc_run(const char *const *argv, const ib_proc_opts *opts);

#endif

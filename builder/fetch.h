#ifndef IB_FETCH_H
#define IB_FETCH_H

#include "lib/hash.h"

/*
 * Downloads with libcurl.  Transient failures (connection refused or reset,
 * time-outs, HTTP 5xx and 429) are retried with exponential backoff; other
 * failures end at once with a message naming the URL.
 */
typedef struct ib_fetch_opts {
	double deadline;      /* ib_now() value; 0: none */
	volatile int *cancel; /* may be NULL */
	unsigned attempts;    /* 0: the default (4) */
} ib_fetch_opts;

/*
 * Download url to path (written beside it, renamed into place when
 * complete).  With expected_sha256 non-NULL the content must hash to it, or
 * the download fails and nothing is left at path.  *got_sha256 (may be
 * NULL) receives the content's digest.
 */
int ib_fetch(const char *url, const char *path, const char *expected_sha256, char *got_sha256,
	     const ib_fetch_opts *opts);

#endif

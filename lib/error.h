#ifndef IB_ERROR_H
#define IB_ERROR_H

/*
 * Error reporting for the library.  Functions return 0 on success and a
 * negative code on failure; the message is set once, where the failure is
 * understood, into a thread-local buffer that the caller (the CLI's main or
 * the server's request handler) reads with ib_error_last().
 */
enum {
	IB_OK = 0,
	IB_ERROR = -1,     /* generic failure, message set */
	IB_ENOTFOUND = -2, /* the named object does not exist */
	IB_EEXISTS = -3,   /* the object exists already */
	IB_ETIMEOUT = -4,  /* a deadline passed */
	IB_ECANCELED = -5, /* cancelled on request */
	IB_EINVALID = -6,  /* bad input from the user (spec, arguments) */
};

#define IB_PRINTF(a, b) __attribute__((format(printf, a, b)))

/* Set the message; returns IB_ERROR so callers can `return ib_error_set(..)`. */
int ib_error_set(const char *fmt, ...) IB_PRINTF(1, 2);

/* Like ib_error_set(), appending ": strerror(errnum)". */
int ib_error_set_errno(int errnum, const char *fmt, ...) IB_PRINTF(2, 3);

/* Prefix the current message with "<prefix>: " (context added by a caller). */
void ib_error_prefix(const char *fmt, ...) IB_PRINTF(1, 2);

/* The last message set on this thread, never NULL ("" when none). */
const char *ib_error_last(void);

void ib_error_clear(void);

#endif

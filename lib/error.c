#include "lib/error.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "lib/limits.h"

static _Thread_local char errbuf[IB_ERROR_MAX];

int ib_error_set(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(errbuf, sizeof(errbuf), fmt, ap);
	va_end(ap);
	return IB_ERROR;
}

int ib_error_set_errno(int errnum, const char *fmt, ...)
{
	va_list ap;
	size_t len;

	va_start(ap, fmt);
	vsnprintf(errbuf, sizeof(errbuf), fmt, ap);
	va_end(ap);
	len = strlen(errbuf);
	snprintf(errbuf + len, sizeof(errbuf) - len, ": %s", strerror(errnum));
	return IB_ERROR;
}

void ib_error_prefix(const char *fmt, ...)
{
	char old[IB_ERROR_MAX];
	va_list ap;
	size_t len;

	memcpy(old, errbuf, sizeof(old));
	va_start(ap, fmt);
	vsnprintf(errbuf, sizeof(errbuf), fmt, ap);
	va_end(ap);
	len = strlen(errbuf);
	if (old[0])
		snprintf(errbuf + len, sizeof(errbuf) - len, ": %s", old);
}

const char *ib_error_last(void)
{
	return errbuf;
}

void ib_error_clear(void)
{
	errbuf[0] = '\0';
}

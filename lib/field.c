#include "lib/field.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "lib/limits.h"

int ib_field_invalid(const char *fmt, ...)
{
	char msg[IB_ERROR_MAX];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	ib_error_set("%s", msg);
	return IB_EINVALID;
}

const char *ib_field_quote(char buf[IB_FIELD_QUOTE_MAX], const char *s, size_t len)
{
	static const char hex[] = "0123456789abcdef";
	/* Leave room for the closing quote, "..." and the NUL. */
	const size_t end = IB_FIELD_QUOTE_MAX - 5;
	size_t o = 0, i;

	buf[o++] = '\'';
	for (i = 0; i < len; i++) {
		unsigned char c = (unsigned char)s[i];

		if (c == '\\' || c == '\'') {
			if (o + 2 > end)
				break;
			buf[o++] = '\\';
			buf[o++] = (char)c;
		} else if (c >= 0x20 && c < 0x7f) {
			if (o + 1 > end)
				break;
			buf[o++] = (char)c;
		} else {
			if (o + 4 > end)
				break;
			buf[o++] = '\\';
			buf[o++] = 'x';
			buf[o++] = hex[c >> 4];
			buf[o++] = hex[c & 0xf];
		}
	}
	buf[o++] = '\'';
	if (i < len) {
		memcpy(buf + o, "...", 3);
		o += 3;
	}
	buf[o] = '\0';
	return buf;
}

const char *ib_field_type_name(const json_t *v)
{
	switch (json_typeof(v)) {
	case JSON_OBJECT:
		return "an object";
	case JSON_ARRAY:
		return "an array";
	case JSON_STRING:
		return "a string";
	case JSON_INTEGER:
	case JSON_REAL:
		return "a number";
	case JSON_TRUE:
	case JSON_FALSE:
		return "a boolean";
	case JSON_NULL:
		return "null";
	}
	return "an unknown value";
}

bool ib_field_env_name_ok(const char *name)
{
	if (!name || !*name)
		return false;
	for (const char *p = name; *p; p++) {
		bool alpha = (*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') || *p == '_';
		bool digit = *p >= '0' && *p <= '9';

		if (!alpha && !(digit && p != name))
			return false;
	}
	return true;
}

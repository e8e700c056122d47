/*
 * env: {"APP_ENV": "demo", "PATH": "/opt/app/bin:/usr/bin:/bin"}
 *
 * Variables in effect for every later step and recorded in the image,
 * one NAME=value line each in /etc/environment.  Hence:
 *
 *  - an object of 1 to IB_ENV_MAX_VARS members (spec.c also bounds the
 *    total over all env steps);
 *  - names: POSIX, [A-Za-z_][A-Za-z0-9_]*, at most IB_ENV_NAME_MAX bytes;
 *  - values: strings of at most IB_ENV_VALUE_MAX bytes without NUL and
 *    without control characters but tab (a newline or carriage return
 *    would split the line, and other controls only ever cause trouble
 *    there).
 *
 * The step runs nothing: its layer is empty and its effect lives in the
 * key chain (later keys cover it) and in the image's metadata.
 */
#include "steps/step.h"

#include <stdio.h>
#include <string.h>

#include "lib/limits.h"
#include "lib/field.h"

static int env_validate(const json_t *arg, const char *field)
{
	char q[IB_FIELD_QUOTE_MAX], item[IB_ENV_NAME_MAX + 64];
	const char *name;
	json_t *v;

	if (!json_is_object(arg))
		return ib_field_invalid("%s: expected an object of variable names to strings, got %s",
				       field, ib_field_type_name(arg));
	if (json_object_size(arg) == 0)
		return ib_field_invalid("%s: empty; at least one variable is required", field);
	if (json_object_size(arg) > IB_ENV_MAX_VARS)
		return ib_field_invalid("%s: %zu variables; at most %d are allowed", field,
				       json_object_size(arg), IB_ENV_MAX_VARS);
	/* jansson's iteration API takes a non-const object; it does not modify it. */
	json_object_foreach((json_t *)arg, name, v) {
		const char *s;
		size_t len;

		if (strlen(name) > IB_ENV_NAME_MAX)
			return ib_field_invalid("%s: variable name %s is %zu bytes; at most %d are allowed",
					       field, ib_field_quote(q, name, strlen(name)),
					       strlen(name), IB_ENV_NAME_MAX);
		if (!ib_field_env_name_ok(name))
			return ib_field_invalid("%s: %s is not a POSIX variable name ([A-Za-z_][A-Za-z0-9_]*)",
					       field, ib_field_quote(q, name, strlen(name)));
		snprintf(item, sizeof(item), "%s.%s", field, name);
		if (!json_is_string(v))
			return ib_field_invalid("%s: expected a string, got %s", item,
					       ib_field_type_name(v));
		s = json_string_value(v);
		len = json_string_length(v);
		if (len > IB_ENV_VALUE_MAX)
			return ib_field_invalid("%s: %zu bytes; a value is at most %d", item, len,
					       IB_ENV_VALUE_MAX);
		for (size_t i = 0; i < len; i++) {
			unsigned char c = (unsigned char)s[i];

			if (c == '\0')
				return ib_field_invalid("%s: contains a NUL byte", item);
			if (c == '\n' || c == '\r')
				return ib_field_invalid("%s: contains a line break; values go into /etc/environment, one line each",
						       item);
			if ((c < 0x20 && c != '\t') || c == 0x7f)
				return ib_field_invalid("%s: contains control character 0x%02x; values go into /etc/environment, as text",
						       item, c);
		}
	}
	return 0;
}

static int env_plan(ib_step_plan *out, const json_t *arg, const ib_step_ctx *ctx)
{
	(void)out;
	(void)arg;
	(void)ctx;
	return 0;
}

const ib_step_ops ib_step_env = {
	.name = "env",
	.flags = IB_STEP_ENV,
	.validate = env_validate,
	.plan = env_plan,
};

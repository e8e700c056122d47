/*
 * The table of step kinds, and what the kinds share: plans and the check of
 * a list argument.
 */
#include "steps/step.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lib/limits.h"
#include "lib/field.h"

/*
 * Every kind, in the order messages list them.  Adding a kind: its file in
 * steps/, its extern in step.h, its name here.
 */
#define STEP_KINDS(X) \
	X(apt_install) \
	X(pip_install) \
	X(run_commands) \
	X(env)

#define KIND_OPS(name) &ib_step_##name,
#define KIND_NAME(name) ", " #name

static const ib_step_ops *const kinds[] = { STEP_KINDS(KIND_OPS) };
static const char kind_names[] = STEP_KINDS(KIND_NAME);

const ib_step_ops *ib_step_lookup(const char *name)
{
	if (!name)
		return NULL;
	for (size_t i = 0; i < sizeof(kinds) / sizeof(kinds[0]); i++)
		if (!strcmp(kinds[i]->name, name))
			return kinds[i];
	return NULL;
}

const char *ib_step_kinds(void)
{
	return kind_names + 2; /* past the first ", " */
}

void ib_step_plan_add(ib_step_plan *plan, const ib_strv *argv)
{
	ib_strv *cmd;

	plan->cmds = ib_xrealloc(plan->cmds, (plan->ncmds + 1) * sizeof(*plan->cmds));
	cmd = &plan->cmds[plan->ncmds++];
	*cmd = (ib_strv)IB_STRV_INIT;
	for (size_t i = 0; i < argv->n; i++)
		ib_strv_push(cmd, argv->v[i]);
}

void ib_step_plan_free(ib_step_plan *plan)
{
	if (!plan)
		return;
	for (size_t i = 0; i < plan->ncmds; i++)
		ib_strv_free(&plan->cmds[i]);
	free(plan->cmds);
	ib_strv_free(&plan->env);
	*plan = (ib_step_plan)IB_STEP_PLAN_INIT;
}

int ib_step_check_list(const json_t *arg, const char *field, const char *what, size_t max,
		       int (*item_ok)(const char *s, size_t len, const char *field))
{
	char item[128];

	if (!json_is_array(arg))
		return ib_field_invalid("%s: expected an array of %ss, got %s", field, what,
				       ib_field_type_name(arg));
	if (json_array_size(arg) == 0)
		return ib_field_invalid("%s: empty; at least one %s is required", field, what);
	if (json_array_size(arg) > IB_STEP_MAX_ITEMS)
		return ib_field_invalid("%s: %zu items; at most %d are allowed", field,
				       json_array_size(arg), IB_STEP_MAX_ITEMS);
	for (size_t i = 0; i < json_array_size(arg); i++) {
		const json_t *v = json_array_get(arg, i);
		const char *s;
		size_t len;
		int r;

		snprintf(item, sizeof(item), "%s[%zu]", field, i);
		if (!json_is_string(v))
			return ib_field_invalid("%s: expected a string (a %s), got %s", item, what,
					       ib_field_type_name(v));
		s = json_string_value(v);
		len = json_string_length(v);
		if (len == 0)
			return ib_field_invalid("%s: empty; expected a %s", item, what);
		if (len > max)
			return ib_field_invalid("%s: %zu bytes; a %s is at most %zu", item, len, what, max);
		if (memchr(s, '\0', len))
			return ib_field_invalid("%s: contains a NUL byte", item);
		r = item_ok(s, len, item);
		if (r < 0)
			return r;
	}
	return 0;
}

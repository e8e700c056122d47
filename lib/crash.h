#ifndef IB_CRASH_H
#define IB_CRASH_H

#include <stddef.h>

/*
 * Named crash points, for tests: every place where the cache's state
 * changes in more than one operation has one, between the operations.  A
 * test arms one (IMAGEBUILDER_CRASH_AT=name, read with the configuration)
 * and the process _exit(137)s when it passes there, as a kill -9 would
 * stop it; then it checks what the crash left.  Unarmed, a point costs one
 * load and one compare.
 *
 * Every point is listed in crash.c's table with the action that passes
 * through it (`imagebuilder debug crash-points` prints them), so the test
 * walks them all; IB_CRASH_POINT with a name not in the table aborts.
 */

/* The armed point's name, or NULL. */
extern const char *ib_crash_armed;

#define IB_CRASH_POINT(name)                          \
	do {                                          \
		if (ib_crash_armed)                   \
			ib_crash_check(name);         \
	} while (0)

/* Arm name (NULL or "": disarm).  IB_EINVALID when no point has that name. */
int ib_crash_arm(const char *name);

/* _exit(137) when name is armed; abort() when no point has that name. */
void ib_crash_check(const char *name);

typedef struct ib_crash_point {
	const char *name;   /* "layer-commit:after-rename" */
	const char *action; /* what passes through it: "build", "build-force", "gc-layer", ... */
	const char *state;  /* what is on disk when it fires */
} ib_crash_point;

/* Every point, in the order of the table. */
const ib_crash_point *ib_crash_points(size_t *out_n);

#endif

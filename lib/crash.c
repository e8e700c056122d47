#include "lib/crash.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "lib/error.h"

const char *ib_crash_armed;

/*
 * Every crash point.  action names what a test runs to pass through it
 * (tests/integration/t1200-crash-points.sh knows each); state says what is
 * on disk at that moment.  A new multi-step change of the cache's state
 * gets its points here (scripts/check-crash-points.py checks the commit
 * functions have some).
 */
static const ib_crash_point points[] = {
	{ "layer-commit:after-rename", "build",
	  "a new layer's directory is in layers/; no row names it" },
	{ "layer-commit:after-row", "build",
	  "a new layer is indexed; the build has not gone on" },
	{ "layer-recommit:after-rename", "build-force",
	  "a rebuilt layer is in layers/ as the next generation; the row names the old one" },
	{ "layer-recommit:after-row", "build-force",
	  "the row names the rebuilt layer; the old generation is still in layers/" },
	{ "layer-discard:after-move", "build-force",
	  "a replaced layer's directory is in tmp/, not yet removed" },
	{ "image-commit:after-rename", "build",
	  "a new image's file is in images/; no row names it" },
	{ "image-commit:after-row", "build",
	  "a new image is indexed; the build has not copied it out" },
	{ "image-reexport:after-rename", "build-force",
	  "a re-exported image is in images/ as the next generation; the row names the old file" },
	{ "image-reexport:after-row", "build-force",
	  "the row names the re-exported file; the old one is still in images/" },
	{ "artifact-commit:after-rename", "artifact",
	  "an image's .zst is beside its file; no row names it" },
	{ "artifact-drop:after-row", "repair-artifact",
	  "verify --repair deleted a changed .zst's row; the file is still beside the image" },
	{ "gc:after-image-row", "gc-image",
	  "gc deleted an image's row; its file is still in images/" },
	{ "layer-remove:after-row", "gc-layer",
	  "a layer's row is deleted (gc, repair); its directory is still in layers/" },
	{ "build-record:after-insert", "serve",
	  "a QUEUED build record and log exist; the job is not queued" },
	{ "build-record:after-start", "serve",
	  "the record says BUILDING; the build has not started" },
	{ "build-record:after-finish", "serve",
	  "the record is final (READY); the daemon has not answered from it yet" },
	{ "download:after-fetch", "python",
	  "a python archive is downloaded and checked in a scratch dir; not in downloads/" },
	{ "download:after-rename", "python",
	  "the archive is in downloads/; the python layer is not built" },
	{ "git-mirror:after-init", "warm-git",
	  "a new git mirror is initialised in a scratch dir; not in git/" },
	{ "git-mirror:after-fetch", "warm-git",
	  "the git mirror is fetched; no spec is read" },
};

#define NPOINTS (sizeof(points) / sizeof(points[0]))

static const ib_crash_point *find(const char *name)
{
	for (size_t i = 0; i < NPOINTS; i++)
		if (!strcmp(points[i].name, name))
			return &points[i];
	return NULL;
}

int ib_crash_arm(const char *name)
{
	const ib_crash_point *p;

	if (!name || !*name) {
		ib_crash_armed = NULL;
		return 0;
	}
	if (!(p = find(name))) {
		ib_error_set("IMAGEBUILDER_CRASH_AT: no crash point '%s' (imagebuilder debug crash-points lists them)",
			     name);
		return IB_EINVALID;
	}
	ib_crash_armed = p->name;
	return 0;
}

void ib_crash_check(const char *name)
{
	if (!find(name)) {
		fprintf(stderr, "imagebuilder: crash point '%s' is not in lib/crash.c's table\n", name);
		abort();
	}
	if (ib_crash_armed && !strcmp(ib_crash_armed, name)) {
		fprintf(stderr, "imagebuilder: crashing at '%s' (IMAGEBUILDER_CRASH_AT)\n", name);
		_exit(137);
	}
}

const ib_crash_point *ib_crash_points(size_t *out_n)
{
	*out_n = NPOINTS;
	return points;
}

#ifndef IB_EXPORT_H
#define IB_EXPORT_H

#include <stdbool.h>

#include "builder/config.h"
#include "cache/cache.h"
#include "layer/meta.h"
#include "spec/plan.h"

/*
 * Exporting an image from the cache: its layers, merged, under a metadata
 * layer that adds /etc/imagebuilder/image.json, the env steps' variables
 * in /etc/environment, and imagebuilder's init at /sbin/init when the
 * image has no init of its own (static, built beside the program as
 * ib-init-<machine>, else installed in /usr/lib/imagebuilder).  Which init
 * an image got is recorded in image.json ("init": "image", or
 * "imagebuilder:<sha256 of the binary>").
 */

/* The metadata of a planned image, as the export completes it (init not yet set). */
ib_image_meta *ib_export_meta_of_plan(const ib_plan *plan);

/*
 * Write img as ext4 (tar false) or tar to out_path.  Its layers are held
 * (shared locks) while they are read, so gc leaves them alone.  *out_meta
 * (may be NULL) receives the metadata the image holds, with its init.  An
 * image recorded with another init than this program's is refused (build
 * it again to export it afresh).
 */
int ib_export_image(ib_cache *cache, const ib_config *cfg, const ib_image_info *img, const char *out_path,
		    bool tar, ib_image_meta **out_meta);

/* The static init for machine (x86_64, aarch64): beside the program, or installed; NULL when neither. */
char *ib_export_find_init(const ib_config *cfg, const char *machine);

/* Was the cached image exported with an init other than the one this program installs? */
bool ib_export_init_stale(const ib_config *cfg, const ib_image_meta *meta);

#endif

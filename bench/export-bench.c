/*
 * export-bench: time one export of a layer stack.
 *
 *   export-bench [--tar] OUT LAYER...     (layers bottom first)
 *
 * Prints "seconds bytes" on stdout; bench/export.sh drives it.  The image
 * id and epoch are fixed so that two runs can be compared byte for byte.
 */
#include <stdio.h>
#include <string.h>

#include "lib/error.h"
#include "layer/writer.h"
#include "lib/util.h"

#define BENCH_IMAGE_ID "5f1c9e2b7a0d43a8b6e4f0c2d9a7b3e18c4d2f6a0b9e7c5d3a1f8e6b4c2d0a97"
#define BENCH_EPOCH 1700000000

int main(int argc, char **argv)
{
	ib_export_opts opts = { .image_id = BENCH_IMAGE_ID, .epoch = BENCH_EPOCH };
	uint64_t bytes = 0;
	int tar = 0, i = 1, err;
	double t0;

	if (i < argc && !strcmp(argv[i], "--tar")) {
		tar = 1;
		i++;
	}
	if (argc - i < 2) {
		fprintf(stderr, "usage: export-bench [--tar] OUT LAYER...\n");
		return 2;
	}
	t0 = ib_now();
	if (tar)
		err = ib_tar_write(argv[i], (const char *const *)argv + i + 1,
				   (size_t)(argc - i - 1), &opts);
	else
		err = ib_ext4_write(argv[i], (const char *const *)argv + i + 1,
				    (size_t)(argc - i - 1), &opts, &bytes);
	if (err) {
		fprintf(stderr, "export-bench: %s\n", ib_error_last());
		return 1;
	}
	printf("%.3f %llu\n", ib_now() - t0, (unsigned long long)bytes);
	return 0;
}

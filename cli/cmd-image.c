#include <getopt.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "builder/export.h"
#include "builder/share.h"
#include "lib/util.h"
#include "cli/cli.h"

static const char export_usage[] =
	"export IMAGE_ID (-o OUT.ext4 [--from-layers] | --tar OUT.tar | --zstd OUT.zst | --bmap OUT.bmap)";

int cmd_export(int argc, char **argv, ib_config *cfg)
{
	static const struct option longopts[] = {
		{ "output", required_argument, NULL, 'o' },
		{ "tar", required_argument, NULL, 'T' },
		{ "from-layers", no_argument, NULL, 'L' },
		{ "zstd", required_argument, NULL, 'Z' },
		{ "bmap", required_argument, NULL, 'B' },
		{ "cache-dir", required_argument, NULL, 'C' },
		{ NULL, 0, NULL, 0 },
	};
	const char *output = NULL, *tar = NULL, *zst = NULL, *bmap = NULL;
	ib_image_info img = { 0 };
	ib_cache *cache = NULL;
	char id[65];
	int c, err, ret = EXIT_FAIL, from_layers = 0;

	optind = 1;
	while ((c = getopt_long(argc, argv, "o:", longopts, NULL)) != -1) {
		switch (c) {
		case 'o': output = optarg; break;
		case 'T': tar = optarg; break;
		case 'L': from_layers = 1; break;
		case 'Z': zst = optarg; break;
		case 'B': bmap = optarg; break;
		case 'C': ib_config_set(&cfg->cache_dir, optarg); break;
		default: return cli_usage(export_usage);
		}
	}
	if (optind != argc - 1 || (!!output + !!tar + !!zst + !!bmap) != 1 || (from_layers && !output))
		return cli_usage(export_usage);
	if (cli_open_cache(&cache, cfg) < 0)
		return EXIT_FAIL;
	if ((err = cli_resolve_image(cache, argv[optind], id)) < 0) {
		cli_error("%s", ib_error_last());
		ret = err == IB_EINVALID ? EXIT_USAGE : EXIT_FAIL;
		goto out;
	}
	if (ib_cache_image_get(cache, id, &img) <= 0) {
		cli_error("image '%s' is not in the cache", id);
		goto out;
	}
	if (output && from_layers) {
		err = ib_export_image(cache, cfg, &img, output, false, NULL);
	} else if (output) {
		/* The exported ext4 is kept in the cache: copy it, holes and all. */
		char *src = ib_cache_image_path(cache, id);
		err = ib_copy_sparse(src, output, 0644);
		free(src);
	} else if (tar) {
		err = ib_export_image(cache, cfg, &img, tar, true, NULL);
	} else {
		/* made once, kept with the image */
		ib_artifact_info a = { 0 };
		if ((err = ib_cache_image_artifact(cache, id, zst ? IB_ARTIFACT_ZST : IB_ARTIFACT_BMAP, &a)) == 0)
			err = ib_copy_sparse(a.path, zst ? zst : bmap, 0644);
		ib_artifact_info_clear(&a);
	}
	if (err < 0) {
		cli_error("%s", ib_error_last());
		goto out;
	}
	ib_cache_touch_image(cache, id);
	ret = EXIT_OK;
out:
	ib_image_info_clear(&img);
	ib_cache_close(cache);
	return ret;
}

static int source_cb(const char *source, const char *commit, const char *path, int64_t warmed, void *arg)
{
	json_array_append_new(arg, json_pack("{s:s, s:s, s:s, s:I}", "source", source, "commit", commit, "path",
					     path, "warmed", (json_int_t)warmed));
	return 0;
}

static json_t *image_doc(ib_cache *cache, const ib_image_info *img)
{
	json_t *doc = ib_image_meta_json(img->meta);
	char created[32];
	time_t t = (time_t)img->created;
	struct tm tm;

	gmtime_r(&t, &tm);
	strftime(created, sizeof(created), "%Y-%m-%dT%H:%M:%SZ", &tm);
	{
		char sha[IB_SHA256_HEX];
		json_object_set_new(doc, "ext4_sha256",
				    ib_cache_image_digest(cache, img->id, sha) == 0 ? json_string(sha) : json_null());
	}
	json_object_set_new(doc, "ext4_bytes", json_integer((json_int_t)img->ext4_bytes));
	json_object_set_new(doc, "created", json_string(created));
	json_t *sources = json_array();
	ib_cache_image_sources(cache, img->id, source_cb, sources);
	json_object_set_new(doc, "warmed_from", sources);
	return doc;
}

int cmd_inspect(int argc, char **argv, ib_config *cfg)
{
	static const struct option longopts[] = {
		{ "cache-dir", required_argument, NULL, 'C' },
		{ NULL, 0, NULL, 0 },
	};
	ib_image_info img = { 0 };
	ib_cache *cache = NULL;
	char id[65], *s;
	json_t *doc;
	int c, err, ret = EXIT_FAIL;

	optind = 1;
	while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
		if (c != 'C')
			return cli_usage("inspect IMAGE_ID");
		ib_config_set(&cfg->cache_dir, optarg);
	}
	if (optind != argc - 1)
		return cli_usage("inspect IMAGE_ID");
	if (cli_open_cache(&cache, cfg) < 0)
		return EXIT_FAIL;
	if ((err = cli_resolve_image(cache, argv[optind], id)) < 0) {
		cli_error("%s", ib_error_last());
		ret = err == IB_EINVALID ? EXIT_USAGE : EXIT_FAIL;
		goto out;
	}
	if (ib_cache_image_get(cache, id, &img) <= 0) {
		cli_error("image '%s' is not in the cache", id);
		goto out;
	}
	doc = image_doc(cache, &img);
	s = json_dumps(doc, JSON_INDENT(2) | JSON_SORT_KEYS);
	puts(s);
	free(s);
	json_decref(doc);
	ret = EXIT_OK;
out:
	ib_image_info_clear(&img);
	ib_cache_close(cache);
	return ret;
}

static int ls_cb(const ib_image_info *img, void *arg)
{
	const char *base = img->meta->base;
	char created[32];
	time_t t = (time_t)img->created;
	struct tm tm;

	(void)arg;
	gmtime_r(&t, &tm);
	strftime(created, sizeof(created), "%Y-%m-%dT%H:%M:%SZ", &tm);
	printf("%s  %-6s  %10llu  %s  %s (%zu layers)\n", img->id, img->arch, (unsigned long long)img->ext4_bytes,
	       created, base ? base : "?", img->nlayers);
	return 0;
}

int cmd_ls(int argc, char **argv, ib_config *cfg)
{
	static const struct option longopts[] = {
		{ "cache-dir", required_argument, NULL, 'C' },
		{ NULL, 0, NULL, 0 },
	};
	ib_cache *cache = NULL;
	int c, ret = EXIT_OK;

	optind = 1;
	while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
		if (c != 'C')
			return cli_usage("ls");
		ib_config_set(&cfg->cache_dir, optarg);
	}
	if (optind != argc)
		return cli_usage("ls");
	if (cli_open_cache(&cache, cfg) < 0)
		return EXIT_FAIL;
	if (ib_cache_images_foreach(cache, ls_cb, NULL) < 0) {
		cli_error("%s", ib_error_last());
		ret = EXIT_FAIL;
	}
	ib_cache_close(cache);
	return ret;
}

static const char pull_usage[] = "pull IMAGE_ID -o OUT.ext4|OUT.ext4.zst [--remote URL]";

/* An image from the remote, for a worker: no cache needed. */
int cmd_pull(int argc, char **argv, ib_config *cfg)
{
	static const struct option longopts[] = {
		{ "output", required_argument, NULL, 'o' },
		{ "remote", required_argument, NULL, CLI_OPT_REMOTE },
		{ NULL, 0, NULL, 0 },
	};
	const char *output = NULL, *id;
	ib_remote *r = NULL;
	int c, err;

	optind = 1;
	while ((c = getopt_long(argc, argv, "o:", longopts, NULL)) != -1) {
		switch (c) {
		case 'o': output = optarg; break;
		case CLI_OPT_REMOTE:
			if (cli_limit_option(c, optarg, cfg) < 0)
				return EXIT_USAGE;
			break;
		default: return cli_usage(pull_usage);
		}
	}
	if (optind != argc - 1 || !output)
		return cli_usage(pull_usage);
	id = argv[optind];
	if (!ib_is_hex64(id)) {
		cli_error("'%s' is not an image id (64 hex digits)", id);
		return EXIT_USAGE;
	}
	if (!cfg->remote) {
		cli_error("no remote: give --remote URL or set IMAGEBUILDER_REMOTE");
		return EXIT_USAGE;
	}
	if (ib_remote_open(&r, cfg->remote) < 0) {
		cli_error("%s", ib_error_last());
		return EXIT_USAGE;
	}
	/* OUT.zst: the compressed artifact as it is */
	err = ib_share_image_pull(r, id, output, strlen(output) > 4 && !strcmp(output + strlen(output) - 4, ".zst"));
	ib_remote_close(r);
	if (err < 0) {
		cli_error("%s", ib_error_last());
		return EXIT_FAIL;
	}
	printf("%s\n", output);
	return EXIT_OK;
}

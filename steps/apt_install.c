/*
 * apt_install: ["git", "curl=7.88.1-10+deb12u5", "libc6:arm64"]
 *
 * Each item is name[:arch][=version], checked here so that only package
 * names reach apt-get (as argv, never through a shell):
 *
 *  - name: Debian Policy 5.6.1, [a-z0-9][a-z0-9+.-]+ (at least two
 *    characters);
 *  - arch: apt's multiarch qualifier, [a-z0-9][a-z0-9-]* (amd64, i386, all);
 *  - version: Debian Policy 5.6.12, [epoch:]upstream[-revision] with
 *    characters [A-Za-z0-9.+~:-], starting with a digit.
 *
 * Nothing else apt-get would read in that place is accepted: no /release
 * suffix, no globs or regular expressions, no paths to .deb files.  No
 * item may end in '-', which apt-get reads as "remove this package" (even
 * after a version); a valid name or version never needs to.
 */
#include "steps/step.h"

#include <stdbool.h>
#include <string.h>

#include "lib/limits.h"
#include "lib/field.h"

static bool lower_or_digit(char c)
{
	return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
}

static bool name_char(char c)
{
	return lower_or_digit(c) || c == '+' || c == '.' || c == '-';
}

static bool arch_char(char c)
{
	return lower_or_digit(c) || c == '-';
}

static bool version_char(char c)
{
	return (c >= 'A' && c <= 'Z') || lower_or_digit(c) ||
	       c == '.' || c == '+' || c == '~' || c == ':' || c == '-';
}

static int package_ok(const char *s, size_t len, const char *field)
{
	char q[IB_FIELD_QUOTE_MAX];
	size_t i = 1;

	if (!lower_or_digit(s[0]))
		goto bad;
	while (i < len && name_char(s[i]))
		i++;
	if (i < 2)
		goto bad;
	if (i < len && s[i] == ':') {
		if (++i == len || !lower_or_digit(s[i]))
			goto bad;
		while (i < len && arch_char(s[i]))
			i++;
	}
	if (i < len) {
		if (s[i] != '=' || ++i == len || s[i] < '0' || s[i] > '9')
			goto bad;
		while (i < len && version_char(s[i]))
			i++;
		if (i < len)
			goto bad;
	}
	if (s[len - 1] == '-')
		return ib_field_invalid("%s: %s ends in '-', which apt-get reads as 'remove'",
				       field, ib_field_quote(q, s, len));
	return 0;
bad:
	return ib_field_invalid("%s: %s is not a Debian package name (name[:arch][=version])",
			       field, ib_field_quote(q, s, len));
}

static int apt_validate(const json_t *arg, const char *field)
{
	return ib_step_check_list(arg, field, "package name", IB_PKG_NAME_MAX, package_ok);
}

/*
 * apt-get update (unless this build fetched the lists moments ago, with the
 * base or an earlier apt step), then one apt-get install.  Packages follow
 * "--" (apt-get ends option parsing there), though validation already keeps
 * a leading '-' out.  The dpkg options keep the image's own configuration
 * files and never ask; unsafe-io skips dpkg's per-file fsync (the layer is
 * synced as a whole when committed, and a step that dies leaves no layer
 * anyway).  No translations: nobody reads package descriptions in a build.
 * apt's binary caches stay in memory: /var/cache/apt is shared between
 * images, and a cached view of one image's dpkg status must never be taken
 * for another's (their status files have the same clamped mtime).
 */
static void push_no_binary_caches(ib_strv *argv)
{
	ib_strv_push(argv, "-o");
	ib_strv_push(argv, "Dir::Cache::pkgcache=");
	ib_strv_push(argv, "-o");
	ib_strv_push(argv, "Dir::Cache::srcpkgcache=");
}

static int apt_plan(ib_step_plan *out, const json_t *arg, const ib_step_ctx *ctx)
{
	ib_strv argv = IB_STRV_INIT;

	if (!ctx || !ctx->apt_lists_fresh) {
		ib_strv_push(&argv, "apt-get");
		ib_strv_push(&argv, "update");
		ib_strv_push(&argv, "-o");
		ib_strv_push(&argv, "Acquire::Languages=none");
		push_no_binary_caches(&argv);
		ib_step_plan_add(out, &argv);
		ib_strv_free(&argv);
	}

	ib_strv_push(&argv, "apt-get");
	ib_strv_push(&argv, "install");
	ib_strv_push(&argv, "-y");
	ib_strv_push(&argv, "--no-install-recommends");
	push_no_binary_caches(&argv);
	ib_strv_push(&argv, "-o");
	ib_strv_push(&argv, "Dpkg::Options::=--force-confdef");
	ib_strv_push(&argv, "-o");
	ib_strv_push(&argv, "Dpkg::Options::=--force-confold");
	ib_strv_push(&argv, "-o");
	ib_strv_push(&argv, "Dpkg::Options::=--force-unsafe-io");
	ib_strv_push(&argv, "--");
	for (size_t i = 0; i < json_array_size(arg); i++)
		ib_strv_push(&argv, json_string_value(json_array_get(arg, i)));
	ib_step_plan_add(out, &argv);
	ib_strv_free(&argv);

	ib_strv_push(&out->env, "DEBIAN_FRONTEND=noninteractive");
	out->flags |= IB_PLAN_APT_CACHE;
	return 0;
}

const ib_step_ops ib_step_apt_install = {
	.name = "apt_install",
	.flags = IB_STEP_APT_LISTS,
	.validate = apt_validate,
	.plan = apt_plan,
};

/*
 * pip_install: ["requests==2.32.3", "uvicorn[standard]>=0.30; python_version >= '3.9'"]
 *
 * Each item is a PEP 508 requirement, checked conservatively (a subset of
 * the grammar, ASCII only) so that pip gets requirements and nothing else:
 *
 *   name [ "[" extras "]" ] [ specifiers | "(" specifiers ")" ] [ ";" marker ]
 *   name [ "[" extras "]" ] "@" url [ " ;" marker ]
 *
 *  - name and each extra: [A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?, so an
 *    item never starts with '-' and cannot smuggle in a pip option;
 *  - specifiers: a comma-separated list of OP VERSION, OP one of ===, ==,
 *    !=, <=, >=, ~=, <, > and VERSION of [A-Za-z0-9_.*+!-];
 *  - url: printable ASCII without spaces;
 *  - marker: printable ASCII, not empty;
 *  - spaces and tabs between the parts, none before the name.
 *
 * Not accepted: bare paths and URLs, "-r file", "-e ...", options of any
 * kind.
 */
#include "steps/step.h"

#include <stdbool.h>
#include <string.h>

#include "lib/limits.h"
#include "lib/field.h"

struct cursor {
	const char *s;
	size_t i, len;
};

static bool alnum(char c)
{
	return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9');
}

/* c in set, where the NUL that ends set does not count. */
static bool in(char c, const char *set)
{
	return c && strchr(set, c);
}

static bool at(const struct cursor *c, char ch)
{
	return c->i < c->len && c->s[c->i] == ch;
}

static bool starts(const struct cursor *c, const char *lit)
{
	size_t n = strlen(lit);

	return c->len - c->i >= n && !memcmp(c->s + c->i, lit, n);
}

static size_t skip_ws(struct cursor *c)
{
	size_t start = c->i;

	while (at(c, ' ') || at(c, '\t'))
		c->i++;
	return c->i - start;
}

/* A PEP 508 identifier: a project or extra name. */
static bool identifier(struct cursor *c)
{
	size_t start = c->i;

	if (c->i >= c->len || !alnum(c->s[c->i]))
		return false;
	while (c->i < c->len && (alnum(c->s[c->i]) || in(c->s[c->i], "._-")))
		c->i++;
	while (c->i > start && !alnum(c->s[c->i - 1]))
		c->i--;
	return true;
}

/* "[" [ident ("," ident)*] "]" */
static bool extras(struct cursor *c)
{
	c->i++; /* '[' */
	skip_ws(c);
	if (at(c, ']')) {
		c->i++;
		return true;
	}
	for (;;) {
		if (!identifier(c))
			return false;
		skip_ws(c);
		if (at(c, ']')) {
			c->i++;
			return true;
		}
		if (!at(c, ','))
			return false;
		c->i++;
		skip_ws(c);
	}
}

static bool version_one(struct cursor *c)
{
	static const char *const ops[] = { "===", "==", "!=", "<=", ">=", "~=", "<", ">" };
	size_t start;
	size_t k;

	for (k = 0; k < sizeof(ops) / sizeof(ops[0]); k++)
		if (starts(c, ops[k]))
			break;
	if (k == sizeof(ops) / sizeof(ops[0]))
		return false;
	c->i += strlen(ops[k]);
	skip_ws(c);
	start = c->i;
	while (c->i < c->len && (alnum(c->s[c->i]) || in(c->s[c->i], "_.*+!-")))
		c->i++;
	return c->i > start;
}

/* version_one ("," version_one)* */
static bool specifiers(struct cursor *c)
{
	for (;;) {
		if (!version_one(c))
			return false;
		skip_ws(c);
		if (!at(c, ','))
			return true;
		c->i++;
		skip_ws(c);
	}
}

/* ";" marker to the end: printable ASCII, something after the ';'. */
static bool marker(struct cursor *c)
{
	c->i++; /* ';' */
	skip_ws(c);
	if (c->i == c->len)
		return false;
	for (; c->i < c->len; c->i++)
		if (c->s[c->i] < 0x20 || c->s[c->i] > 0x7e)
			return false;
	return true;
}

static bool requirement(struct cursor *c)
{
	if (!identifier(c))
		return false;
	skip_ws(c);
	if (at(c, '[')) {
		if (!extras(c))
			return false;
		skip_ws(c);
	}
	if (at(c, '@')) {
		size_t start;

		c->i++;
		skip_ws(c);
		start = c->i;
		while (c->i < c->len && c->s[c->i] > 0x20 && c->s[c->i] < 0x7f)
			c->i++;
		if (c->i == start)
			return false;
		/* A ';' right after the URL belongs to it; a marker needs a space first. */
		if (!skip_ws(c))
			return c->i == c->len;
	} else if (at(c, '(')) {
		c->i++;
		skip_ws(c);
		if (!specifiers(c) || !at(c, ')'))
			return false;
		c->i++;
		skip_ws(c);
	} else if (c->i < c->len && in(c->s[c->i], "=!<>~")) {
		if (!specifiers(c))
			return false;
	}
	if (at(c, ';'))
		return marker(c);
	return c->i == c->len;
}

static int requirement_ok(const char *s, size_t len, const char *field)
{
	struct cursor c = { s, 0, len };
	char q[IB_FIELD_QUOTE_MAX];

	if (s[0] == '-')
		return ib_field_invalid("%s: %s starts with '-'; pip options are not accepted",
				       field, ib_field_quote(q, s, len));
	if (!requirement(&c))
		return ib_field_invalid("%s: %s is not a PEP 508 requirement "
				       "(name[extras] [specifiers] [; marker], or name @ url)",
				       field, ib_field_quote(q, s, len));
	return 0;
}

static int pip_validate(const json_t *arg, const char *field)
{
	return ib_step_check_list(arg, field, "requirement", IB_REQ_MAX, requirement_ok);
}

/* The python to run: a plain path or command name, it ends up in a shell line. */
static bool python_ok(const char *py)
{
	if (!py || !*py || *py == '-')
		return false;
	for (const char *p = py; *p; p++)
		if (!alnum(*p) && !in(*p, "/._-"))
			return false;
	return true;
}

/*
 * The index URL: http(s), printable ASCII without spaces.  For http, pip
 * refuses a host it does not trust (all but localhost and 127.0.0.0/8);
 * the operator chose the URL, so *trusted gets its host[:port].
 */
static int index_url_ok(const char *url, char **trusted)
{
	const char *host, *end, *at_sign;
	char q[IB_FIELD_QUOTE_MAX];
	bool http;

	*trusted = NULL;
	for (const char *p = url; *p; p++)
		if (*p <= 0x20 || *p >= 0x7f)
			goto bad;
	http = !strncmp(url, "http://", 7);
	if (!http && strncmp(url, "https://", 8))
		goto bad;
	host = url + (http ? 7 : 8);
	end = host + strcspn(host, "/?#");
	at_sign = memchr(host, '@', (size_t)(end - host));
	while (at_sign) {
		host = at_sign + 1;
		at_sign = memchr(host, '@', (size_t)(end - host));
	}
	if (end == host)
		goto bad;
	if (http)
		*trusted = ib_xstrndup(host, (size_t)(end - host));
	return 0;
bad:
	return ib_error_set("pip index url %s is not an http:// or https:// URL",
			    ib_field_quote(q, url, strlen(url)));
}

/*
 * First make sure pip exists (Debian's python3 comes without it; a pinned
 * python brings its own), then one pip install.  Requirements follow "--"
 * (pip's optparse ends options there).
 *
 * PIP_BREAK_SYSTEM_PACKAGES and PIP_ROOT_USER_ACTION go in the environment,
 * not on the command line: pip 23.0.1 (bookworm) knows both, but an older
 * pip in a pinned python would refuse the unknown options, while it ignores
 * unknown variables.  The first lets pip install into Debian's python3
 * (EXTERNALLY-MANAGED, PEP 668): the image is ours, not a shared system.
 */
static int pip_plan(ib_step_plan *out, const json_t *arg, const ib_step_ctx *ctx)
{
	ib_step_plan plan = IB_STEP_PLAN_INIT;
	ib_strv argv = IB_STRV_INIT;
	const char *py = ctx && ctx->python ? ctx->python : "python3";
	const char *url = ctx ? ctx->pip_index_url : NULL;
	char *trusted = NULL;
	char q[IB_FIELD_QUOTE_MAX];
	int r;

	if (!python_ok(py)) {
		r = ib_error_set("python %s is not a plain path", ib_field_quote(q, py, strlen(py)));
		goto out;
	}
	if (url && *url) {
		r = index_url_ok(url, &trusted);
		if (r < 0)
			goto out;
	}

	ib_strv_push(&argv, "/bin/sh");
	ib_strv_push(&argv, "-c");
	ib_strv_pushf(&argv,
		      "%s -m pip --version >/dev/null 2>&1 || "
		      "{ %sapt-get install -y --no-install-recommends "
		      "-o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache= "
		      "-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "
		      "-o Dpkg::Options::=--force-unsafe-io "
		      "python3-pip; }",
		      py,
		      ctx && ctx->apt_lists_fresh ? ""
						  : "apt-get update -o Acquire::Languages=none -o Dir::Cache::pkgcache= "
						    "-o Dir::Cache::srcpkgcache= && ");
	ib_step_plan_add(&plan, &argv);
	ib_strv_free(&argv);

	ib_strv_push(&argv, py);
	ib_strv_push(&argv, "-m");
	ib_strv_push(&argv, "pip");
	ib_strv_push(&argv, "install");
	ib_strv_push(&argv, "--no-cache-dir");
	ib_strv_push(&argv, "--disable-pip-version-check");
	ib_strv_push(&argv, "--no-input");
	if (url && *url) {
		ib_strv_push(&argv, "--index-url");
		ib_strv_push(&argv, url);
	}
	if (trusted) {
		ib_strv_push(&argv, "--trusted-host");
		ib_strv_push(&argv, trusted);
	}
	ib_strv_push(&argv, "--");
	for (size_t i = 0; i < json_array_size(arg); i++)
		ib_strv_push(&argv, json_string_value(json_array_get(arg, i)));
	ib_step_plan_add(&plan, &argv);
	ib_strv_free(&argv);

	ib_strv_push(&plan.env, "DEBIAN_FRONTEND=noninteractive");
	ib_strv_push(&plan.env, "PIP_BREAK_SYSTEM_PACKAGES=1");
	ib_strv_push(&plan.env, "PIP_ROOT_USER_ACTION=ignore");
	plan.flags |= IB_PLAN_APT_CACHE;
	*out = plan;
	plan = (ib_step_plan)IB_STEP_PLAN_INIT;
	r = 0;
out:
	free(trusted);
	ib_step_plan_free(&plan);
	return r;
}

const ib_step_ops ib_step_pip_install = {
	.name = "pip_install",
	.validate = pip_validate,
	.plan = pip_plan,
};

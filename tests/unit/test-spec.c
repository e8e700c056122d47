/*
 * The spec module and the step kinds: every validation rule, canonical
 * forms, the key chain (with a golden id) and the plans.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lib/error.h"
#include "lib/limits.h"
#include "lib/util.h"
#include "spec/plan.h"
#include "spec/spec.h"
#include "steps/step.h"
#include "tests/unit/test.h"

/*
 * Parse len bytes of json and expect a rejection (IB_EINVALID, nothing
 * returned) whose message starts with "field: " and contains needle.
 */
#define ASSERT_REJECTS_N(json, len, field, needle)                                        \
	do {                                                                              \
		ib_spec *s_ = NULL;                                                       \
		const char *f_ = (field);                                                 \
		int r_;                                                                   \
		ib_error_clear();                                                         \
		r_ = ib_spec_parse(&s_, (json), (len));                                   \
		if (r_ != IB_EINVALID || s_) {                                            \
			ib_spec_free(s_);                                                 \
			IB_FAIL_("%.200s: returned %d, expected IB_EINVALID ('%s')",      \
				 (json), r_, ib_error_last());                            \
		}                                                                         \
		if (strncmp(ib_error_last(), f_, strlen(f_)) ||                           \
		    strncmp(ib_error_last() + strlen(f_), ": ", 2))                       \
			IB_FAIL_("'%s' does not start with '%s: '", ib_error_last(), f_);  \
		ASSERT_STR_CONTAINS(ib_error_last(), (needle));                           \
	} while (0)

#define ASSERT_REJECTS(json, field, needle) ASSERT_REJECTS_N(json, strlen(json), field, needle)

#define ASSERT_ACCEPTS(json)                                                              \
	do {                                                                              \
		ib_spec *s_ = NULL;                                                       \
		int r_ = ib_spec_parse(&s_, (json), strlen(json));                        \
		if (r_ != 0 || !s_)                                                       \
			IB_FAIL_("%.200s: returned %d ('%s'), expected 0", (json), r_,    \
				 ib_error_last());                                        \
		ib_spec_free(s_);                                                         \
	} while (0)

#define BASE "\"base\":\"debian_amd64\""
/* A spec with one step; step is JSON text. */
#define SPEC_OPEN "{" BASE ",\"steps\":["
#define SPEC_CLOSE "]}"
#define SPEC1(step) SPEC_OPEN step SPEC_CLOSE

#define EXAMPLE                                                                           \
	"{\n"                                                                             \
	"  \"base\": \"debian_amd64\",\n"                                                 \
	"  \"python_version\": \"3.12.1\",\n"                                             \
	"  \"steps\": [\n"                                                                \
	"    {\"apt_install\": [\"git\", \"curl\"]},\n"                                   \
	"    {\"pip_install\": [\"requests==2.32.3\"]},\n"                                \
	"    {\"run_commands\": [\"echo hi > /hello.txt\", \"useradd -m app\"]},\n"      \
	"    {\"env\": {\"APP_ENV\": \"demo\"}}\n"                                        \
	"  ]\n"                                                                           \
	"}\n"

/* A stand-in for the canonical base definition the planner feeds in. */
#define BASE_DEF "{\"arch\":\"amd64\",\"name\":\"debian_amd64\",\"suite\":\"bookworm\"}"

static int parse(ib_spec **out, const char *json)
{
	return ib_spec_parse(out, json, strlen(json));
}

/* keys[0] the base key, keys[i] the key after step i-1; returns the count. */
static size_t chain(char keys[][IB_SHA256_HEX], size_t max, const ib_spec *spec)
{
	size_t n = 0;

	ib_key_base(keys[n++], BASE_DEF);
	for (size_t i = 0; i < spec->nsteps && n < max; i++, n++) {
		char *c = ib_step_canonical(&spec->steps[i]);

		ib_key_step(keys[n], keys[n - 1], c);
		free(c);
	}
	return n;
}

/* ---- accepted specs ---- */

TEST(example_parses)
{
	ib_spec *spec = NULL;

	ASSERT_INT_EQ(parse(&spec, EXAMPLE), 0);
	ASSERT_STR_EQ(spec->base, "debian_amd64");
	ASSERT_STR_EQ(spec->python_version, "3.12.1");
	ASSERT_INT_EQ(spec->nsteps, 4);
	ASSERT_TRUE(spec->steps[0].ops == &ib_step_apt_install);
	ASSERT_TRUE(spec->steps[1].ops == &ib_step_pip_install);
	ASSERT_TRUE(spec->steps[2].ops == &ib_step_run_commands);
	ASSERT_TRUE(spec->steps[3].ops == &ib_step_env);
	ASSERT_INT_EQ(json_array_size(spec->steps[0].arg), 2);
	ib_spec_free(spec);
}

TEST(minimal_spec_and_aliases)
{
	ib_spec *spec = NULL;

	ASSERT_INT_EQ(parse(&spec, "{\"base\":\"debian_arm\"}"), 0);
	ASSERT_STR_EQ(spec->base, "debian_arm64");
	ASSERT_TRUE(spec->python_version == NULL);
	ASSERT_INT_EQ(spec->nsteps, 0);
	ib_spec_free(spec);
	spec = NULL;

	ASSERT_INT_EQ(parse(&spec, "{\"base\":\"debian_amd\",\"python_version\":null,\"steps\":[]}"), 0);
	ASSERT_STR_EQ(spec->base, "debian_amd64");
	ASSERT_TRUE(spec->python_version == NULL);
	ib_spec_free(spec);

	ASSERT_STR_EQ(ib_spec_base_name("debian_amd64"), "debian_amd64");
	ASSERT_STR_EQ(ib_spec_base_name("debian_arm64"), "debian_arm64");
	ASSERT_STR_EQ(ib_spec_base_name("debian_amd"), "debian_amd64");
	ASSERT_STR_EQ(ib_spec_base_name("debian_arm"), "debian_arm64");
	ASSERT_TRUE(ib_spec_base_name("debian") == NULL);
	ASSERT_TRUE(ib_spec_base_name("Debian_amd64") == NULL);
	ASSERT_TRUE(ib_spec_base_name(NULL) == NULL);
	ib_spec_free(NULL);
}

/* ---- the document ---- */

TEST(rejects_over_long_input)
{
	size_t len = IB_SPEC_MAX_BYTES + 1;
	char *big = ib_xmalloc(len + 1);
	const char *doc = "{\"base\":\"debian_amd64\"}";

	/* Exactly at the limit (white space padding) is fine. */
	memset(big, ' ', len);
	memcpy(big, doc, strlen(doc));
	big[len] = '\0';
	{
		ib_spec *spec = NULL;

		ASSERT_INT_EQ(ib_spec_parse(&spec, big, len - 1), 0);
		ib_spec_free(spec);
	}
	ASSERT_REJECTS_N(big, len, "spec", "1048577 bytes; at most 1048576");
	free(big);
}

TEST(rejects_raw_nul_naming_the_field)
{
	static const char in_string[] = SPEC1("{\"run_commands\":[\"echo\0hi\"]}");
	static const char outside[] = "{\"base\":\"debian_amd64\"}\0";
	static const char after_backslash[] = "{\"base\":\"debian\\\0\"}";
	static const char in_key[] = "{\"ba\0se\":\"debian_amd64\"}";

	ASSERT_REJECTS_N(in_string, sizeof(in_string) - 1, "steps[0].run_commands[0]", "NUL byte");
	ASSERT_REJECTS_N(outside, sizeof(outside) - 1, "spec", "NUL byte at line 1, column 24");
	ASSERT_REJECTS_N(after_backslash, sizeof(after_backslash) - 1, "spec", "NUL byte at line 1");
	ASSERT_REJECTS_N(in_key, sizeof(in_key) - 1, "spec", "NUL byte");
}

TEST(rejects_escaped_nul_naming_the_field)
{
	ASSERT_REJECTS("{\"base\":\"debian_amd64\\u0000\"}", "base", "contains a NUL byte");
	ASSERT_REJECTS(SPEC1("{\"run_commands\":[\"true\",\"echo \\u0000\"]}"),
		       "steps[0].run_commands[1]", "contains a NUL byte");
	ASSERT_REJECTS(SPEC1("{\"apt_install\":[\"git\\u0000\"]}"), "steps[0].apt_install[0]",
		       "contains a NUL byte");
	ASSERT_REJECTS(SPEC1("{\"pip_install\":[\"requests\\u0000\"]}"), "steps[0].pip_install[0]",
		       "contains a NUL byte");
	ASSERT_REJECTS(SPEC1("{\"env\":{\"A\":\"x\\u0000y\"}}"), "steps[0].env.A",
		       "contains a NUL byte");
	ASSERT_REJECTS("{\"base\":\"debian_amd64\",\"python_version\":\"3.12.1\\u0000\"}",
		       "python_version", "contains a NUL byte");
	/* jansson refuses a NUL in a key outright. */
	ASSERT_REJECTS(SPEC1("{\"env\":{\"A\\u0000B\":\"x\"}}"), "spec", "NUL byte in object key");
}

TEST(rejects_invalid_json)
{
	ASSERT_REJECTS("", "spec", "not valid JSON");
	ASSERT_REJECTS("{\"base\":", "spec", "not valid JSON at line 1");
	ASSERT_REJECTS("{\"base\":\"debian_amd64\"} x", "spec", "not valid JSON");
	ASSERT_REJECTS("{\"base\":\"debian_amd64\",}", "spec", "not valid JSON");
	ASSERT_REJECTS("{\"base\":\"deb\xff\"}", "spec", "not valid JSON");
	ASSERT_REJECTS("{\"base\":\"a\nb\"}", "spec", "not valid JSON at line 1");
	ASSERT_REJECTS("{\n\"base\":\"debian_amd64\",\n\"x\":\"\\ud800\"}", "spec", "line 3");
}

TEST(rejects_duplicate_keys)
{
	ASSERT_REJECTS("{\"base\":\"debian_amd64\",\"base\":\"debian_arm64\"}", "spec",
		       "duplicate object key near '\"base\"'");
	ASSERT_REJECTS(SPEC1("{\"env\":{\"A\":\"1\",\"A\":\"2\"}}"), "spec", "duplicate object key");
}

TEST(rejects_deep_nesting)
{
	ib_buf b = IB_BUF_INIT;

	/* Root is level 1; x's arrays are levels 2 and up. */
	for (int levels = IB_JSON_DEPTH_MAX - 1; levels <= IB_JSON_DEPTH_MAX; levels++) {
		ib_buf_reset(&b);
		ib_buf_puts(&b, "{" BASE ",\"x\":");
		for (int i = 0; i < levels; i++)
			ib_buf_puts(&b, "[");
		for (int i = 0; i < levels; i++)
			ib_buf_puts(&b, "]");
		ib_buf_puts(&b, "}");
		if (levels < IB_JSON_DEPTH_MAX) {
			ASSERT_REJECTS(b.ptr, "spec", "unknown key 'x'");
		} else {
			/* The innermost array, at level 17, is the culprit. */
			char field[128] = "x";

			for (int i = 0; i < IB_JSON_DEPTH_MAX - 1; i++)
				memcpy(field + 1 + 3 * i, "[0]", 4);
			ASSERT_REJECTS(b.ptr, field, "nested more than 16 levels deep");
		}
	}
	/* Far past jansson's own limit: still a clean rejection. */
	ib_buf_reset(&b);
	for (int i = 0; i < 5000; i++)
		ib_buf_puts(&b, "[");
	ASSERT_REJECTS(b.ptr, "spec", "not valid JSON");
	ib_buf_free(&b);
}

/* ---- top-level keys ---- */

TEST(rejects_non_object_top)
{
	ASSERT_REJECTS("[]", "spec", "expected an object, got an array");
	ASSERT_REJECTS("\"debian_amd64\"", "spec", "expected an object, got a string");
	ASSERT_REJECTS("null", "spec", "expected an object, got null");
}

TEST(rejects_unknown_top_key)
{
	ASSERT_REJECTS("{" BASE ",\"stepz\":[]}", "spec", "unknown key 'stepz'");
	ASSERT_REJECTS("{" BASE ",\"Base\":\"x\"}", "spec", "unknown key 'Base'");
	ASSERT_REJECTS("{" BASE ",\"a b\\n\":1}", "spec", "unknown key 'a b\\x0a'");
}

TEST(rejects_missing_base)
{
	ASSERT_REJECTS("{}", "base", "missing");
	ASSERT_REJECTS("{\"steps\":[]}", "base", "missing");
}

TEST(rejects_bad_base)
{
	ASSERT_REJECTS("{\"base\":\"ubuntu\"}", "base",
		       "unknown base 'ubuntu'; known: debian_amd64, debian_arm64 (aliases debian_amd, debian_arm)");
	ASSERT_STR_EQ(ib_error_last(),
		      "base: unknown base 'ubuntu'; known: debian_amd64, debian_arm64 (aliases debian_amd, debian_arm)");
	ASSERT_REJECTS("{\"base\":\"\"}", "base", "unknown base ''");
	ASSERT_REJECTS("{\"base\":\"debian_amd64 \"}", "base", "unknown base");
	ASSERT_REJECTS("{\"base\":42}", "base", "expected a string, got a number");
	ASSERT_REJECTS("{\"base\":null}", "base", "expected a string, got null");
	ASSERT_REJECTS("{\"base\":[\"debian_amd64\"]}", "base", "expected a string, got an array");
}

TEST(python_version_rules)
{
	static const char *const good[] = { "3.12.1", "0.0.0", "10.100.999", "3.8.18" };
	static const char *const bad[] = {
		"3.12", "3.12.1.1", "3.12.x", "03.12.1", "3.012.1", "3.1234.1", "",
		" 3.12.1", "3.12.1 ", "3..1", "3.12.", ".3.12", "3.12.1rc1", "v3.12.1",
		"\\u0663.12.1",
	};
	char json[256];

	for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
		ib_spec *spec = NULL;

		snprintf(json, sizeof(json), "{" BASE ",\"python_version\":\"%s\"}", good[i]);
		ASSERT_INT_EQ(parse(&spec, json), 0);
		ASSERT_STR_EQ(spec->python_version, good[i]);
		ib_spec_free(spec);
	}
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		snprintf(json, sizeof(json), "{" BASE ",\"python_version\":\"%s\"}", bad[i]);
		ASSERT_REJECTS(json, "python_version", "is not a version X.Y.Z");
	}
	ASSERT_REJECTS("{" BASE ",\"python_version\":3.12}", "python_version",
		       "expected a string \"X.Y.Z\" or null, got a number");
	ASSERT_REJECTS("{" BASE ",\"python_version\":[\"3.12.1\"]}", "python_version", "got an array");
}

/* ---- steps ---- */

TEST(disk_size_rules)
{
	static const char *const same[] = {
		"{\"base\":\"debian_amd64\"}",
		"{\"base\":\"debian_amd64\",\"disk_size\":4294967296}",
		"{\"base\":\"debian_amd64\",\"disk_size\":\"4G\"}",
		"{\"base\":\"debian_amd64\",\"disk_size\":\"4096m\"}",
		"{\"base\":\"debian_amd64\",\"disk_size\":\"4194304K\"}",
		"{\"base\":\"debian_amd64\",\"disk_size\":\"4294967296\"}",
		"{\"base\":\"debian_amd64\",\"disk_size\":null}",
	};
	char *first = NULL;

	for (size_t i = 0; i < sizeof(same) / sizeof(same[0]); i++) {
		ib_spec *spec = NULL;
		char *c;
		ASSERT_INT_EQ(parse(&spec, same[i]), 0);
		ASSERT_TRUE(spec->disk_size == 4ULL << 30);
		c = ib_spec_canonical(spec);
		if (!first)
			first = c;
		else {
			ASSERT_STR_EQ(c, first);
			free(c);
		}
		ib_spec_free(spec);
	}
	free(first);
	ASSERT_ACCEPTS("{\"base\":\"debian_amd64\",\"disk_size\":\"1T\"}");
	ASSERT_ACCEPTS("{\"base\":\"debian_amd64\",\"disk_size\":\"64M\"}");
	ASSERT_REJECTS("{\"base\":\"debian_amd64\",\"disk_size\":0}", "disk_size", "not a size");
	ASSERT_REJECTS("{\"base\":\"debian_amd64\",\"disk_size\":-4096}", "disk_size", "not a size");
	ASSERT_REJECTS("{\"base\":\"debian_amd64\",\"disk_size\":\"4X\"}", "disk_size", "not a size");
	ASSERT_REJECTS("{\"base\":\"debian_amd64\",\"disk_size\":\"4.5G\"}", "disk_size", "not a size");
	ASSERT_REJECTS("{\"base\":\"debian_amd64\",\"disk_size\":\"G\"}", "disk_size", "not a size");
	ASSERT_REJECTS("{\"base\":\"debian_amd64\",\"disk_size\":\" 4G\"}", "disk_size", "not a size");
	ASSERT_REJECTS("{\"base\":\"debian_amd64\",\"disk_size\":4.5}", "disk_size", "got a number");
	ASSERT_REJECTS("{\"base\":\"debian_amd64\",\"disk_size\":[1]}", "disk_size", "got an array");
	ASSERT_REJECTS("{\"base\":\"debian_amd64\",\"disk_size\":1073741825}", "disk_size", "multiple of 4096");
	ASSERT_REJECTS("{\"base\":\"debian_amd64\",\"disk_size\":\"32M\"}", "disk_size", "from 64 MiB");
	ASSERT_REJECTS("{\"base\":\"debian_amd64\",\"disk_size\":\"2T\"}", "disk_size", "larger than 1024 GiB");
	ASSERT_REJECTS("{\"base\":\"debian_amd64\",\"disk_size\":\"99999999999999999999\"}", "disk_size", "larger");
}

TEST(rejects_bad_steps_value)
{
	ASSERT_REJECTS("{" BASE ",\"steps\":{}}", "steps", "expected an array, got an object");
	ASSERT_REJECTS("{" BASE ",\"steps\":null}", "steps", "expected an array, got null");
	ASSERT_REJECTS("{" BASE ",\"steps\":\"apt_install\"}", "steps", "got a string");
}

TEST(rejects_too_many_steps)
{
	ib_buf b = IB_BUF_INIT;

	for (int n = IB_SPEC_MAX_STEPS; n <= IB_SPEC_MAX_STEPS + 1; n++) {
		ib_buf_reset(&b);
		ib_buf_puts(&b, "{" BASE ",\"steps\":[");
		for (int i = 0; i < n; i++)
			ib_buf_printf(&b, "%s{\"run_commands\":[\"true\"]}", i ? "," : "");
		ib_buf_puts(&b, "]}");
		if (n <= IB_SPEC_MAX_STEPS)
			ASSERT_ACCEPTS(b.ptr);
		else
			ASSERT_REJECTS(b.ptr, "steps", "65 steps; at most 64");
	}
	ib_buf_free(&b);
}

TEST(rejects_bad_step_shape)
{
	ASSERT_REJECTS(SPEC1("\"apt_install\""), "steps[0]",
		       "expected an object with one key, the step kind");
	ASSERT_REJECTS(SPEC1("[\"git\"]"), "steps[0]", "got an array");
	ASSERT_REJECTS(SPEC1("{}"), "steps[0]", "0 keys; a step has exactly one");
	ASSERT_REJECTS(SPEC1("{\"apt_install\":[\"git\"],\"env\":{\"A\":\"1\"}}"), "steps[0]",
		       "2 keys; a step has exactly one");
	ASSERT_REJECTS("{" BASE ",\"steps\":[{\"env\":{\"A\":\"1\"}},{\"run_commands\":[\"true\"]},7]}",
		       "steps[2]", "got a number");
}

TEST(rejects_unknown_step_kind)
{
	ASSERT_REJECTS(SPEC1("{\"yum_install\":[\"git\"]}"), "steps[0]",
		       "unknown step kind 'yum_install'; known: apt_install, pip_install, run_commands, env");
	ASSERT_REJECTS(SPEC1("{\"APT_INSTALL\":[\"git\"]}"), "steps[0]", "unknown step kind");
}

TEST(registry)
{
	ASSERT_TRUE(ib_step_lookup("apt_install") == &ib_step_apt_install);
	ASSERT_TRUE(ib_step_lookup("pip_install") == &ib_step_pip_install);
	ASSERT_TRUE(ib_step_lookup("run_commands") == &ib_step_run_commands);
	ASSERT_TRUE(ib_step_lookup("env") == &ib_step_env);
	ASSERT_TRUE(ib_step_lookup("yum_install") == NULL);
	ASSERT_TRUE(ib_step_lookup("") == NULL);
	ASSERT_TRUE(ib_step_lookup(NULL) == NULL);
	ASSERT_STR_EQ(ib_step_kinds(), "apt_install, pip_install, run_commands, env");
}

/* ---- apt_install ---- */

TEST(apt_install_shape)
{
	ASSERT_REJECTS(SPEC1("{\"apt_install\":\"git\"}"), "steps[0].apt_install",
		       "expected an array of package names, got a string");
	ASSERT_REJECTS(SPEC1("{\"apt_install\":{\"git\":1}}"), "steps[0].apt_install", "got an object");
	ASSERT_REJECTS(SPEC1("{\"apt_install\":[]}"), "steps[0].apt_install",
		       "empty; at least one package name is required");
	ASSERT_REJECTS(SPEC1("{\"apt_install\":[\"git\",1]}"), "steps[0].apt_install[1]",
		       "expected a string (a package name), got a number");
	ASSERT_REJECTS(SPEC1("{\"apt_install\":[\"git\",[\"curl\"]]}"), "steps[0].apt_install[1]",
		       "got an array");
	ASSERT_REJECTS(SPEC1("{\"apt_install\":[\"\"]}"), "steps[0].apt_install[0]", "empty");
}

TEST(apt_install_names)
{
	static const char *const good[] = {
		"git", "g++", "libstdc++6", "python3.11", "0ad", "curl=7.88.1-10+deb12u5",
		"libc6:arm64", "libc6:arm64=2.36-9+deb12u4", "foo=1:2.3~rc1-1", "foo+",
	};
	/* JSON string contents: escapes are JSON's. */
	static const char *const bad[] = {
		"git;rm -rf /", "$(reboot)", "`id`", "-y", "--allow-unauthenticated", "a",
		"Git", "git curl", "git/bookworm", "*", "git*", "git=", "git=abc", "git=1.0 x",
		"git:amd64:arm64", "git:", "git:-x", "../x.deb", "/tmp/x.deb", "git|x", "git&",
		"git\\n", "git\\t", "\\u00fcber", "git>1", "git=1.0;x", ".git", "+git",
		"git=1.0=2", "git=1_0",
	};
	char json[512];

	for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
		snprintf(json, sizeof(json), SPEC1("{\"apt_install\":[\"%s\"]}"), good[i]);
		ASSERT_ACCEPTS(json);
	}
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		snprintf(json, sizeof(json), SPEC1("{\"apt_install\":[\"git\",\"%s\"]}"), bad[i]);
		ASSERT_REJECTS(json, "steps[0].apt_install[1]", "is not a Debian package name");
	}
	ASSERT_REJECTS("{" BASE ",\"steps\":[{\"env\":{\"A\":\"1\"}},{\"apt_install\":[\"Foo;bar\"]}]}",
		       "steps[1].apt_install[0]", "'Foo;bar' is not a Debian package name");
	/* A trailing '-' would make apt-get remove the package. */
	ASSERT_REJECTS(SPEC1("{\"apt_install\":[\"bash-\"]}"), "steps[0].apt_install[0]",
		       "ends in '-', which apt-get reads as 'remove'");
	ASSERT_REJECTS(SPEC1("{\"apt_install\":[\"bash:amd64-\"]}"), "steps[0].apt_install[0]",
		       "ends in '-'");
	ASSERT_REJECTS(SPEC1("{\"apt_install\":[\"hello=2.10-3-\"]}"), "steps[0].apt_install[0]",
		       "ends in '-'");
}

TEST(apt_install_limits)
{
	ib_buf b = IB_BUF_INIT;

	ib_buf_puts(&b, SPEC_OPEN "{\"apt_install\":[\"git\",\"");
	for (int i = 0; i < IB_PKG_NAME_MAX + 1; i++)
		ib_buf_puts(&b, "a");
	ib_buf_puts(&b, "\"]}" SPEC_CLOSE);
	ASSERT_REJECTS(b.ptr, "steps[0].apt_install[1]", "129 bytes; a package name is at most 128");

	for (int n = IB_STEP_MAX_ITEMS; n <= IB_STEP_MAX_ITEMS + 1; n++) {
		ib_buf_reset(&b);
		ib_buf_puts(&b, "{" BASE ",\"steps\":[{\"apt_install\":[");
		for (int i = 0; i < n; i++)
			ib_buf_printf(&b, "%s\"pkg%d\"", i ? "," : "", i);
		ib_buf_puts(&b, "]}]}");
		if (n <= IB_STEP_MAX_ITEMS)
			ASSERT_ACCEPTS(b.ptr);
		else
			ASSERT_REJECTS(b.ptr, "steps[0].apt_install", "513 items; at most 512");
	}
	ib_buf_free(&b);
}

/* ---- pip_install ---- */

TEST(pip_install_shape)
{
	ASSERT_REJECTS(SPEC1("{\"pip_install\":\"requests\"}"), "steps[0].pip_install",
		       "expected an array of requirements, got a string");
	ASSERT_REJECTS(SPEC1("{\"pip_install\":[]}"), "steps[0].pip_install", "empty");
	ASSERT_REJECTS(SPEC1("{\"pip_install\":[true]}"), "steps[0].pip_install[0]",
		       "expected a string (a requirement), got a boolean");
	ASSERT_REJECTS(SPEC1("{\"pip_install\":[\"\"]}"), "steps[0].pip_install[0]", "empty");
}

TEST(pip_install_requirements)
{
	static const char *const good[] = {
		"requests", "requests==2.32.3", "Requests[security,socks]>=2.0,<3",
		"uvicorn[standard] >= 0.30 ; python_version >= '3.9'",
		"foo (>=1.0, <2)", "pkg @ https://example.com/pkg-1.0.tar.gz",
		"pkg@https://example.com/x.whl ; sys_platform == 'linux'",
		"a", "zope.interface", "foo===1.0", "foo~=1.4.2", "foo!=1.5.*",
		"torch==2.0.0+cpu", "foo[]", "foo_bar-baz.qux", "foo==1.0; os_name == \\\"posix\\\"",
		"foo @ https://x/y;z=1", "pkg==1.0 ",
	};
	static const char *const bad[] = {
		"", " requests", "requests;", "requests ==", "requests @", "requests @ https://x y",
		"requests; \\u0001", "./local/path", "/abs/path.whl", "https://x/y.whl",
		"requests==1.0 && rm -rf /", "requests`id`", "requests$(id)", "req\\u00fcests",
		"foo-", "foo[bar", "foo[-x]", "foo==1.0;", "foo>=1.0 <2", "foo (>=1.0",
		"foo==1.0\\n", "foo\\tbar", "foo==", "foo=1.0", "foo @ https://x/\\u00e9",
		"foo[bar]extra", "foo; python_version > '3' \\u00e9",
	};
	char json[512];

	for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
		snprintf(json, sizeof(json), SPEC1("{\"pip_install\":[\"%s\"]}"), good[i]);
		ASSERT_ACCEPTS(json);
	}
	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		snprintf(json, sizeof(json), SPEC1("{\"pip_install\":[\"ok\",\"%s\"]}"), bad[i]);
		if (!bad[i][0])
			ASSERT_REJECTS(json, "steps[0].pip_install[1]", "empty");
		else
			ASSERT_REJECTS(json, "steps[0].pip_install[1]", "is not a PEP 508 requirement");
	}
	/* No pip options, however spelt. */
	ASSERT_REJECTS(SPEC1("{\"pip_install\":[\"-r\",\"requirements.txt\"]}"),
		       "steps[0].pip_install[0]", "'-r' starts with '-'; pip options are not accepted");
	ASSERT_REJECTS(SPEC1("{\"pip_install\":[\"--index-url=http://evil/\"]}"),
		       "steps[0].pip_install[0]", "starts with '-'");
	ASSERT_REJECTS(SPEC1("{\"pip_install\":[\"-e git+https://x/y\"]}"),
		       "steps[0].pip_install[0]", "starts with '-'");
}

TEST(pip_install_limits)
{
	ib_buf b = IB_BUF_INIT;

	ib_buf_puts(&b, SPEC_OPEN "{\"pip_install\":[\"");
	for (int i = 0; i < IB_REQ_MAX + 1; i++)
		ib_buf_puts(&b, "a");
	ib_buf_puts(&b, "\"]}" SPEC_CLOSE);
	ASSERT_REJECTS(b.ptr, "steps[0].pip_install[0]", "1025 bytes; a requirement is at most 1024");
	ib_buf_free(&b);
}

/* ---- run_commands ---- */

TEST(run_commands_rules)
{
	ib_buf b = IB_BUF_INIT;

	ASSERT_ACCEPTS(SPEC1("{\"run_commands\":[\"echo hi > /hello.txt\", \"a && b || c; $(d) `e`\"]}"));
	ASSERT_REJECTS(SPEC1("{\"run_commands\":\"echo hi\"}"), "steps[0].run_commands",
		       "expected an array of commands, got a string");
	ASSERT_REJECTS(SPEC1("{\"run_commands\":[]}"), "steps[0].run_commands",
		       "empty; at least one command is required");
	ASSERT_REJECTS(SPEC1("{\"run_commands\":[\"true\",\"\"]}"), "steps[0].run_commands[1]",
		       "empty; expected a command");
	ASSERT_REJECTS(SPEC1("{\"run_commands\":[{\"sh\":\"x\"}]}"), "steps[0].run_commands[0]",
		       "expected a string (a command), got an object");
	ASSERT_REJECTS(SPEC1("{\"run_commands\":[null]}"), "steps[0].run_commands[0]", "got null");

	for (int n = IB_CMD_MAX; n <= IB_CMD_MAX + 1; n++) {
		ib_buf_reset(&b);
		ib_buf_puts(&b, SPEC_OPEN "{\"run_commands\":[\"");
		for (int i = 0; i < n; i++)
			ib_buf_puts(&b, "x");
		ib_buf_puts(&b, "\"]}" SPEC_CLOSE);
		if (n <= IB_CMD_MAX)
			ASSERT_ACCEPTS(b.ptr);
		else
			ASSERT_REJECTS(b.ptr, "steps[0].run_commands[0]", "65537 bytes; a command is at most 65536");
	}
	ib_buf_free(&b);
}

/* ---- env ---- */

TEST(env_shape)
{
	ASSERT_ACCEPTS(SPEC1("{\"env\":{\"APP_ENV\":\"demo\",\"_x1\":\"\",\"PATH\":\"/a:/b\",\"T\":\"a\\tb\",\"U\":\"\\u00e9\"}}"));
	ASSERT_REJECTS(SPEC1("{\"env\":[\"A=1\"]}"), "steps[0].env",
		       "expected an object of variable names to strings, got an array");
	ASSERT_REJECTS(SPEC1("{\"env\":\"A=1\"}"), "steps[0].env", "got a string");
	ASSERT_REJECTS(SPEC1("{\"env\":{}}"), "steps[0].env", "empty; at least one variable");
}

TEST(env_names)
{
	static const char *const bad[] = { "1ABC", "A-B", "A B", "", "A=B", "A.B", "\\u00c9T", "$A" };
	char json[512];
	ib_buf b = IB_BUF_INIT;

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		snprintf(json, sizeof(json), SPEC1("{\"env\":{\"OK\":\"1\",\"%s\":\"1\"}}"), bad[i]);
		ASSERT_REJECTS(json, "steps[0].env", "is not a POSIX variable name");
	}
	ASSERT_REJECTS(SPEC1("{\"env\":{\"A=B\":\"1\"}}"), "steps[0].env", "'A=B' is not a POSIX variable name");

	ib_buf_puts(&b, SPEC_OPEN "{\"env\":{\"");
	for (int i = 0; i < IB_ENV_NAME_MAX + 1; i++)
		ib_buf_puts(&b, "A");
	ib_buf_puts(&b, "\":\"1\"}}" SPEC_CLOSE);
	ASSERT_REJECTS(b.ptr, "steps[0].env", "is 129 bytes; at most 128");
	ib_buf_free(&b);

	ASSERT_TRUE(ib_field_env_name_ok("A"));
	ASSERT_TRUE(ib_field_env_name_ok("_"));
	ASSERT_TRUE(ib_field_env_name_ok("a_B9"));
	ASSERT_TRUE(!ib_field_env_name_ok(""));
	ASSERT_TRUE(!ib_field_env_name_ok("9A"));
	ASSERT_TRUE(!ib_field_env_name_ok("A-"));
	ASSERT_TRUE(!ib_field_env_name_ok(NULL));
}

TEST(env_values)
{
	ib_buf b = IB_BUF_INIT;

	ASSERT_REJECTS(SPEC1("{\"env\":{\"PORT\":8080}}"), "steps[0].env.PORT",
		       "expected a string, got a number");
	ASSERT_REJECTS(SPEC1("{\"env\":{\"A\":null}}"), "steps[0].env.A", "got null");
	ASSERT_REJECTS(SPEC1("{\"env\":{\"A\":\"x\\ny\"}}"), "steps[0].env.A",
		       "contains a line break; values go into /etc/environment");
	ASSERT_REJECTS(SPEC1("{\"env\":{\"A\":\"x\\ry\"}}"), "steps[0].env.A", "line break");
	ASSERT_REJECTS(SPEC1("{\"env\":{\"A\":\"x\\u0007\"}}"), "steps[0].env.A",
		       "control character 0x07");
	ASSERT_REJECTS(SPEC1("{\"env\":{\"A\":\"x\\u007f\"}}"), "steps[0].env.A",
		       "control character 0x7f");

	for (int n = IB_ENV_VALUE_MAX; n <= IB_ENV_VALUE_MAX + 1; n++) {
		ib_buf_reset(&b);
		ib_buf_puts(&b, SPEC_OPEN "{\"env\":{\"A\":\"");
		for (int i = 0; i < n; i++)
			ib_buf_puts(&b, "v");
		ib_buf_puts(&b, "\"}}" SPEC_CLOSE);
		if (n <= IB_ENV_VALUE_MAX)
			ASSERT_ACCEPTS(b.ptr);
		else
			ASSERT_REJECTS(b.ptr, "steps[0].env.A", "32769 bytes; a value is at most 32768");
	}
	ib_buf_free(&b);
}

TEST(env_count_limits)
{
	ib_buf b = IB_BUF_INIT;

	/* One step over the limit. */
	ib_buf_puts(&b, SPEC_OPEN "{\"env\":{");
	for (int i = 0; i < IB_ENV_MAX_VARS + 1; i++)
		ib_buf_printf(&b, "%s\"V%d\":\"1\"", i ? "," : "", i);
	ib_buf_puts(&b, "}}" SPEC_CLOSE);
	ASSERT_REJECTS(b.ptr, "steps[0].env", "257 variables; at most 256");

	/* Several steps, together over it. */
	ib_buf_reset(&b);
	ib_buf_puts(&b, "{" BASE ",\"steps\":[");
	for (int s = 0; s < 3; s++) {
		ib_buf_printf(&b, "%s{\"env\":{", s ? "," : "");
		for (int i = 0; i < 100; i++)
			ib_buf_printf(&b, "%s\"S%d_%d\":\"1\"", i ? "," : "", s, i);
		ib_buf_puts(&b, "}}");
	}
	ib_buf_puts(&b, "]}");
	ASSERT_REJECTS(b.ptr, "steps[2].env", "more than 256 variables in all");
	ib_buf_free(&b);
}

/* ---- messages ---- */

TEST(quote)
{
	char q[IB_FIELD_QUOTE_MAX], long_in[300];

	ASSERT_STR_EQ(ib_field_quote(q, "abc", 3), "'abc'");
	ASSERT_STR_EQ(ib_field_quote(q, "a'b\\c\n", 6), "'a\\'b\\\\c\\x0a'");
	ASSERT_STR_EQ(ib_field_quote(q, "\xc3\xa9", 2), "'\\xc3\\xa9'");
	ASSERT_STR_EQ(ib_field_quote(q, "a\0b", 3), "'a\\x00b'");
	memset(long_in, 'x', sizeof(long_in));
	ib_field_quote(q, long_in, sizeof(long_in));
	ASSERT_TRUE(strlen(q) < IB_FIELD_QUOTE_MAX);
	ASSERT_TRUE(strlen(q) > 60);
	ASSERT_STR_CONTAINS(q, "'...");
	memset(long_in, '\n', sizeof(long_in));
	ib_field_quote(q, long_in, sizeof(long_in));
	ASSERT_TRUE(strlen(q) < IB_FIELD_QUOTE_MAX);
	ASSERT_STR_CONTAINS(q, "\\x0a'...");
}

TEST(messages_are_plain_ascii)
{
	ASSERT_REJECTS(SPEC1("{\"apt_install\":[\"\\u00e9\\u2028x\"]}"), "steps[0].apt_install[0]",
		       "'\\xc3\\xa9\\xe2\\x80\\xa8x'");
	for (const char *p = ib_error_last(); *p; p++)
		ASSERT_TRUE(*p >= 0x20 && *p < 0x7f);
}

/* ---- canonical forms and keys ---- */

TEST(canonical_example)
{
	ib_spec *spec = NULL;
	char *c;

	ASSERT_INT_EQ(parse(&spec, EXAMPLE), 0);
	c = ib_spec_canonical(spec);
	ASSERT_STR_EQ(c, "{\"base\":\"debian_amd64\",\"disk_size\":4294967296,\"python_version\":\"3.12.1\",\"steps\":["
			 "{\"apt_install\":[\"git\",\"curl\"]},"
			 "{\"pip_install\":[\"requests==2.32.3\"]},"
			 "{\"run_commands\":[\"echo hi > /hello.txt\",\"useradd -m app\"]},"
			 "{\"env\":{\"APP_ENV\":\"demo\"}}]}");
	free(c);
	c = ib_step_canonical(&spec->steps[3]);
	ASSERT_STR_EQ(c, "{\"env\":{\"APP_ENV\":\"demo\"}}");
	free(c);
	ib_spec_free(spec);
}

TEST(canonical_ignores_order_space_escapes_and_aliases)
{
	static const char a[] =
		"{\"base\":\"debian_amd64\",\"steps\":[{\"env\":{\"A\":\"1\",\"B\":\"\\u00e9/\"}},"
		"{\"run_commands\":[\"echo \\\"x\\\"\"]}]}";
	static const char b[] =
		"\n{ \"steps\" : [ { \"env\" : { \"B\" : \"\xc3\xa9\\/\" ,\n\t\"A\" : \"\\u0031\" } } ,"
		" { \"run_commands\" : [ \"echo \\u0022x\\\"\" ] } ] ,\r\n \"python_version\" : null ,"
		" \"base\" : \"debian_amd\" }  \n";
	ib_spec *sa = NULL, *sb = NULL;
	char ka[3][IB_SHA256_HEX], kb[3][IB_SHA256_HEX];
	char *ca, *cb;

	ASSERT_INT_EQ(parse(&sa, a), 0);
	ASSERT_INT_EQ(parse(&sb, b), 0);
	ca = ib_spec_canonical(sa);
	cb = ib_spec_canonical(sb);
	ASSERT_STR_EQ(ca, cb);
	ASSERT_STR_EQ(ca, "{\"base\":\"debian_amd64\",\"disk_size\":4294967296,\"python_version\":null,\"steps\":["
			  "{\"env\":{\"A\":\"1\",\"B\":\"\\u00E9/\"}},"
			  "{\"run_commands\":[\"echo \\\"x\\\"\"]}]}");
	free(ca);
	free(cb);
	ASSERT_INT_EQ(chain(ka, 3, sa), 3);
	ASSERT_INT_EQ(chain(kb, 3, sb), 3);
	for (int i = 0; i < 3; i++)
		ASSERT_STR_EQ(ka[i], kb[i]);
	ib_spec_free(sa);
	ib_spec_free(sb);
}

TEST(changing_a_step_changes_it_and_later_keys_only)
{
	static const char a[] = "{" BASE ",\"steps\":[{\"apt_install\":[\"git\"]},"
				"{\"run_commands\":[\"echo one\"]},{\"env\":{\"A\":\"1\"}}]}";
	static const char b[] = "{" BASE ",\"steps\":[{\"apt_install\":[\"git\"]},"
				"{\"run_commands\":[\"echo two\"]},{\"env\":{\"A\":\"1\"}}]}";
	/* List order is meaning (commands run in order), so it counts. */
	static const char c[] = "{" BASE ",\"steps\":[{\"apt_install\":[\"git\"]},"
				"{\"run_commands\":[\"echo one\"]},{\"env\":{\"A\":\"1\"}},"
				"{\"apt_install\":[\"aa\",\"bb\"]}]}";
	static const char d[] = "{" BASE ",\"steps\":[{\"apt_install\":[\"git\"]},"
				"{\"run_commands\":[\"echo one\"]},{\"env\":{\"A\":\"1\"}},"
				"{\"apt_install\":[\"bb\",\"aa\"]}]}";
	ib_spec *sa = NULL, *sb = NULL, *sc = NULL, *sd = NULL;
	char ka[5][IB_SHA256_HEX], kb[5][IB_SHA256_HEX], kc[5][IB_SHA256_HEX], kd[5][IB_SHA256_HEX];
	char ia[IB_SHA256_HEX], ib[IB_SHA256_HEX];

	ASSERT_INT_EQ(parse(&sa, a), 0);
	ASSERT_INT_EQ(parse(&sb, b), 0);
	ASSERT_INT_EQ(parse(&sc, c), 0);
	ASSERT_INT_EQ(parse(&sd, d), 0);
	ASSERT_INT_EQ(chain(ka, 5, sa), 4);
	ASSERT_INT_EQ(chain(kb, 5, sb), 4);
	ASSERT_INT_EQ(chain(kc, 5, sc), 5);
	ASSERT_INT_EQ(chain(kd, 5, sd), 5);
	ASSERT_STR_EQ(ka[0], kb[0]);
	ASSERT_STR_EQ(ka[1], kb[1]);
	ASSERT_TRUE(strcmp(ka[2], kb[2]) != 0);
	ASSERT_TRUE(strcmp(ka[3], kb[3]) != 0);
	ib_key_image(ia, ka[3], IB_DISK_SIZE_DEFAULT);
	ib_key_image(ib, kb[3], IB_DISK_SIZE_DEFAULT);
	ASSERT_TRUE(strcmp(ia, ib) != 0);
	/* Appending a step keeps every earlier key. */
	for (int i = 0; i < 4; i++)
		ASSERT_STR_EQ(ka[i], kc[i]);
	ASSERT_STR_EQ(kc[3], kd[3]);
	ASSERT_TRUE(strcmp(kc[4], kd[4]) != 0);
	/* Another base definition changes everything. */
	{
		char k0[IB_SHA256_HEX];

		ib_key_base(k0, "{\"arch\":\"arm64\",\"name\":\"debian_arm64\",\"suite\":\"bookworm\"}");
		ASSERT_TRUE(strcmp(k0, ka[0]) != 0);
	}
	ib_spec_free(sa);
	ib_spec_free(sb);
	ib_spec_free(sc);
	ib_spec_free(sd);
}

TEST(key_domains_are_separate)
{
	char a[IB_SHA256_HEX], b[IB_SHA256_HEX], c[IB_SHA256_HEX];
	char zero[IB_SHA256_HEX];

	memset(zero, '0', 64);
	zero[64] = '\0';
	ib_key_base(a, zero);
	ib_key_image(b, zero, IB_DISK_SIZE_DEFAULT);
	ib_key_step(c, zero, "");
	ASSERT_TRUE(ib_is_hex64(a));
	ASSERT_TRUE(ib_is_hex64(b));
	ASSERT_TRUE(ib_is_hex64(c));
	ASSERT_TRUE(strcmp(a, b) != 0);
	ASSERT_TRUE(strcmp(a, c) != 0);
	ASSERT_TRUE(strcmp(b, c) != 0);
	/* Field boundaries count: "ab"+"c" is not "a"+"bc". */
	ib_key_step(a, "ab", "c");
	ib_key_step(b, "a", "bc");
	ASSERT_TRUE(strcmp(a, b) != 0);
}

/*
 * Pinned values: if one of these changes, every cached layer and every
 * image id in the field changes with it.  That needs a new version tag in
 * the key construction (spec.h) and a changelog entry, not a new constant
 * here.  They were checked against an independent computation in Python:
 *
 *   H = lambda *f: sha256(b"".join(x.encode() + b"\0" for x in f)).hexdigest()
 *   k0 = H("imagebuilder/layer/v1", "base", BASE_DEF)
 *   k[i+1] = H("imagebuilder/layer/v1", "step", k[i], canonical(step i))
 *   id = H("imagebuilder/image/v2", k4, "4294967296")   (disk_size, the default)
 *
 * with canonical() = json.dumps(..., separators=(",", ":"), sort_keys=True),
 * which agrees with jansson's form for this ASCII-only spec.
 */
TEST(golden_ids)
{
	static const char *const want[] = {
		"6a33e891899aa1b81823c1c946df83f31324dbe9dd341474e37fd7be82c236fb",
		"ccb448df80f4ab6611172dcedf0648156a8a2294a3b3b6f214e84bc10d964d24",
		"3aa3b4525ec61f220e873696a745931ed0788e652c0ae393dce3e526367dc425",
		"eaa57fbc280c141897e326baa2eb170e33a9a10148fb408a36662641d5be1c02",
		"d7bf4fdd2e541cb90099a2a62aeb52bde344b351f8a8cd49b04157da591d1315",
	};
	ib_spec *spec = NULL;
	char keys[5][IB_SHA256_HEX], id[IB_SHA256_HEX];

	ASSERT_INT_EQ(parse(&spec, EXAMPLE), 0);
	ASSERT_INT_EQ(chain(keys, 5, spec), 5);
	for (int i = 0; i < 5; i++)
		ASSERT_STR_EQ(keys[i], want[i]);
	ib_key_image(id, keys[4], IB_DISK_SIZE_DEFAULT);
	ASSERT_STR_EQ(id, "dcfa2d53e12ff044b669d96493aef7727130468ae804e4fd28e4ddcda5bb5476");
	/* disk_size is part of the id, never of a layer key */
	ib_key_image(id, keys[4], 1ULL << 30);
	ASSERT_STR_EQ(id, "772e5125751139ae77634515c7341d27e104e1ddc53050fd65861b0940b225d5");
	ib_spec_free(spec);
}

/*
 * The real plan: the shipped base definition and python table, the
 * default epoch, and ib_plan_make(), which the builder runs.  Golden ids
 * from an independent implementation (Python, as above, with
 * canonical(base) + "\nsource_date_epoch=1686355200" as the base's form and
 * {"python": {"packages": ["cloudpickle"], "release", "sha256", "version"}}
 * as the python layer's); the second spec is t0750's, whose v1 id
 * (f429f3cb...) is the one a real build of it printed before the code moved
 * into spec/, and whose v2 id covers the default disk_size.
 */
static ib_plan *real_plan(const char *json, ib_spec **spec, ib_basedef **def, ib_python_pin *pin)
{
	char *text = NULL, *table = NULL;
	size_t len = 0, tlen = 0;
	ib_plan *plan = NULL;

	if (parse(spec, json) < 0 || ib_read_file(&text, &len, "base-images/debian_amd64.json", 1 << 20) < 0 ||
	    ib_basedef_parse(def, "debian_amd64", text, len, "debian_amd64.json") < 0)
		goto out;
	if ((*spec)->python_version &&
	    (ib_read_file(&table, &tlen, "base-images/python-versions.json", 1 << 20) < 0 ||
	     ib_pytable_lookup(pin, table, tlen, "python-versions.json", (*spec)->python_version, "x86_64", NULL) < 0))
		goto out;
	if (ib_plan_make(&plan, *spec, *def, (*spec)->python_version ? pin : NULL, IB_DEFAULT_EPOCH) < 0)
		plan = NULL;
out:
	free(text);
	free(table);
	return plan;
}

TEST(golden_ids_of_the_real_plan)
{
	static const char *const want[] = {
		"d05965025c1d28c440fbc4de4549548f48ca30de3378f97506bc3fff9aa3a36c",
		"4a33055170320537c0824e77ea2cb32699485c0251c376ae3861603889f13d35",
		"db30bdf07d6e03be5f65f715f0aa43e80c1bcfd0a017a63e363f030519f2db18",
		"2975ed01aca90e995cf38f7b5bbd777ab927bc61847af405d85076a91fcdac20",
		"826db0782efbe2c7df08ae43e87a69195b6456864dc453bd8c86718dd261a077",
		"de80317898646ccfcbddb5fd8a4f7cab1dd3ae53d0b14ce9bdf8ddec6723639e",
	};
	static const char *const kinds[] = { "base", "python", "apt_install", "pip_install", "run_commands", "env" };
	ib_spec *spec = NULL;
	ib_basedef *def = NULL;
	ib_python_pin pin = { 0 };
	ib_plan *plan = real_plan(EXAMPLE, &spec, &def, &pin);
	json_t *env;

	ASSERT_TRUE(plan != NULL);
	ASSERT_INT_EQ(plan->nlayers, 6);
	for (size_t i = 0; i < plan->nlayers; i++) {
		ASSERT_STR_EQ(plan->layers[i].key, want[i]);
		ASSERT_STR_EQ(plan->layers[i].kind, kinds[i]);
	}
	ASSERT_STR_EQ(plan->image_id, "7463b0c9d8cb091b5386b733e706b9716dbdfe4b913b281ea06710cbc07b1e86");
	ASSERT_STR_EQ(plan->arch, "amd64");
	ASSERT_STR_EQ(plan->machine, "x86_64");
	ASSERT_STR_CONTAINS(plan->python->url, "/cpython-3.12.1+");
	ASSERT_STR_EQ(json_string_value(json_object_get(plan->env, "APP_ENV")), "demo");
	/* the env a step runs with: env steps below it only */
	env = ib_plan_env_below(plan, 5);
	ASSERT_INT_EQ(json_object_size(env), 0);
	json_decref(env);
	env = ib_plan_env_below(plan, 6);
	ASSERT_INT_EQ(json_object_size(env), 1);
	json_decref(env);
	ib_plan_free(plan);
	ib_spec_free(spec);
	ib_basedef_free(def);
	ib_python_pin_clear(&pin);

	spec = NULL;
	def = NULL;
	plan = real_plan("{\"base\": \"debian_amd64\", \"steps\": [{\"apt_install\": [\"curl\"]}, "
			 "{\"env\": {\"REPRO\": \"yes\"}}, {\"run_commands\": [\"useradd -m repro\", "
			 "\"echo built > /built.txt\", \"python3 -c pass 2>/dev/null || true\"]}]}",
			 &spec, &def, &pin);
	ASSERT_TRUE(plan != NULL);
	ASSERT_STR_EQ(plan->layers[0].key, want[0]);
	ASSERT_STR_EQ(plan->image_id, "f94e80e676975f0d1de771b5527f395048c080cbe889c177337079787032224d");
	ib_plan_free(plan);
	ib_spec_free(spec);
	ib_basedef_free(def);
}

TEST(plan_refuses_a_missing_pin_and_another_base)
{
	ib_spec *spec = NULL;
	ib_basedef *def = NULL;
	ib_plan *plan = NULL;
	const char *arm = "{\"name\": \"debian_arm64\", \"suite\": \"bookworm\", \"architecture\": \"arm64\", "
			  "\"machine\": \"aarch64\", \"variant\": \"minbase\"}";

	ASSERT_INT_EQ(parse(&spec, EXAMPLE), 0);
	ASSERT_INT_EQ(ib_basedef_parse(&def, "debian_arm64", arm, strlen(arm), "x"), 0);
	ASSERT_TRUE(ib_plan_make(&plan, spec, def, NULL, 0) < 0); /* pins python, no pin given */
	ASSERT_TRUE(plan == NULL);
	ib_spec_free(spec);
	ASSERT_INT_EQ(parse(&spec, "{\"base\": \"debian_amd64\"}"), 0);
	ASSERT_TRUE(ib_plan_make(&plan, spec, def, NULL, 0) < 0); /* another base */
	ASSERT_STR_CONTAINS(ib_error_last(), "debian_arm64");
	/* a definition that names another base is refused */
	{
		ib_basedef *other = NULL;
		ASSERT_TRUE(ib_basedef_parse(&other, "debian_amd64", arm, strlen(arm), "x") < 0);
		ASSERT_TRUE(other == NULL);
	}
	ib_spec_free(spec);
	ib_basedef_free(def);
}

/* ---- plans ---- */

static const ib_step_ctx ctx_default = { .arch = "amd64", .python = "python3" };

/* Plan for the first step of json; returns the ib_step_ops plan() result. */
static int plan_of(ib_step_plan *plan, const char *json, const ib_step_ctx *ctx)
{
	ib_spec *spec = NULL;
	int r = parse(&spec, json);

	if (r == 0)
		r = spec->steps[0].ops->plan(plan, spec->steps[0].arg, ctx);
	ib_spec_free(spec);
	return r;
}

static char *join(const ib_strv *sv)
{
	ib_buf b = IB_BUF_INIT;

	for (size_t i = 0; i < sv->n; i++)
		ib_buf_printf(&b, "%s[%s]", i ? " " : "", sv->v[i]);
	return ib_buf_detach(&b);
}

#define ASSERT_ARGV(sv, expected)               \
	do {                                    \
		char *j_ = join(sv);            \
		int ok_ = !strcmp(j_, expected); \
		if (!ok_) {                     \
			fprintf(stderr, "argv: %s\n", j_); \
			free(j_);               \
			IB_FAIL_("argv is not %s", expected); \
		}                               \
		free(j_);                       \
	} while (0)

TEST(apt_plan)
{
	ib_step_plan plan = IB_STEP_PLAN_INIT;

	ASSERT_INT_EQ(plan_of(&plan, SPEC1("{\"apt_install\":[\"git\",\"curl=7.88.1-10+deb12u5\",\"libc6:arm64\"]}"),
			      &ctx_default), 0);
	ASSERT_INT_EQ(plan.ncmds, 2);
	ASSERT_ARGV(&plan.cmds[0], "[apt-get] [update] [-o] [Acquire::Languages=none] "
				   "[-o] [Dir::Cache::pkgcache=] [-o] [Dir::Cache::srcpkgcache=]");
	ASSERT_ARGV(&plan.cmds[1],
		    "[apt-get] [install] [-y] [--no-install-recommends] "
		    "[-o] [Dir::Cache::pkgcache=] [-o] [Dir::Cache::srcpkgcache=] "
		    "[-o] [Dpkg::Options::=--force-confdef] [-o] [Dpkg::Options::=--force-confold] "
		    "[-o] [Dpkg::Options::=--force-unsafe-io] [--] [git] [curl=7.88.1-10+deb12u5] [libc6:arm64]");
	ASSERT_TRUE(plan.cmds[1].v[plan.cmds[1].n] == NULL);
	ASSERT_TRUE(plan.flags & IB_PLAN_APT_CACHE);
	ASSERT_ARGV(&plan.env, "[DEBIAN_FRONTEND=noninteractive]");
	ib_step_plan_free(&plan);
	ASSERT_INT_EQ(plan.ncmds, 0);
	ASSERT_TRUE(plan.cmds == NULL);
	ib_step_plan_free(NULL);

	/* lists this build just fetched: no update, the same install */
	ib_step_ctx fresh = ctx_default;
	fresh.apt_lists_fresh = true;
	ASSERT_INT_EQ(plan_of(&plan, SPEC1("{\"apt_install\":[\"git\"]}"), &fresh), 0);
	ASSERT_INT_EQ(plan.ncmds, 1);
	ASSERT_ARGV(&plan.cmds[0],
		    "[apt-get] [install] [-y] [--no-install-recommends] "
		    "[-o] [Dir::Cache::pkgcache=] [-o] [Dir::Cache::srcpkgcache=] "
		    "[-o] [Dpkg::Options::=--force-confdef] [-o] [Dpkg::Options::=--force-confold] "
		    "[-o] [Dpkg::Options::=--force-unsafe-io] [--] [git]");
	ASSERT_TRUE(plan.flags & IB_PLAN_APT_CACHE);
	ib_step_plan_free(&plan);
}

TEST(pip_plan)
{
	ib_step_plan plan = IB_STEP_PLAN_INIT;
	ib_step_ctx ctx = { .arch = "arm64", .pip_index_url = "http://127.0.0.1:8080/simple/", .python = "python3" };

	ASSERT_INT_EQ(plan_of(&plan, SPEC1("{\"pip_install\":[\"requests==2.32.3\",\"foo [x] >= 1 ; python_version > '3'\"]}"),
			      &ctx), 0);
	ASSERT_INT_EQ(plan.ncmds, 2);
	ASSERT_ARGV(&plan.cmds[0],
		    "[/bin/sh] [-c] [python3 -m pip --version >/dev/null 2>&1 || "
		    "{ apt-get update -o Acquire::Languages=none -o Dir::Cache::pkgcache= "
		    "-o Dir::Cache::srcpkgcache= && apt-get install -y --no-install-recommends "
		    "-o Dir::Cache::pkgcache= -o Dir::Cache::srcpkgcache= "
		    "-o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "
		    "-o Dpkg::Options::=--force-unsafe-io python3-pip; }]");
	ASSERT_ARGV(&plan.cmds[1],
		    "[python3] [-m] [pip] [install] [--no-cache-dir] [--disable-pip-version-check] "
		    "[--no-input] [--index-url] [http://127.0.0.1:8080/simple/] "
		    "[--trusted-host] [127.0.0.1:8080] "
		    "[--] [requests==2.32.3] [foo [x] >= 1 ; python_version > '3']");
	ASSERT_TRUE(plan.flags & IB_PLAN_APT_CACHE);
	ASSERT_ARGV(&plan.env, "[DEBIAN_FRONTEND=noninteractive] [PIP_BREAK_SYSTEM_PACKAGES=1] "
			       "[PIP_ROOT_USER_ACTION=ignore]");
	ib_step_plan_free(&plan);

	/* https: no --trusted-host; user info is not part of the host. */
	ctx.pip_index_url = "https://user:pw@pypi.example.com:8443/simple";
	ctx.python = "/usr/local/bin/python3";
	ASSERT_INT_EQ(plan_of(&plan, SPEC1("{\"pip_install\":[\"requests\"]}"), &ctx), 0);
	ASSERT_ARGV(&plan.cmds[1],
		    "[/usr/local/bin/python3] [-m] [pip] [install] [--no-cache-dir] "
		    "[--disable-pip-version-check] [--no-input] "
		    "[--index-url] [https://user:pw@pypi.example.com:8443/simple] [--] [requests]");
	ASSERT_STR_CONTAINS(plan.cmds[0].v[2], "/usr/local/bin/python3 -m pip --version");
	ib_step_plan_free(&plan);

	/* lists this build just fetched: python3-pip comes without an update */
	ctx.apt_lists_fresh = true;
	ASSERT_INT_EQ(plan_of(&plan, SPEC1("{\"pip_install\":[\"requests\"]}"), &ctx), 0);
	ASSERT_STR_CONTAINS(plan.cmds[0].v[2], "|| { apt-get install -y --no-install-recommends ");
	ASSERT_TRUE(strstr(plan.cmds[0].v[2], "apt-get update") == NULL);
	ib_step_plan_free(&plan);
	ctx.apt_lists_fresh = false;

	ctx.pip_index_url = "http://user@mirror.local/simple";
	ASSERT_INT_EQ(plan_of(&plan, SPEC1("{\"pip_install\":[\"requests\"]}"), &ctx), 0);
	ASSERT_STR_EQ(plan.cmds[1].v[10], "mirror.local");
	ib_step_plan_free(&plan);

	/* No index: pip's own default. */
	ASSERT_INT_EQ(plan_of(&plan, SPEC1("{\"pip_install\":[\"requests\"]}"), &ctx_default), 0);
	ASSERT_ARGV(&plan.cmds[1],
		    "[python3] [-m] [pip] [install] [--no-cache-dir] [--disable-pip-version-check] "
		    "[--no-input] [--] [requests]");
	ib_step_plan_free(&plan);
}

TEST(pip_plan_refuses_bad_context)
{
	static const char *const bad_python[] = { "python3; rm -rf /", "", "-c", "py thon", "$(x)" };
	static const char *const bad_url[] = { "ftp://x/simple", "http://", "http:///simple",
					       "https://x/a b", "file:///srv/simple", "x" };
	ib_step_plan plan = IB_STEP_PLAN_INIT;
	ib_step_ctx ctx = { .arch = "amd64" };

	for (size_t i = 0; i < sizeof(bad_python) / sizeof(bad_python[0]); i++) {
		ctx.python = bad_python[i];
		ASSERT_INT_EQ(plan_of(&plan, SPEC1("{\"pip_install\":[\"requests\"]}"), &ctx), IB_ERROR);
		ASSERT_STR_CONTAINS(ib_error_last(), "is not a plain path");
		ASSERT_INT_EQ(plan.ncmds, 0);
		ASSERT_INT_EQ(plan.env.n, 0);
	}
	ctx.python = "python3";
	for (size_t i = 0; i < sizeof(bad_url) / sizeof(bad_url[0]); i++) {
		ctx.pip_index_url = bad_url[i];
		ASSERT_INT_EQ(plan_of(&plan, SPEC1("{\"pip_install\":[\"requests\"]}"), &ctx), IB_ERROR);
		ASSERT_STR_CONTAINS(ib_error_last(), "pip index url");
		ASSERT_INT_EQ(plan.ncmds, 0);
	}
}

TEST(run_commands_plan)
{
	ib_step_plan plan = IB_STEP_PLAN_INIT;

	ASSERT_INT_EQ(plan_of(&plan, SPEC1("{\"run_commands\":[\"echo hi > /hello.txt\",\"useradd -m app\"]}"),
			      &ctx_default), 0);
	ASSERT_INT_EQ(plan.ncmds, 2);
	ASSERT_ARGV(&plan.cmds[0], "[/bin/sh] [-c] [echo hi > /hello.txt]");
	ASSERT_ARGV(&plan.cmds[1], "[/bin/sh] [-c] [useradd -m app]");
	ASSERT_INT_EQ(plan.flags, 0);
	ASSERT_INT_EQ(plan.env.n, 0);
	ib_step_plan_free(&plan);
}

TEST(env_plan_is_empty)
{
	ib_step_plan plan = IB_STEP_PLAN_INIT;

	ASSERT_INT_EQ(plan_of(&plan, SPEC1("{\"env\":{\"A\":\"1\"}}"), &ctx_default), 0);
	ASSERT_INT_EQ(plan.ncmds, 0);
	ASSERT_INT_EQ(plan.flags, 0);
	ASSERT_INT_EQ(plan.env.n, 0);
	ib_step_plan_free(&plan);
}

RUN_TESTS()

#ifndef IB_TEST_H
#define IB_TEST_H

/*
 * A tiny unit-test harness: TEST(name) defines a test, ASSERT_* report
 * file:line and fail the current test, RUN_TESTS() runs them all and prints
 * one line per test plus a summary the suite runner reads.
 */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef void (*ib_test_fn)(int *failed);

struct ib_test {
	const char *name;
	ib_test_fn fn;
};

#define IB_MAX_TESTS 256
static struct ib_test ib_tests[IB_MAX_TESTS];
static int ib_ntests;

#define TEST(name)                                                            \
	static void test_##name(int *ib_failed_);                             \
	__attribute__((constructor)) static void register_##name(void)        \
	{                                                                     \
		if (ib_ntests < IB_MAX_TESTS)                                 \
			ib_tests[ib_ntests++] = (struct ib_test){ #name, test_##name }; \
	}                                                                     \
	static void test_##name(int *ib_failed_)

#define IB_FAIL_(...)                                                         \
	do {                                                                  \
		fprintf(stderr, "%s:%d: ", __FILE__, __LINE__);               \
		fprintf(stderr, __VA_ARGS__);                                 \
		fputc('\n', stderr);                                          \
		*ib_failed_ = 1;                                              \
		return;                                                       \
	} while (0)

#define ASSERT_TRUE(c)                                                        \
	do {                                                                  \
		if (!(c))                                                     \
			IB_FAIL_("assertion failed: %s", #c);                 \
	} while (0)

#define ASSERT_INT_EQ(a, b)                                                   \
	do {                                                                  \
		long long a_ = (long long)(a), b_ = (long long)(b);           \
		if (a_ != b_)                                                 \
			IB_FAIL_("%s == %lld, expected %s == %lld", #a, a_, #b, b_); \
	} while (0)

#define ASSERT_STR_EQ(a, b)                                                   \
	do {                                                                  \
		const char *a_ = (a), *b_ = (b);                              \
		if (!a_ || !b_ || strcmp(a_, b_))                             \
			IB_FAIL_("%s == \"%s\", expected \"%s\"", #a,          \
				 a_ ? a_ : "(null)", b_ ? b_ : "(null)");      \
	} while (0)

#define ASSERT_STR_CONTAINS(hay, needle)                                      \
	do {                                                                  \
		const char *h_ = (hay), *n_ = (needle);                       \
		if (!h_ || !strstr(h_, n_))                                   \
			IB_FAIL_("%s == \"%s\" does not contain \"%s\"", #hay, \
				 h_ ? h_ : "(null)", n_);                     \
	} while (0)

#define RUN_TESTS()                                                           \
	int main(int argc, char **argv)                                       \
	{                                                                     \
		int passed = 0, failed = 0;                                   \
		for (int i = 0; i < ib_ntests; i++) {                         \
			int f = 0;                                            \
			if (argc > 1 && strcmp(argv[1], ib_tests[i].name))    \
				continue;                                     \
			ib_tests[i].fn(&f);                                   \
			printf("%s %s\n", f ? "FAIL" : "ok  ", ib_tests[i].name); \
			f ? failed++ : passed++;                              \
		}                                                             \
		printf("unit: %d passed, %d failed\n", passed, failed);       \
		return failed ? 1 : 0;                                        \
	}

#endif

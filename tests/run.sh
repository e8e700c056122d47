#!/bin/sh
# Run every test: unit programs (build/tests/test-*), then integration
# scripts (tests/integration/t*.sh).  Ends with one line:
#   N passed, N failed[, N skipped]
# An integration script passes with exit 0, is skipped with exit 77 (it
# prints why), and fails otherwise.  TESTS=pattern runs only matching ones.
BUILD=${1:-build}
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top" || exit 1
# For sanitized builds: leaks inside Debian's libraries are not ours to fix.
export LSAN_OPTIONS="suppressions=$top/tests/lsan.supp:print_suppressions=0${LSAN_OPTIONS:+:$LSAN_OPTIONS}"
passed=0 failed=0 skipped=0
failures=""

for t in "$BUILD"/tests/test-*; do
	[ -x "$t" ] || continue
	case "$(basename "$t")" in ${TESTS:-*}) ;; *) continue ;; esac
	out=$("$t" 2>&1)
	rc=$?
	printf '%s\n' "$out" | grep -v '^ok  ' | grep -v '^unit: '
	p=$(printf '%s\n' "$out" | sed -n 's/^unit: \([0-9]*\) passed, \([0-9]*\) failed$/\1/p')
	f=$(printf '%s\n' "$out" | sed -n 's/^unit: \([0-9]*\) passed, \([0-9]*\) failed$/\2/p')
	if [ -z "$p" ]; then
		echo "FAIL $(basename "$t") (crashed, exit $rc)"
		failed=$((failed + 1))
		failures="$failures $(basename "$t")"
		continue
	fi
	if [ "$rc" != 0 ] && [ "$f" = 0 ]; then f=1; fi
	echo "unit $(basename "$t"): $p passed, $f failed"
	passed=$((passed + p))
	failed=$((failed + f))
	[ "$f" = 0 ] || failures="$failures $(basename "$t")"
done

export IB="$top/$BUILD/imagebuilder"
export IB_TEST_BUILD="$top/$BUILD"
for t in tests/integration/t*.sh; do
	[ -f "$t" ] || continue
	name=$(basename "$t" .sh)
	case "$name" in ${TESTS:-*}) ;; *) continue ;; esac
	echo "== $name"
	start=$(date +%s)
	sh "$t"
	rc=$?
	secs=$(( $(date +%s) - start ))
	if [ "$rc" = 0 ]; then
		echo "ok   $name (${secs}s)"
		passed=$((passed + 1))
	elif [ "$rc" = 77 ]; then
		echo "skip $name"
		skipped=$((skipped + 1))
	else
		echo "FAIL $name (exit $rc, ${secs}s)"
		failed=$((failed + 1))
		failures="$failures $name"
	fi
done

[ -n "$failures" ] && echo "failed:$failures"
if [ "$skipped" -gt 0 ]; then
	echo "$passed passed, $failed failed, $skipped skipped"
else
	echo "$passed passed, $failed failed"
fi
[ "$failed" = 0 ]

# Bad specs and bad usage: exit 2, a message naming the field, nothing run,
# no cache touched.
. "$(dirname "$0")/lib.sh"
C="$T/cache"

# bad NAME FIELD JSON: the spec must be refused with exit 2 naming FIELD
bad() {
	name=$1 field=$2
	printf '%s' "$3" > "$T/$name.json"
	"$IB" build --cache-dir "$C" "$T/$name.json" >"$T/out" 2>"$T/err"
	rc=$?
	[ "$rc" = 2 ] || fail "$name: exit $rc, expected 2 ($(cat "$T/err"))"
	grep -qF -- "$field" "$T/err" || fail "$name: message does not name '$field': $(cat "$T/err")"
	[ ! -s "$T/out" ] || fail "$name: printed on stdout: $(cat "$T/out")"
}

bad not-json 'spec' '{"base": '
bad not-object 'spec' '["debian_amd64"]'
bad unknown-key 'stepz' '{"base":"debian_amd64","stepz":[]}'
bad no-base 'base' '{"steps":[]}'
bad base-type 'base' '{"base":7}'
bad unknown-base 'ubuntu' '{"base":"ubuntu"}'
bad steps-type 'steps' '{"base":"debian_amd64","steps":{}}'
bad two-keys 'steps[0]' '{"base":"debian_amd64","steps":[{"apt_install":["curl"],"env":{"A":"b"}}]}'
bad unknown-kind 'yum_install' '{"base":"debian_amd64","steps":[{"yum_install":["curl"]}]}'
bad empty-apt 'steps[0].apt_install' '{"base":"debian_amd64","steps":[{"apt_install":[]}]}'
bad shell-in-apt 'steps[0].apt_install[1]' '{"base":"debian_amd64","steps":[{"apt_install":["curl","curl;touch /pwned"]}]}'
bad option-in-apt 'steps[0].apt_install[0]' '{"base":"debian_amd64","steps":[{"apt_install":["-oAPT::x=y"]}]}'
bad option-in-pip 'steps[1].pip_install[0]' '{"base":"debian_amd64","steps":[{"env":{"A":"b"}},{"pip_install":["--index-url=http://evil/"]}]}'
bad empty-pip 'steps[0].pip_install' '{"base":"debian_amd64","steps":[{"pip_install":[]}]}'
bad run-type 'steps[0].run_commands' '{"base":"debian_amd64","steps":[{"run_commands":"echo hi"}]}'
bad env-name 'steps[0].env' '{"base":"debian_amd64","steps":[{"env":{"1BAD":"x"}}]}'
bad env-value 'steps[0].env' '{"base":"debian_amd64","steps":[{"env":{"GOOD":5}}]}'
bad python-version 'python_version' '{"base":"debian_amd64","python_version":"3.12"}'
bad nul-escape 'steps[0].run_commands[0]' '{"base":"debian_amd64","steps":[{"run_commands":["echo \u0000"]}]}'
ok "every bad spec refused with exit 2 and the field named"

printf '{"base":"debian_amd64\0"}' > "$T/nul.json"
expect_status 2 "$IB" build --cache-dir "$C" "$T/nul.json" 2>/dev/null
$PY -c "import json; print(json.dumps({'base':'debian_amd64','steps':[{'run_commands':['x'*100]}]*20000}))" > "$T/big.json"
expect_status 2 "$IB" build --cache-dir "$C" "$T/big.json" 2>"$T/err"
ok "NUL byte and over-long input refused"

expect_status 2 "$IB" 2>/dev/null
expect_status 2 "$IB" frobnicate 2>/dev/null
expect_status 2 "$IB" build 2>/dev/null
expect_status 2 "$IB" build --timeout abc "$T/nul.json" 2>/dev/null
expect_status 2 "$IB" export --cache-dir "$C" 2>/dev/null
expect_status 2 "$IB" build --cache-dir "$C" "$T/does-not-exist.json" 2>/dev/null
ok "bad usage exits 2"

[ ! -e "$C" ] || fail "a refused spec touched the cache dir: $(ls -R "$C" | head)"
ok "no cache dir was created: nothing ran"

# Attacks on the builder and the host from a step (harmless probes; each
# prints "probe NAME=RESULT" into the build log):
#   loopback   a server on the host's 127.0.0.1 cannot be reached
#   linklocal  169.254.169.254 (cloud metadata) is unreachable by the step's
#              own policy rules: the connect fails at once, nothing is sent
#   environ    the builder's environment (a secret in it) is not inside:
#              not in PID 1's, nor in any process's
#   memory     PID 1's memory, file descriptors and executable cannot be read
#   stdout     writing to PID 1's fds cannot put lines where the CLI prints
#              the image id
#   status     a forged "success" written to PID 1's pipes does not turn a
#              failing step (exit 7) into a cached layer
. "$(dirname "$0")/lib.sh"
C="$SHARED_CACHE"
mkdir -p "$T/www"
echo "host-only-$$" > "$T/www/secret.txt"
start_static "$T/www"
port=${STATIC_URL##*:}

# 1. what a step can see: the results go into the image, /probe.txt
cat > "$T/probe.sh" <<PROBE
set +e
{
echo "probe start nonce=$$"
if timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/$port && printf "GET /secret.txt HTTP/1.0\r\n\r\n" >&3 && cat <&3' 2>/dev/null | grep -q host-only; then
	echo probe loopback=reached
else
	echo probe loopback=closed
fi
# link-local (cloud metadata): refused by the step's own routing, so no packet leaves (no traffic
# but loopback: an unreachable destination fails the connect locally, at once)
perl -MSocket -e 'alarm 5; socket(my \$s, PF_INET, SOCK_STREAM, 0) or die;
	if (connect(\$s, sockaddr_in(80, inet_aton("169.254.169.254")))) { print "probe linklocal=connected\n" }
	else { printf "probe linklocal=%s\n", (\$!{ENETUNREACH} || \$!{EHOSTUNREACH}) ? "unreachable" : "errno-" . (\$! + 0) }'
found=none
for f in /proc/[0-9]*/environ; do
	if tr '\0' '\n' < "\$f" 2>/dev/null | grep -q IB_T1310_SECRET; then found="\$f"; fi
done
echo "probe environ=\$found"
what=""
[ "\$(dd if=/proc/1/mem bs=1 count=1 skip=4096 2>/dev/null | wc -c)" = 1 ] && what="\${what}mem,"
head -c 1 /proc/1/environ 2>/dev/null | grep -q . && what="\${what}environ,"
readlink /proc/1/fd/1 >/dev/null 2>&1 && what="\${what}fd,"
head -c 4 /proc/1/exe 2>/dev/null | grep -q ELF && what="\${what}exe,"
echo "probe memory=\${what:-denied}"
} > /probe.txt
cat /probe.txt
PROBE
script_spec "$T/probe.sh" > "$T/spec.json"
IB_T1310_SECRET="builder-secret-$$" "$IB" build --cache-dir "$C" -o "$T/probe.ext4" "$T/spec.json" >"$T/out" \
	2>"$T/build.log" || fail "the probe build failed: $(tail -5 "$T/build.log")"
img_cat "$T/probe.ext4" /probe.txt > "$T/probe.txt"
probe() { sed -n "s/^probe $1=\([^ ]*\).*$/\1/p" "$T/probe.txt" | tail -1; }
grep -q "probe start nonce=$$" "$T/probe.txt" || fail "the probe did not run: $(cat "$T/probe.txt")"
bad=""
[ "$(probe loopback)" = closed ] || bad="$bad loopback=$(probe loopback)"
[ "$(probe linklocal)" = unreachable ] || bad="$bad linklocal=$(probe linklocal)"
[ "$(probe environ)" = none ] || bad="$bad environ=$(probe environ)"
[ "$(probe memory)" = denied ] || bad="$bad memory=$(probe memory)"

# 2. writing into PID 1's fds: onto the CLI's stdout, and a forged success
cat > "$T/forge.sh" <<PROBE
for fd in /proc/1/fd/*; do
	case "\$(readlink "\$fd" 2>/dev/null)" in pipe:*) ;; *) echo "INJECTED-$$" > "\$fd" 2>/dev/null ;; esac
done
# the builder's status record: { int setup_failed; int cmd; int wstatus; char msg[1024]; }, cmd -1
for fd in /proc/1/fd/*; do
	case "\$(readlink "\$fd" 2>/dev/null)" in pipe:*)
		perl -e 'print pack("iii", 0, -1, 0), "\0" x 1024' > "\$fd" 2>/dev/null ;;
	esac
done
echo forge-done-$$
exit 7
PROBE
script_spec "$T/forge.sh" > "$T/forge.json"
"$IB" build --cache-dir "$C" "$T/forge.json" >"$T/out" 2>"$T/forge.log"
rc=$?
# the step fails: nothing at all belongs on stdout
if [ -s "$T/out" ]; then bad="$bad stdout=written($(tr '\n' ' ' < "$T/out"))"; fi
[ "$rc" = 1 ] || bad="$bad status=forged(exit $rc, stdout '$(tr '\n' ' ' < "$T/out")')"
[ -z "$bad" ] || fail "attacks that worked:$bad"
grep -q "exited with status 7" "$T/forge.log" || fail "the failure does not name exit status 7: $(tail -3 "$T/forge.log")"
cache_sound "$C"
ok "host loopback closed; the builder's environment, PID 1's memory, fds and executable out of reach;" \
	"nothing written to PID 1's fds reached stdout; a forged status left the step failed (exit 7), nothing cached"

# Poisoning the apt state builds share: a step installs an apt hook, and its
# apt_install runs it.  Nothing it writes reaches the shared package lists
# or archives (CACHE/apt/<arch>/), and a later build of another spec sees
# none of it.
. "$(dirname "$0")/lib.sh"
C="$SHARED_CACHE"
n="t1340-$$"
cat > "$T/poison.json" <<JSON
{"base": "debian_amd64", "steps": [
  {"run_commands": ["echo 'APT::Update::Post-Invoke { \"touch /var/lib/apt/lists/$n /var/cache/apt/$n; mkdir -p /var/cache/apt/archives && echo poisoned > /var/cache/apt/archives/$n.deb\"; };' > /etc/apt/apt.conf.d/99-$n"]},
  {"apt_install": ["hello"]}
]}
JSON
"$IB" build --cache-dir "$C" "$T/poison.json" >/dev/null 2>"$T/poison.log" || fail "the poisoning build failed: $(tail -3 "$T/poison.log")"
grep -q "$n" "$T/poison.log" && true
found=$(find "$C/apt" -name "$n*" 2>/dev/null | tr '\n' ' ')
cat > "$T/victim.json" <<JSON
{"base": "debian_amd64", "steps": [{"apt_install": ["hello"]}, {"run_commands": ["ls /var/lib/apt/lists /var/cache/apt /var/cache/apt/archives 2>/dev/null | grep -c $n > /seen || true; echo $$"]}]}
JSON
"$IB" build --cache-dir "$C" -o "$T/victim.ext4" "$T/victim.json" >/dev/null 2>"$T/victim.log" ||
	fail "the victim build failed: $(tail -3 "$T/victim.log")"
bad=""
[ -z "$found" ] || bad="$bad shared-state=$found"
[ "$(img_cat "$T/victim.ext4" /seen)" = 0 ] || bad="$bad victim-saw=$(img_cat "$T/victim.ext4" /seen)"
[ -z "$bad" ] || fail "attacks that worked:$bad"
ok "a tenant's apt hook wrote nothing to the shared lists or archives; another build saw nothing of it"

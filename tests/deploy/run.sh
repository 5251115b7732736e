#!/usr/bin/env bash
# Validate deploy/, the Dockerfile and the image content.
#
#   bash tests/deploy/run.sh            # skips what this machine cannot run, with a reason
#   NODEDNS_REQUIRE_ALL=1 bash tests/deploy/run.sh   # every skip counts as a failure
#
# Installs what it needs: Python tools in a virtualenv (kubectl with its real
# kustomize, kubernetes-validate, checkov, prometheus-operator models, a
# Prometheus text parser, dnspython, pytest) and, as root through apt, iptables,
# nftables, dig and promtool. Sends no traffic off the machine: the linters run
# with --skip-download and, where unshare allows, in an empty network namespace;
# the DNS test uses loopback only.
# Closing line: "N passed, N failed, N skipped". Exit status 0 only if none failed.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
venv=${NODEDNS_DEPLOY_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/nodedns-deploy-venv}

say() { printf '[deploy] %s\n' "$*" >&2; }

# Debian tools. Missing ones only make their tests skip (or fail under
# NODEDNS_REQUIRE_ALL=1), so an install failure is reported, not fatal.
need_apt=()
command -v iptables-legacy >/dev/null || need_apt+=(iptables)
command -v nft >/dev/null || need_apt+=(nftables)
command -v dig >/dev/null || need_apt+=(bind9-dnsutils)
command -v promtool >/dev/null || need_apt+=(prometheus)
if ((${#need_apt[@]})); then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "apt-get install ${need_apt[*]}"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
            --no-install-recommends "${need_apt[@]}"; } >/dev/null 2>&1 \
            || say "apt-get install failed; the tests that need ${need_apt[*]} will skip"
    else
        say "not root: not installing ${need_apt[*]}"
    fi
fi

# Python tools, pinned so a registry update cannot change a verdict silently.
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" || { say "cannot create $venv"; echo "0 passed, 1 failed"; exit 1; }
fi
say "pip install into $venv"
if ! "$venv/bin/pip" install -q --disable-pip-version-check \
        -r "$here/requirements.txt" >"$venv/pip.log" 2>&1; then
    tail -n 20 "$venv/pip.log" >&2
    echo "0 passed, 1 failed"
    exit 1
fi

export PATH="$venv/bin:$PATH"
export NODEDNS_REPO="$repo"
# cloudcoil ships a pytest plugin (for its own cluster tests) we do not want.
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
junit=$(mktemp /tmp/nodedns-deploy-junit.XXXXXX.xml)
cd "$repo" || exit 1
python -m pytest -q -p no:cacheprovider -rs --junitxml="$junit" "$here" "$@"
status=$?

# The closing line, counted from the JUnit report.
line=$(python - "$junit" <<'PY'
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except Exception:
    print("0 passed, 1 failed")
    sys.exit()
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
tests = sum(int(s.get("tests", 0)) for s in suites)
failed = sum(int(s.get("failures", 0)) + int(s.get("errors", 0)) for s in suites)
skipped = sum(int(s.get("skipped", 0)) for s in suites)
print(f"{tests - failed - skipped} passed, {failed} failed, {skipped} skipped")
PY
)
rm -f "$junit"
echo "$line"
case "$line" in
    *" 0 failed"*) [ "$status" = 0 ] || [ "$status" = 5 ] && exit 0; exit "$status" ;;
    *) exit 1 ;;
esac

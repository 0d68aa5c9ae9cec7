# Shared by scripts/quickstart and scripts/test: Debian packages and the venv.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNTIME_PACKAGES=(python3 python3-venv python3-pip python3-dev gcc libssl-dev softhsm2 libsofthsm2 libnbd-bin fuse3
                  e2fsprogs mount util-linux)
TEST_PACKAGES=(cryptsetup-bin libnbd-bin nbdkit qemu-utils fio nbd-client opensc)

install_packages() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" \
            || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "missing Debian packages: ${missing[*]}; run this script with sudo" >&2
        exit 1
    fi
    echo "installing: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
}

make_venv() {  # $1: pip extra ("" or "[test]")
    if [ ! -x .venv/bin/python ]; then
        /usr/bin/python3 -m venv .venv
    fi
    .venv/bin/pip install -q --disable-pip-version-check -e ".$1"
}

#!/usr/bin/env bash
# Installs the system packages multifd's tests need, as root on Debian:
#   - QEMU 10 (Debian 13: main suite; Debian 12: bookworm-backports, added here);
#   - Debian 13's libqatzip3 (+ libqat4, libusdm0, and libqatzip-dev for its header), fetched with `apt-get download`
#     through a separate apt configuration and unpacked into .cache/qatzip/
#     (the system's sources are never changed for it);
#   - gcc, libisal-dev and zlib1g-dev for the qpl/uadk native helper (plugins/pagecodec).
# Not root, or not Debian: prints what to install and exits 0 (the tests then skip with that reason).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cache="$here/.cache"
mkdir -p "$cache"

if [ "$(id -u)" != 0 ] || [ ! -f /etc/debian_version ]; then
  echo "setup-system: not root on Debian; install QEMU >= 10 (qemu-system-x86), libqatzip3, gcc, libisal-dev and zlib1g-dev yourself" >&2
  exit 0
fi

. /etc/os-release
codename=${VERSION_CODENAME:-bookworm}
export DEBIAN_FRONTEND=noninteractive

# iproute2 (ip, tc) for the benchmark's rate-limited links between network namespaces;
# openssl for the TLS tests' certificates; b3sum, the standard tool that checks a manifest.
if ! command -v tc >/dev/null 2>&1 || ! command -v ip >/dev/null 2>&1 \
    || ! command -v openssl >/dev/null 2>&1 || ! command -v b3sum >/dev/null 2>&1; then
  apt-get update -qq && apt-get install -y -qq iproute2 openssl b3sum >/dev/null
fi

# A C compiler, ISA-L and zlib headers for the per-packet native helper of the qpl and uadk
# software engines (plugins/pagecodec, built by cffi at install; without them those engines
# fall back to a per-page Python loop).
if ! command -v cc >/dev/null 2>&1 || [ ! -f /usr/include/isa-l/igzip_lib.h ] \
    || [ ! -f /usr/include/zlib.h ]; then
  apt-get update -qq && apt-get install -y -qq gcc libc6-dev libisal-dev zlib1g-dev >/dev/null
fi

qemu_ok() {
  command -v qemu-system-x86_64 >/dev/null 2>&1 || return 1
  v=$(qemu-system-x86_64 --version | sed -n 's/.*version \([0-9]*\)\..*/\1/p' | head -1)
  [ "${v:-0}" -ge 10 ]
}

if ! qemu_ok; then
  if [ "$codename" = bookworm ]; then
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
      cat > /etc/apt/sources.list.d/multifd-bookworm-backports.sources <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    fi
    apt-get update -qq
    apt-get install -y -qq -t bookworm-backports qemu-system-x86 qemu-utils >/dev/null
  else
    apt-get update -qq
    apt-get install -y -qq qemu-system-x86 qemu-utils >/dev/null
  fi
fi
qemu-system-x86_64 --version | head -1

# libqatzip (Debian 13 packages). On trixie and later the system packages are used directly.
qz="$cache/qatzip"
if { ! ls "$qz"/usr/lib/*/libqatzip.so.3* || [ ! -f "$qz/usr/include/qatzip.h" ]; } >/dev/null 2>&1 \
    && ! ls /usr/lib/*/libqatzip.so.3* >/dev/null 2>&1; then
  if [ "$codename" = bookworm ]; then
    aptdir="$cache/apt-trixie"
    mkdir -p "$aptdir/lists/partial" "$aptdir/archives/partial" "$aptdir/etc/preferences.d" "$aptdir/etc/sources.list.d"
    cat > "$aptdir/etc/sources.list" <<SRC
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main
SRC
    : > "$aptdir/status"
    aptopts=(-o "Dir::Etc::SourceList=$aptdir/etc/sources.list" -o "Dir::Etc::SourceParts=$aptdir/etc/sources.list.d"
             -o "Dir::Etc::Preferences=$aptdir/etc/preferences" -o "Dir::Etc::PreferencesParts=$aptdir/etc/preferences.d"
             -o "Dir::State::Lists=$aptdir/lists" -o "Dir::State::status=$aptdir/status"
             -o "Dir::Cache=$aptdir/cache" -o "Dir::Cache::archives=$aptdir/archives" -o "APT::Architecture=$(dpkg --print-architecture)")
    mkdir -p "$aptdir/cache"
    apt-get "${aptopts[@]}" update -qq
    (cd "$aptdir/archives" && apt-get "${aptopts[@]}" download libqatzip3 libqat4 libusdm0 libqatzip-dev >/dev/null)
    mkdir -p "$qz"
    for deb in "$aptdir"/archives/*.deb; do dpkg-deb -x "$deb" "$qz"; done
  else
    apt-get install -y -qq libqatzip3 libqatzip-dev >/dev/null || true
  fi
fi
ls "$qz"/usr/lib/*/libqatzip.so.3* /usr/lib/*/libqatzip.so.3* 2>/dev/null | head -1 || true

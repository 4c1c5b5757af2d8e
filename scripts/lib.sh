# shellcheck shell=bash
# Sourced by scripts/demo, scripts/test and .ci/run: the one list of what a fresh Debian machine
# lacks and the one way to install it, so the three cannot drift apart.

# Debian packages. The demo runs Kafka (Java 17 and Maven for the jars), redis-server and a
# virtualenv; the tests also start rabbitmq-server, and the benchmark's smoke test records the
# checkout's commit with git. Every service is started by devstack on loopback, never as a
# system service.
DEMO_PACKAGES=(python3-venv default-jre-headless maven redis-server)
TEST_PACKAGES=("${DEMO_PACKAGES[@]}" rabbitmq-server git)

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

# java_17: whether `java` on PATH is 17 or newer (Kafka 4 needs it).
java_17() {
  command -v java >/dev/null 2>&1 || return 1
  local version
  version=$(java -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')
  [[ ${version%%.*} =~ ^[0-9]+$ ]] && (( ${version%%.*} >= 17 ))
}

# provided NAME: whether what the Debian package NAME brings is already there (from apt or not).
provided() {
  case $1 in
    python3-venv) [[ -x $VENV/bin/python ]] || "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1 ;;
    default-jre-headless) java_17 ;;
    maven) command -v mvn >/dev/null 2>&1 ;;
    redis-server) command -v redis-server >/dev/null 2>&1 || [[ -x /usr/bin/redis-server ]] ;;
    rabbitmq-server) [[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]] ;;
    git) command -v git >/dev/null 2>&1 ;;
    *) dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed' ;;
  esac
}

# ensure_packages NAME...: install the Debian packages whose contents are missing, with apt-get
# as root, through sudo otherwise; fail naming them when neither is possible.
ensure_packages() {
  local missing=() name
  for name in "$@"; do provided "$name" || missing+=("$name"); done
  if (( ${#missing[@]} == 0 )); then
    echo "system packages: present ($*)"
    return 0
  fi
  local as_root=()
  if (( EUID != 0 )); then
    if command -v sudo >/dev/null 2>&1; then
      as_root=(sudo)
    else
      echo "error: missing Debian packages: ${missing[*]}" >&2
      echo "       run as root: apt-get install --no-install-recommends ${missing[*]}" >&2
      return 1
    fi
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: missing (and no apt-get to install them): ${missing[*]}" >&2
    return 1
  fi
  echo "installing Debian packages: ${missing[*]}"
  # Keep the maintainer scripts from starting a system-wide redis-server or rabbitmq-server:
  # devstack starts its own on free loopback ports.
  local policy=/usr/sbin/policy-rc.d own_policy=0 status=0
  if [[ ! -e $policy ]]; then
    "${as_root[@]}" sh -c "printf '#!/bin/sh\nexit 101\n' >$policy && chmod +x $policy" && own_policy=1
  fi
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q || status=$?
  if (( status == 0 )); then
    "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -q --no-install-recommends "${missing[@]}" || status=$?
  fi
  if (( own_policy )); then "${as_root[@]}" rm -f "$policy"; fi
  return "$status"
}

# ensure_python: the virtualenv with the package and its test extra, and the Kafka jars.
ensure_python() {
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "error: $PYTHON is not Python 3.11 or newer; set PYTHON to one that is" >&2
    return 1
  fi
  [[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
  # Reinstall only when pyproject.toml changed: `scripts/test tests/unit` stays quick.
  local stamp=$VENV/.installed-pyproject
  if ! cmp -s pyproject.toml "$stamp"; then
    "$VENV/bin/python" -m pip install -q -e '.[test]'
    cp pyproject.toml "$stamp"
  fi
  "$VENV/bin/python" -m devstack fetch-kafka
}

#!/usr/bin/env bash
# What `make test` needs besides Python packages: PostgreSQL answering on 127.0.0.1:5432 and
# Prometheus' promtool (tests/deploy checks the rules with it), pasta (package passt), ip and nft,
# docker, podman and busybox, gcc and a static libc (the agent's container entrypoint: make helper).
# Installs them with apt-get when missing (as root, or through sudo without a password) and
# starts PostgreSQL and dockerd; with neither, says in one line what to install.
# FAIRGPU_TEST_POSTGRES_URL pointing elsewhere skips the PostgreSQL part.
set -euo pipefail

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo "$@"
  else return 1
  fi
}

url="${FAIRGPU_TEST_POSTGRES_URL:-postgresql://postgres@127.0.0.1:5432/test}"
local_pg=0
case "$url" in *@127.0.0.1:5432/*|*@localhost:5432/*) local_pg=1 ;; esac

need=()
if [ "$local_pg" = 1 ] && ! command -v pg_ctlcluster >/dev/null 2>&1; then need+=(postgresql); fi
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
# The agent's private task networks (agents/netns.py, tests/agents/test_netns.py).
command -v pasta >/dev/null 2>&1 || need+=(passt)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
# The wall between pasta and the node's own addresses (agents/netwall.py).
command -v nft >/dev/null 2>&1 || need+=(nftables)
# Docker for the private networks of container tasks (tests/agents/test_container_netns.py):
# the daemon, and busybox to make the test's image from (no image registry is reachable).
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v busybox >/dev/null 2>&1 || need+=(busybox-static)
# podman, the other runtime image tasks run on (tests/agents/test_container*.py run on both): no
# daemon. runc, not crun, which Debian's podman would otherwise pull: crun 1.8 refuses a hybrid
# cgroup host whose unified hierarchy holds a controller ("cgroups in hybrid mode not
# supported"), and catatonit for its `--init`. conmon comes with podman.
command -v podman >/dev/null 2>&1 || need+=(podman runc catatonit)
# The agent's container entrypoint (make helper): a C compiler and a static libc.
command -v gcc >/dev/null 2>&1 || need+=(gcc)
gcc -print-file-name=libc.a 2>/dev/null | grep -q / || need+=(libc6-dev)
# The kernel's system call tables, which the seccomp filter's numbers are checked against
# (tests/agents/test_seccomp_program.py).
[ -f /usr/include/asm-generic/unistd.h ] || need+=(linux-libc-dev)
if [ ${#need[@]} -gt 0 ]; then
  if ! { as_root apt-get update -qq &&
         DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends \
           "${need[@]}" >/dev/null; }; then
    echo "make test: needs ${need[*]} (Debian packages); install them as root, or run as root" >&2
    exit 1
  fi
fi

if [ "$local_pg" = 1 ] && ! pg_isready -h 127.0.0.1 -p 5432 -q; then
  version="$(ls /etc/postgresql | sort -V | tail -n1)"
  as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || {
    echo "make test: PostgreSQL $version is installed but would not start (pg_ctlcluster)" >&2
    exit 1
  }
  for _ in $(seq 1 30); do pg_isready -h 127.0.0.1 -p 5432 -q && break; sleep 1; done
  pg_isready -h 127.0.0.1 -p 5432 -q || { echo "make test: PostgreSQL did not come up" >&2; exit 1; }
fi

# dockerd without its iptables rules and bridge: the tests' containers use no network of
# docker's own (--network none, and container:<pod> for the task), and the host's firewall
# stays as it was. A daemon that cannot start here (no privileges) only warns: the docker
# tests then skip, saying why.
if command -v dockerd >/dev/null 2>&1 && ! docker info >/dev/null 2>&1; then
  as_root sh -c 'nohup dockerd --iptables=false --bridge=none >/var/log/fairgpu-test-dockerd.log 2>&1 &' || true
  for _ in $(seq 1 30); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 ||
    echo "make test: dockerd did not start (/var/log/fairgpu-test-dockerd.log); the docker tests will skip (fail under FAIRGPU_REQUIRE_DOCKER=1, as .ci/run sets)" >&2
fi

# podman needs no daemon; one that cannot run here (not root) only warns, as dockerd does.
if command -v podman >/dev/null 2>&1 && ! podman info >/dev/null 2>&1; then
  echo "make test: podman info failed; the podman tests will skip (fail under FAIRGPU_REQUIRE_PODMAN=1, as .ci/run sets)" >&2
fi

#!/bin/bash
# Hydra's remote launcher (-launcher ssh -launcher-exec netns_launch.sh) for hosts that are
# network namespaces of this machine (tests/test_multihost.py): called as ssh would be,
# `[options] HOST COMMAND...`, it runs COMMAND in HOST's namespace, with its own hostname
# (a UTS namespace), instead of logging in somewhere.
# SYNCBN_NETNS_HOSTS="10.77.0.1=nsA,10.77.0.2=nsB" maps hosts to namespaces.
set -e
while [[ "$1" == -* ]]; do shift; done
host=$1
shift
ns=""
IFS=',' read -ra pairs <<< "$SYNCBN_NETNS_HOSTS"
for p in "${pairs[@]}"; do
  if [ "${p%%=*}" = "$host" ]; then ns=${p#*=}; fi
done
if [ -z "$ns" ]; then
  echo "netns_launch.sh: no namespace for host $host in SYNCBN_NETNS_HOSTS=$SYNCBN_NETNS_HOSTS" >&2
  exit 1
fi
exec ip netns exec "$ns" unshare --uts sh -c "hostname $ns && exec $*"

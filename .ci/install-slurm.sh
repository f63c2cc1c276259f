#!/usr/bin/env bash
# Install Slurm (slurm-wlm) and munge from Debian's packages so that tests/test_slurm.py can start a real
# two-node loopback cluster. Best effort: never fails the caller. When this is not root, or there is no
# apt-get, it says so and the Slurm tests skip (they print the reason).
set -u

have_all() { command -v slurmctld && command -v slurmd && command -v munged && command -v srun && command -v sbatch; }

if have_all >/dev/null 2>&1; then
    echo "install-slurm: slurm-wlm and munge already installed ($(slurmctld -V 2>/dev/null))"
    exit 0
fi
if [ "$(id -u)" != "0" ]; then
    echo "install-slurm: not root: not installing slurm-wlm/munge; the Slurm tests will be skipped"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-slurm: no apt-get: not installing slurm-wlm/munge; the Slurm tests will be skipped"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
log=$(mktemp /tmp/install-slurm.XXXXXX.log)
echo "install-slurm: apt-get update && apt-get install slurm-wlm munge (log: $log)"
if apt-get update -q >"$log" 2>&1 \
    && apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confold \
        slurm-wlm munge >>"$log" 2>&1; then
    echo "install-slurm: installed $(slurmctld -V 2>/dev/null), munge $(munged -V 2>/dev/null | head -n1)"
else
    echo "install-slurm: apt-get failed (the Slurm tests will be skipped); last lines of $log:"
    tail -n 20 "$log" | sed 's/^/  /'
fi
# Package scripts may have started system daemons (no policy-rc.d, or a booted init); the tests use their
# own munged/slurmctld/slurmd on free ports with their own key and config, so those do not get in the way.
exit 0

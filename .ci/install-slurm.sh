#!/usr/bin/env bash
# Install Slurm (slurm-wlm) and munge from Debian's packages so that tests/test_slurm.py can start a real
# two-node loopback cluster. Exits non-zero when they are missing afterwards (not root, no apt-get, apt
# failed), with the reason: under CI=true the Slurm tests must run (tests/conftest.py fails their skips).
set -u

have_all() { command -v slurmctld && command -v slurmd && command -v munged && command -v srun && command -v sbatch; }

if have_all >/dev/null 2>&1; then
    echo "install-slurm: slurm-wlm and munge already installed ($(slurmctld -V 2>/dev/null))"
    exit 0
fi
if [ "$(id -u)" != "0" ]; then
    echo "install-slurm: not root: cannot install slurm-wlm/munge (the Slurm tests skip, and fail under CI=true)"
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-slurm: no apt-get: cannot install slurm-wlm/munge (the Slurm tests skip, and fail under CI=true)"
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
log=$(mktemp /tmp/install-slurm.XXXXXX.log)
echo "install-slurm: apt-get update && apt-get install slurm-wlm munge (log: $log)"
if apt-get update -q >"$log" 2>&1 \
    && apt-get install -y -q --no-install-recommends -o Dpkg::Options::=--force-confold \
        slurm-wlm munge >>"$log" 2>&1; then
    echo "install-slurm: installed $(slurmctld -V 2>/dev/null), munge $(munged -V 2>/dev/null | head -n1)"
else
    echo "install-slurm: apt-get failed; last lines of $log:"
    tail -n 20 "$log" | sed 's/^/  /'
fi
# Package scripts may have started system daemons (no policy-rc.d, or a booted init); the tests use their
# own munged/slurmctld/slurmd on free ports with their own key and config, so those do not get in the way.
if ! have_all >/dev/null 2>&1; then
    echo "install-slurm: slurm-wlm/munge still missing after apt-get"
    exit 1
fi
exit 0

#!/bin/bash
# PID 1 of a private "fresh host" for one acceptance scenario. Started by
# acceptance_sandbox.Sandbox as root through
#   unshare --mount --propagation private --pid --fork --kill-child --mount-proc --net
# so that
#   * the scenario has its own loopback-only network: the README's and the seeds' fixed
#     ports (5000, 6000, 5007, 80) are free, and nothing it does reaches another host;
#   * every process it starts, daemons included, dies with it (the PID namespace ends
#     when this script exits or unshare is killed), so nothing outlives a test;
#   * the default state directories are genuinely used without touching the host:
#     /var/lib, /etc and /run are overlays whose writes land in $scn/overlay (so
#     /var/lib/scistream, or any per-instance sibling of it, starts empty and is thrown
#     away), /run likewise (sockets, and `ip netns` for `scistream demo --netns`), and
#     /tmp is an empty directory of the scenario (the README's /tmp/tour).
# Then it runs the user's shell under `env -i` with only PATH and a temporary HOME,
# reading commands from our stdin.
# Usage: enter_sandbox.sh SCENARIO_DIR KEEP_DIR HOME_DIR
set -euo pipefail
scn=$1 keep=$2 home=$3

ip link set lo up

# A fresh /tmp. KEEP_DIR (the clone, the scenario dirs) may live under /tmp: keep a
# descriptor on it and bind it back at its own path afterwards. --no-canonicalize
# makes the kernel, not mount(8), resolve /proc/self/fd/3 to that very directory.
mkdir -p "$scn/tmp"
chmod 1777 "$scn/tmp"
exec 3<"$keep"
mount --bind "$scn/tmp" /tmp
mkdir -p "$keep"
mount --no-canonicalize --bind /proc/self/fd/3 "$keep"
exec 3<&-

for dir in /var/lib /etc /run; do
  name=${dir//\//_}
  mkdir -p "$scn/overlay/$name/upper" "$scn/overlay/$name/work"
  mount -t overlay overlay \
    -o "lowerdir=$dir,upperdir=$scn/overlay/$name/upper,workdir=$scn/overlay/$name/work" "$dir"
done
# A host that already has a /var/lib/scistream (another run, another tool) must not
# leak it into the scenario: hide it behind an empty tmpfs.
if [[ -e /var/lib/scistream ]]; then mount -t tmpfs -o mode=0755 tmpfs /var/lib/scistream; fi

mkdir -p "$home"
cd "$home"
# Not exec'd: PID 1 stays this script, which reaps orphans; the explicit <&0 keeps the
# command stream on the user's shell (a background job would otherwise read /dev/null).
env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME="$home" /bin/bash --noprofile --norc <&0 &
wait $!

#!/bin/bash
# A real Slurm cluster on this one machine, for the tests and for trying the templates:
# Debian's slurm-wlm + munge, two emulated nodes (n1, n2) on one host.
#
#   slurm/cluster.sh start    # install (apt, needs root) if missing, configure, start; waits until both nodes are idle
#   slurm/cluster.sh stop     # stop the daemons (by their pid files)
#   slurm/cluster.sh status   # sinfo
#
# State, logs and pid files live in $SLURM_TEST_DIR (default /tmp/launcher-slurm). Debian's
# slurm-wlm runs two slurmd on one host when each has its own NodeName, port and spool folder;
# munged must run first. The configuration is written to /etc/slurm/slurm.conf, the place every
# Slurm command reads it from.
set -euo pipefail

DIR=${SLURM_TEST_DIR:-/tmp/launcher-slurm}
CONF=/etc/slurm/slurm.conf
# The machine's processors: not `nproc`, which gives OMP_NUM_THREADS when that is set (the tests set 1)
CPUS=${SLURM_TEST_CPUS:-$(getconf _NPROCESSORS_ONLN)}

log() { echo "[cluster] $*" >&2; }

install() {
    if command -v slurmctld >/dev/null && command -v munged >/dev/null && command -v sbatch >/dev/null; then
        return
    fi
    if [ "$(id -u)" != 0 ]; then
        log "slurm-wlm and munge are not installed and this is not root: install them (apt-get install slurm-wlm munge)"
        exit 1
    fi
    log "installing slurm-wlm and munge with apt"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
}

configure() {
    local host
    host=$(hostname -s)
    mkdir -p "$DIR/state" "$DIR/spool" /etc/slurm
    cat > "$CONF" <<EOF
# Written by slurm/cluster.sh: two emulated nodes on one host.
ClusterName=local
SlurmctldHost=$host
AuthType=auth/munge
# A requeued job waits for its old credential to expire before it starts again (default 120 s).
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd-%n.log
SlurmUser=root
SlurmdUser=root
JobRequeue=1
MpiDefault=none
ReturnToService=2
# After scancel's SIGTERM every rank checkpoints before Slurm's SIGKILL, KillWait seconds later
# (30 by default): the test machine runs a dozen ranks on 2 cores, where a checkpoint can take longer.
KillWait=120
# A job that gives no --mem gets 1 GB per CPU (not the whole node), and up to 4 jobs share a
# node's CPUs (OverSubscribe=FORCE:4): the emulated nodes are one small machine, and the tests
# run their 2-node jobs side by side.
DefMemPerCPU=1000
NodeName=n[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=[17001-17002] CPUs=$CPUS RealMemory=10000 State=UNKNOWN
PartitionName=debug Nodes=n[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
    # The node names must resolve (MASTER_ADDR comes from `scontrol show hostnames`).
    if ! grep -qE '^127\.0\.0\.1[[:space:]].*\bn1\b' /etc/hosts; then
        echo "127.0.0.1 n1 n2" >> /etc/hosts
    fi
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
    install
    configure
    mkdir -p /run/munge
    chown munge:munge /run/munge 2>/dev/null || true
    if ! pgrep -x munged >/dev/null; then
        /usr/sbin/munged --force
    fi
    running "$DIR/slurmctld.pid" || slurmctld
    for node in n1 n2; do
        running "$DIR/slurmd-$node.pid" || slurmd -N "$node"
    done
    for _ in $(seq 60); do
        if [ "$(sinfo -h -o '%T' -N 2>/dev/null | grep -cE '^idle|^mixed|^allocated')" = 2 ]; then
            sinfo
            return 0
        fi
        # a node that was down after an unclean stop comes back
        scontrol update NodeName=n[1-2] State=RESUME >/dev/null 2>&1 || true
        sleep 1
    done
    log "the two nodes did not become idle; see $DIR/*.log"
    sinfo -N || true
    exit 1
}

stop() {
    for pid_file in "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid"; do
        if running "$pid_file"; then
            kill "$(cat "$pid_file")" || true
        fi
    done
    for _ in $(seq 30); do
        alive=0
        for pid_file in "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid"; do
            running "$pid_file" && alive=1
        done
        [ $alive = 0 ] && return 0
        sleep 0.5
    done
    log "daemons still running after 15 s"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) sinfo -N ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# A one-node Slurm "cluster" on localhost, for tests, CI and trying scripts/slurm/train.sbatch
# on a laptop or a CPU box. Needs root (it writes /etc/slurm/slurm.conf and starts daemons).
#
#   scripts/slurm/local_cluster.sh start    install slurm-wlm + munge if missing (apt-get), write
#                                           slurm.conf for this host, start munged, slurmctld and
#                                           slurmd in the background, wait until the node is idle
#   scripts/slurm/local_cluster.sh status   daemons' PIDs and `sinfo`; exit 0 when the node is up
#   scripts/slurm/local_cluster.sh stop     cancel the cluster's jobs, stop the three daemons by PID
#
# Idempotent: `start` on a running cluster and `stop` on a stopped one do nothing and exit 0.
# No systemd needed (containers, CI). Environment:
#   SLURM_LOCAL_DIR      state: PID files and daemon logs (default /var/lib/hydra_titan_slurm)
#   SLURM_CONF           where slurm.conf is written (default /etc/slurm/slurm.conf, where the
#                        Slurm clients look without further setup)
#   SLURM_LOCAL_TIMEOUT  seconds `start` waits for the node to become idle (default 60)
#
# MinJobAge=16 keeps finished jobs visible for at least 16 s and makes `sbatch --wait` poll every
# 8 s (it backs off 2 -> 8 -> 32 s while the poll interval is under MinJobAge/2; with the default
# 300 a 10-s job is seen as done only after 42 s).
# The daemons run with a clean state (`slurmctld -c`): jobs left from an earlier run are dropped,
# so a requeued job of a killed session cannot come back and take the node.
set -euo pipefail

STATE_DIR=${SLURM_LOCAL_DIR:-/var/lib/hydra_titan_slurm}
CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
TIMEOUT=${SLURM_LOCAL_TIMEOUT:-60}
MARKER="# written by hydra_titan scripts/slurm/local_cluster.sh"
DAEMONS=(munged slurmctld slurmd)   # start order; stop runs in reverse
export SLURM_CONF=$CONF

log() { echo "local_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

pid_of() {  # the recorded PID of daemon $1 if that process is still alive, else nothing
    local f="$STATE_DIR/$1.pid" pid
    [[ -s $f ]] || return 0
    pid=$(<"$f")
    if kill -0 "$pid" 2>/dev/null; then echo "$pid"; fi
}

node_state() {  # the node's state as sinfo prints it (idle, alloc, mix, down*, drain, ...), or nothing
    timeout 10 sinfo --noheader --nodes="$NODE" --format=%t 2>/dev/null | head -n1 || true
}

install_if_missing() {
    local missing=0 bin
    for bin in munged slurmctld slurmd sbatch sinfo scontrol; do
        command -v "$bin" >/dev/null 2>&1 || missing=1
    done
    ((missing)) || return 0
    command -v apt-get >/dev/null 2>&1 || die "Slurm is not installed and apt-get is unavailable"
    log "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

write_conf() {
    # The node line comes from `slurmd -C`: the real CPU topology and memory of this machine, so
    # slurmd registers without a "low CPUs/memory" drain.
    local node_line new
    node_line=$(slurmd -C | head -n1)
    [[ $node_line == NodeName=* ]] || die "unexpected 'slurmd -C' output: $node_line"
    new=$(cat <<CONF
$MARKER
ClusterName=local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=/var/lib/slurm/slurmctld
SlurmdSpoolDir=/var/lib/slurm/slurmd
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=30
MailProg=/bin/true
MinJobAge=16
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
)
    if [[ -f $CONF ]] && ! grep -qF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; move it away or set SLURM_CONF"
    fi
    mkdir -p "$(dirname "$CONF")"
    if [[ ! -f $CONF ]] || [[ $(<"$CONF") != "$new" ]]; then
        printf '%s\n' "$new" >"$CONF"
        log "wrote $CONF"
    fi
}

prepare_dirs() {
    mkdir -p "$STATE_DIR" /var/lib/slurm/slurmctld /var/lib/slurm/slurmd /var/log/slurm \
        /run/munge /var/lib/munge /var/log/munge /etc/munge
    chown slurm:slurm /var/lib/slurm/slurmctld
    chown munge:munge /run/munge /var/lib/munge /var/log/munge /etc/munge
    chmod 0755 /run/munge
    chmod 0700 /etc/munge /var/lib/munge /var/log/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
}

launch() {  # launch NAME CMD...: run in the foreground mode of the daemon, detached, PID recorded
    local name=$1; shift
    # setsid (no fork: a child of this non-interactive shell is no group leader) and setpriv exec
    # in place, so $! is the daemon's own PID.
    setsid "$@" >"$STATE_DIR/$name.log" 2>&1 </dev/null &
    echo $! >"$STATE_DIR/$name.pid"
    log "started $name (pid $!)"
}

start() {
    [[ $(id -u) -eq 0 ]] || die "must run as root"
    install_if_missing
    NODE=$(hostname -s)
    if [[ -n $(pid_of slurmctld) && -n $(pid_of slurmd) && -n $(pid_of munged) ]]; then
        case $(node_state) in idle|alloc|mix|comp*)
            log "already up (node $NODE: $(node_state))"; return 0 ;;
        esac
    fi
    prepare_dirs
    write_conf
    if [[ -z $(pid_of munged) ]]; then
        rm -f /run/munge/munged.pid
        launch munged setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F
        for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.2; done
        munge -n >/dev/null 2>&1 || die "munged did not start: $(tail -n5 "$STATE_DIR/munged.log")"
    fi
    if [[ -z $(pid_of slurmctld) ]]; then
        launch slurmctld /usr/sbin/slurmctld -D -c -f "$CONF"
    fi
    if [[ -z $(pid_of slurmd) ]]; then
        launch slurmd /usr/sbin/slurmd -D -f "$CONF"
    fi
    local state deadline=$((SECONDS + TIMEOUT))
    while ((SECONDS < deadline)); do
        for d in "${DAEMONS[@]}"; do
            [[ -n $(pid_of "$d") ]] || die "$d exited: $(tail -n5 "$STATE_DIR/$d.log")"
        done
        state=$(node_state)
        case $state in
            idle) log "up: node $NODE idle"; return 0 ;;
            alloc|mix) log "up: node $NODE $state"; return 0 ;;
            drain*|down|fail*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    die "node $NODE not idle after ${TIMEOUT}s (state '${state:-?}'); logs in $STATE_DIR"
}

stop() {
    local running=0 d pid
    for d in "${DAEMONS[@]}"; do [[ -n $(pid_of "$d") ]] && running=1; done
    if ((running)) && [[ -n $(pid_of slurmctld) ]]; then
        # Jobs first, so no job step outlives its slurmd.
        local jobs
        jobs=$(timeout 10 squeue --noheader --format=%i 2>/dev/null || true)
        if [[ -n $jobs ]]; then
            # shellcheck disable=SC2086  # one argument per job id
            timeout 10 scancel --quiet $jobs 2>/dev/null || true
            for _ in $(seq 40); do
                [[ -z $(timeout 10 squeue --noheader --format=%i 2>/dev/null) ]] && break
                sleep 0.5
            done
        fi
    fi
    for ((i = ${#DAEMONS[@]} - 1; i >= 0; i--)); do
        d=${DAEMONS[i]}
        pid=$(pid_of "$d")
        if [[ -n $pid ]]; then
            kill -TERM "$pid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
            if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
            log "stopped $d (pid $pid)"
        fi
        rm -f "$STATE_DIR/$d.pid"
    done
    ((running)) || log "not running"
}

status() {
    local d pid up=1
    NODE=$(hostname -s)
    for d in "${DAEMONS[@]}"; do
        pid=$(pid_of "$d")
        echo "$d: ${pid:-not running}"
        [[ -n $pid ]] || up=0
    done
    if ((up)); then
        timeout 10 sinfo 2>/dev/null || true
        case $(node_state) in idle|alloc|mix|comp*) return 0 ;; esac
    fi
    return 3
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    restart) stop; start ;;
    *) echo "usage: $0 start|stop|status|restart" >&2; exit 2 ;;
esac

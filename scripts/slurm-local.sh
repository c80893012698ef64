#!/usr/bin/env bash
# Single-node SLURM cluster on this machine, for CI and local tests of the
# Snakemake SLURM profile.  Needs root (it installs Debian packages, writes
# /etc/slurm/slurm.conf and runs munged, slurmctld and slurmd as daemons).
#
#   scripts/slurm-local.sh start    install what is missing, configure, start, wait until idle
#   scripts/slurm-local.sh stop     stop every daemon this script started (safe when none runs);
#                                   client commands then fail at once (MessageTimeout=1)
#   scripts/slurm-local.sh status   one line per daemon + sinfo; exit 0 only when the node is usable
#   scripts/slurm-local.sh purge    stop, then delete the state directory and our slurm.conf
#
# Environment:
#   SLURM_LOCAL_DIR      state, spool, logs and pid files (default /tmp/dpbr-slurm)
#   SLURM_LOCAL_CPUS     CPUs to advertise (default: what `slurmd -C` detects); more than
#                        the machine has is allowed (oversubscription for toy jobs)
#   SLURM_LOCAL_TIMEOUT  seconds to wait for the node to become idle (default 60)
#   SLURM_LOCAL_GPUS     advertise N fake GPUs (gres/gpu backed by /dev/null-like device
#                        nodes; default 0). Jobs that request GPUs (sbatch --gpus, the
#                        plugin's `gpu` resource) are then accepted and scheduled and see
#                        CUDA_VISIBLE_DEVICES, so a GPU profile can be tested on a CPU
#                        machine. Nothing can compute on them.
#
# No systemd and no slurmdbd: accounting is off (AccountingStorageType=none), so
# `sacct` exits with "Slurm accounting storage is disabled" and the Snakemake SLURM
# plugin, whose default status command is sacct, then waits forever. Use
# `--slurm-status-command squeue` (workflow/profiles/slurm sets it). MinJobAge=300
# keeps finished jobs visible to squeue long enough: the plugin needs MinJobAge >=
# 3 x --slurm-init-seconds-before-status-checks, else it falls back to sacct.
# The node: what `slurmd -C` reports (CPUs, RealMemory); CR_Core_Memory, so jobs get
# the --mem they ask for (Snakemake's mem_mb) and at most RealMemory MB.
set -euo pipefail

DIR="${SLURM_LOCAL_DIR:-/tmp/dpbr-slurm}"
TIMEOUT="${SLURM_LOCAL_TIMEOUT:-60}"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
MARKER="# managed by dpbr scripts/slurm-local.sh"
CLUSTER=dpbr
PARTITION=debug

log() { printf 'slurm-local: %s\n' "$*" >&2; }
die() { printf 'slurm-local: error: %s\n' "$*" >&2; exit 1; }

need_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (installs packages, writes $CONF, starts daemons)"
}

# pid file -> running pid, or nothing
live_pid() {
    local f=$1 pid
    [[ -s $f ]] || return 1
    pid=$(<"$f")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && { echo "$pid"; return 0; }
    return 1
}

install_packages() {
    local missing=()
    command -v munged >/dev/null || missing+=(munge)
    { command -v slurmctld && command -v slurmd && command -v sbatch; } >/dev/null || missing+=(slurm-wlm)
    ((${#missing[@]})) || return 0
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    log "installing ${missing[*]} (apt-get)"
    # Keep package maintainer scripts from trying to start services (no init here).
    local own_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    local rc=0
    {
        DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                "${missing[@]}"
    } >"$DIR/log/apt.log" 2>&1 || rc=$?
    if ((own_policy)); then rm -f /usr/sbin/policy-rc.d; fi
    ((rc == 0)) || { tail -n 20 "$DIR/log/apt.log" >&2 || true; die "apt-get failed (rc=$rc)"; }
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_works; then
        return 0 # a munged is already serving (ours or the system's)
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        install -d -o munge -g munge -m 700 /etc/munge
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile=/etc/munge/munge.key --force
        else
            dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
        fi
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    install -d -o munge -g munge -m 755 /run/munge
    install -d -o munge -g munge -m 700 /var/lib/munge /var/log/munge
    rm -f /run/munge/munged.pid
    # munged refuses to start when its socket is stale; --force removes it.
    runuser -u munge -- /usr/sbin/munged --force --pid-file=/run/munge/munged.pid
    local i
    for i in $(seq 50); do
        munge_works && break
        sleep 0.1
    done
    munge_works || die "munged does not answer (see /var/log/munge/munged.log)"
    cp /run/munge/munged.pid "$DIR/run/munged.pid" # marks it as ours for `stop`
}

# Render slurm.conf (and gres.conf) for this machine into $DIR/run/*.new.
render_conf() {
    local host node_line cpus mem extra=""
    host=$(hostname -s)
    # slurmd -C prints e.g. "NodeName=vm CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=2
    # ThreadsPerCore=1 RealMemory=23975"; keep the first line (the second is UpTime).
    node_line=$(slurmd -C 2>/dev/null | head -n 1)
    [[ $node_line == NodeName=* ]] || die "unexpected 'slurmd -C' output: $node_line"
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node_line")
    cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$node_line")
    if [[ -n ${SLURM_LOCAL_CPUS:-} && ${SLURM_LOCAL_CPUS} != "$cpus" ]]; then
        [[ $SLURM_LOCAL_CPUS =~ ^[1-9][0-9]*$ ]] || die "SLURM_LOCAL_CPUS must be a positive number"
        # Advertise a different CPU count: drop the socket/core topology and let
        # slurmd accept the configured values instead of the detected ones.
        node_line="NodeName=$host CPUs=$SLURM_LOCAL_CPUS RealMemory=$mem"
        cpus=$SLURM_LOCAL_CPUS
        extra="SlurmdParameters=config_overrides"
    fi
    local gpus=${SLURM_LOCAL_GPUS:-0} gres_line="" node_gres=""
    [[ $gpus =~ ^[0-9]+$ ]] || die "SLURM_LOCAL_GPUS must be a number, got '$gpus'"
    rm -f "$DIR/run/gres.conf.new"
    if ((gpus > 0)); then
        gres_line="GresTypes=gpu"
        node_gres="Gres=gpu:$gpus"
        # slurmd only counts GPUs that have device files (Count= alone reports 0 and
        # the node goes INVAL): give it character devices that behave like /dev/null.
        local i
        mkdir -p "$DIR/dev"
        for ((i = 0; i < gpus; i++)); do
            [[ -c $DIR/dev/fakegpu$i ]] || mknod -m 666 "$DIR/dev/fakegpu$i" c 1 3 ||
                die "cannot create fake GPU device $DIR/dev/fakegpu$i (mknod)"
        done
        printf '%s\nNodeName=%s Name=gpu File=%s\n' "$MARKER ($gpus fake GPUs)" "$host" \
            "$DIR/dev/fakegpu[0-$((gpus - 1))]" >"$DIR/run/gres.conf.new"
    fi
    cat >"$DIR/run/slurm.conf.new" <<EOF
$MARKER (state in $DIR)
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
PropagateResourceLimits=NONE
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=300
KillWait=5
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=60
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
$extra
$gres_line
$node_line $node_gres NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    echo "$cpus $mem $gpus" >"$DIR/run/node.new"
}

# True when the installed configuration is the one just rendered.
conf_current() {
    cmp -s "$DIR/run/slurm.conf.new" "$CONF" || return 1
    if [[ -e $DIR/run/gres.conf.new ]]; then
        cmp -s "$DIR/run/gres.conf.new" "$CONF_DIR/gres.conf"
    else
        ! { [[ -e $CONF_DIR/gres.conf ]] && grep -qF "$MARKER" "$CONF_DIR/gres.conf"; }
    fi
}

install_conf() {
    local f
    mkdir -p "$CONF_DIR"
    for f in slurm.conf gres.conf; do
        if [[ -e $CONF_DIR/$f ]] && ! grep -qF "$MARKER" "$CONF_DIR/$f" &&
            [[ $f == slurm.conf || -e $DIR/run/gres.conf.new ]]; then
            log "saving the existing $CONF_DIR/$f as $CONF_DIR/$f.dpbr-bak"
            cp -p "$CONF_DIR/$f" "$CONF_DIR/$f.dpbr-bak"
        fi
    done
    install -m 644 "$DIR/run/slurm.conf.new" "$CONF"
    if [[ -e $DIR/run/gres.conf.new ]]; then
        install -m 644 "$DIR/run/gres.conf.new" "$CONF_DIR/gres.conf"
    elif [[ -e $CONF_DIR/gres.conf ]] && grep -qF "$MARKER" "$CONF_DIR/gres.conf"; then
        rm -f "$CONF_DIR/gres.conf"
    fi
    mv "$DIR/run/node.new" "$DIR/run/node"
}

node_state() { sinfo -h -N -o '%T' 2>/dev/null | head -n 1; }

wait_idle() {
    local deadline=$((SECONDS + TIMEOUT)) state=""
    while ((SECONDS < deadline)); do
        state=$(node_state || true)
        case $state in
            idle | mixed | allocated | completing) return 0 ;;
            down* | drain* | fail*)
                # A state saved by an earlier run; ReturnToService=2 usually clears it.
                scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    log "node state after ${TIMEOUT}s: '${state:-no answer}'"
    tail -n 15 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 2>/dev/null || true
    return 1
}

summary() {
    local cpus mem gpus
    read -r cpus mem gpus <"$DIR/run/node" 2>/dev/null || { cpus='?'; mem='?'; gpus='?'; }
    echo "slurm-local: up: cluster=$CLUSTER node=$(hostname -s) partition=$PARTITION cpus=$cpus" \
        "mem_mb=$mem gpus=${gpus:-0} state=$(node_state) dir=$DIR ($(sbatch --version 2>/dev/null))"
}

cmd_start() {
    need_root
    mkdir -p "$DIR"/{state,spool,log,run}
    chmod 755 "$DIR"
    install_packages
    start_munge
    render_conf
    if live_pid "$DIR/run/slurmctld.pid" >/dev/null && live_pid "$DIR/run/slurmd.pid" >/dev/null; then
        if conf_current; then
            wait_idle || die "daemons run but the node is not usable (try: $0 stop; $0 start)"
            summary
            return 0
        fi
        log "configuration changed: restarting slurmctld and slurmd"
    fi
    # Not running, half-started or reconfigured: stop the rest, then start cleanly.
    stop_slurm_daemons
    install_conf
    slurmctld -i
    slurmd
    wait_idle || die "node did not become idle within ${TIMEOUT}s (logs in $DIR/log)"
    summary
}

stop_pidfile() {
    local f=$1 name=$2 pid i
    if pid=$(live_pid "$f"); then
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "$name ($pid) ignores SIGTERM, sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        log "stopped $name ($pid)"
    fi
    rm -f "$f"
}

stop_slurm_daemons() {
    stop_pidfile "$DIR/run/slurmd.pid" slurmd
    stop_pidfile "$DIR/run/slurmctld.pid" slurmctld
}

# With the daemons down, make SLURM's client commands fail at once: they retry the controller
# for MessageTimeout - 1 seconds (9 s by default), and the Snakemake SLURM executor plugin runs
# `scontrol show config` at every Snakemake start, so every `snakemake` on this machine would
# wait that long. `start` installs the full configuration again.
conf_for_stopped() {
    if [[ -w $CONF ]] && grep -qF "$MARKER" "$CONF" && ! grep -qx 'MessageTimeout=1' "$CONF"; then
        printf '# the daemons are stopped (%s stop): fail fast\nMessageTimeout=1\n' "$0" >>"$CONF"
    fi
}

cmd_stop() {
    [[ -d $DIR/run ]] || { conf_for_stopped; log "nothing to stop ($DIR/run absent)"; return 0; }
    need_root
    # Job processes (slurmstepd and children) outlive slurmd by design: cancel every
    # job first and give them a moment to end, so nothing keeps running afterwards.
    if live_pid "$DIR/run/slurmctld.pid" >/dev/null; then
        local i
        scancel --quiet --user=root >/dev/null 2>&1 || true
        for i in $(seq 40); do
            [[ -z $(squeue -h -t RUNNING,COMPLETING -o %i 2>/dev/null) ]] && break
            sleep 0.5
        done
    fi
    stop_slurm_daemons
    stop_pidfile "$DIR/run/munged.pid" munged
    conf_for_stopped
    return 0
}

cmd_status() {
    local rc=0 pid name
    for name in munged slurmctld slurmd; do
        if pid=$(live_pid "$DIR/run/$name.pid"); then
            echo "$name: running (pid $pid)"
        elif [[ $name == munged ]] && munge_works; then
            echo "munged: running (not started by this script)"
        else
            echo "$name: stopped"
            rc=1
        fi
    done
    if ((rc == 0)); then
        sinfo -N -o '%N %P %T %c %m' || rc=1
        case $(node_state) in idle | mixed | allocated | completing) ;; *) rc=1 ;; esac
    fi
    return $rc
}

cmd_purge() {
    cmd_stop
    rm -rf "$DIR"
    local f
    for f in "$CONF" "$CONF_DIR/gres.conf"; do
        if [[ -e $f ]] && grep -qF "$MARKER" "$f"; then
            rm -f "$f"
            if [[ -e $f.dpbr-bak ]]; then mv "$f.dpbr-bak" "$f"; fi
        fi
    done
    log "purged $DIR"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    purge) cmd_purge ;;
    *) echo "usage: $0 start|stop|status|purge" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# A single-node SLURM cluster on this machine (munged, slurmctld and slurmd on localhost), for testing the
# workflow's SLURM profile. Needs root and Debian's slurm-wlm and munge packages; no systemd, no cgroups,
# no accounting database. Everything lives in one folder: configs, state, logs, the PIDs it started.
#
#   tests/slurm/cluster.sh install      apt-get install slurm-wlm and munge (root)
#   tests/slurm/cluster.sh start DIR    start the cluster in DIR (created); waits until the node is idle and
#                                       prints the line to export (SLURM_CONF=DIR/slurm.conf)
#   tests/slurm/cluster.sh stop DIR     cancel its jobs and stop exactly the daemons it started
#
# One such cluster at a time on a machine (its config is linked at /run/slurm/conf, see start); its ports,
# MUNGE key and socket are its own, so a system munged or slurmd is left alone. Templates: slurm.conf.in,
# gres.conf.in.
set -euo pipefail

HERE="$(cd "$(dirname "$0")" && pwd)"
RUN_CONF=/run/slurm/conf   # Slurm's last place to look for slurm.conf (see start)

die() { echo "cluster.sh: $*" >&2; exit 1; }

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for() {  # wait_for SECONDS PID COMMAND...: retry COMMAND every 0.2 s until it succeeds; fail when
    local seconds=$1 pid=$2; shift 2   # SECONDS have passed or the daemon PID has died
    local deadline=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) && kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.2
    done
}

install() {
    [[ $(id -u) == 0 ]] || die "install needs root"
    command -v apt-get >/dev/null || die "install needs apt-get (Debian/Ubuntu)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
}

runs_a_daemon() {  # runs_a_daemon DIR: is any daemon that DIR's cluster started still running?
    local name pid
    [[ -e $1/pids ]] || return 1
    while read -r name pid; do
        # only a process of that name: a PID left from a cluster that died may belong to another process now
        [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]] && return 0
    done < "$1/pids"
    return 1
}

check_prerequisites() {
    [[ $(id -u) == 0 ]] || die "the cluster runs its daemons as root; run as root"
    local tool
    for tool in munged munge unmunge mungekey slurmctld slurmd sinfo sbatch setpriv mknod python3; do
        command -v "$tool" >/dev/null || die "$tool not found (install Debian's slurm-wlm and munge: $0 install)"
    done
    id munge >/dev/null 2>&1 || die "no 'munge' user (install Debian's munge package)"
}

start() {
    local dir=$1
    check_prerequisites
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    [[ ! -e $dir/pids ]] || die "$dir already holds a cluster (stop it first: $0 stop $dir)"
    [[ ! -e /etc/slurm/slurm.conf ]] || die "/etc/slurm/slurm.conf exists: commands inside a job would read it, not this cluster's"
    if [[ -L $RUN_CONF && -e $RUN_CONF ]]; then
        local other
        other=$(readlink "$RUN_CONF")
        runs_a_daemon "$other" \
            && die "another cluster's config is linked at $RUN_CONF (-> $other); stop that cluster first: $0 stop $other"
        # a cluster whose daemons are all gone (its machine restarted, or it was killed without stop)
        echo "cluster.sh: $RUN_CONF linked a cluster none of whose daemons runs ($other); replacing the link" >&2
        rm -f "$RUN_CONF" "$other/pids"
    fi
    [[ ! -e $RUN_CONF || -L $RUN_CONF ]] || die "$RUN_CONF exists and is not a link: another SLURM runs on this machine"
    trap 'stop "$dir" 2>/dev/null' EXIT   # a failed start stops what it started
    mkdir -p "$dir"/{state,spool,log,munge}
    chmod 755 "$dir"    # the munge user must reach its own folder

    # MUNGE: its own key, socket, log, PID and seed files, owned by the munge user (munged refuses root).
    mungekey --create --keyfile="$dir/munge/munge.key" 2>/dev/null
    chown -R munge:munge "$dir/munge"
    chmod 755 "$dir/munge"     # munged wants its socket's folder searchable by every client
    setpriv --reuid=munge --regid=munge --init-groups test -x "$dir/munge" \
        || die "the munge user cannot reach $dir/munge: every folder above it must be searchable by others"
    setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground \
        --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
        --log-file="$dir/munge/munged.log" --pid-file="$dir/munge/munged.pid" \
        --seed-file="$dir/munge/munged.seed" > "$dir/munge/munged.out" 2>&1 &
    echo "munged $!" >> "$dir/pids"
    wait_for 10 $! sh -c "munge --socket='$dir/munge/munge.socket' -n | unmunge --socket='$dir/munge/munge.socket'" \
        || die "munged did not start; see $dir/munge/munged.out"

    # The node: this machine's CPUs and memory as slurmd sees them, one fake GPU.
    local cpus memory
    cpus=$(slurmd -C | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p')
    memory=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    [[ -n $cpus && -n $memory ]] || die "slurmd -C did not report CPUs and RealMemory"
    mknod "$dir/gpu0" c 1 3
    local field
    for field in slurm.conf gres.conf; do
        sed -e "s|@DIR@|$dir|g" -e "s|@CPUS@|$cpus|g" -e "s|@MEMORY_MB@|$memory|g" \
            -e "s|@CTLD_PORT@|$(free_port)|g" -e "s|@SLURMD_PORT@|$(free_port)|g" \
            "$HERE/$field.in" > "$dir/$field"
    done
    export SLURM_CONF="$dir/slurm.conf"
    # Commands inside a job also need the config without SLURM_CONF (the SLURM executor's job step drops it
    # from srun's environment): after SLURM_CONF and /etc/slurm/slurm.conf, Slurm looks in /run/slurm/conf,
    # where a configless slurmd links the config it fetched. Link ours there.
    mkdir -p "$(dirname "$RUN_CONF")"
    ln -sfn "$dir" "$RUN_CONF"

    slurmctld -D -i -f "$SLURM_CONF" > "$dir/log/slurmctld.out" 2>&1 &
    echo "slurmctld $!" >> "$dir/pids"
    wait_for 20 $! scontrol ping || die "slurmctld did not answer; see $dir/log/slurmctld.log"
    slurmd -D -N localhost -f "$SLURM_CONF" > "$dir/log/slurmd.out" 2>&1 &
    echo "slurmd $!" >> "$dir/pids"
    wait_for 30 $! sh -c '[ "$(sinfo --noheader --nodes=localhost --format=%t)" = idle ]' \
        || die "the node is not idle after 30 s ($(sinfo --noheader --format=%t 2>&1)); see $dir/log/slurmd.log"
    trap - EXIT
    echo "export SLURM_CONF=$SLURM_CONF"
}

stop() {
    local dir=$1
    [[ -e $dir/pids ]] || die "$dir holds no cluster started by $0"
    dir="$(cd "$dir" && pwd)"
    export SLURM_CONF="$dir/slurm.conf"
    scancel --quiet --full --partition=main 2>/dev/null || true
    local name pid
    # the reverse of the start order: slurmd, slurmctld, munged
    tac "$dir/pids" | while read -r name pid; do
        # only a process of that name: a PID left from a cluster that died may belong to another process now
        [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]] || continue
        kill "$pid" 2>/dev/null || continue
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -f "$dir/pids"
    if [[ $(readlink "$RUN_CONF" 2>/dev/null) == "$dir" ]]; then rm -f "$RUN_CONF"; fi
}

case "${1:-}" in
    install) install ;;
    start) [[ $# == 2 ]] || die "usage: $0 start DIR"; start "$2" ;;
    stop) [[ $# == 2 ]] || die "usage: $0 stop DIR"; stop "$2" ;;
    *) die "usage: $0 install | start DIR | stop DIR" ;;
esac

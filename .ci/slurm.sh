#!/usr/bin/env bash
# One-node Slurm cluster for CI and local tests of the SLURMGraph path.
#
#   .ci/slurm.sh start    install slurm + munge if missing, configure, start, wait for idle node
#   .ci/slurm.sh stop     scancel everything, stop daemons (idempotent)
#   .ci/slurm.sh status   sinfo / squeue
#   .ci/slurm.sh env      print the export line(s) clients need
#
# All state (conf, munge key+socket, logs, spool, state, pids) lives under
# $SLURM_HOME (default /tmp/smoulder-slurm). Client commands (sbatch, squeue,
# sinfo, sacct, scancel) need:   export SLURM_CONF=$SLURM_HOME/etc/slurm.conf
# Runs the daemons as root (the only supported mode of this script).
#
# Accounting: SLURM_ACCOUNTING=slurmdbd (default) or filetxt.
#   slurmdbd: also installs slurmdbd + mariadb-server (private mariadbd on
#             127.0.0.1:${SLURM_MYSQL_PORT:-3307}) so plain `sacct -j ID` works.
#   filetxt : lighter; only jobcomp/filetxt. Plain `sacct -j ID` then fails with
#             "Slurm accounting storage is disabled"; `sacct -c -j ID` works for
#             plain jobs but errors on array tasks ("Unknown type ArrayJobId").
# Both write a job-completion log: $SLURM_HOME/log/jobcomp.txt.
set -euo pipefail

SLURM_HOME=${SLURM_HOME:-/tmp/smoulder-slurm}
SLURM_ACCOUNTING=${SLURM_ACCOUNTING:-slurmdbd}
START_TIMEOUT=${SLURM_START_TIMEOUT:-60}
export SLURM_CONF="$SLURM_HOME/etc/slurm.conf"

ETC=$SLURM_HOME/etc
LOG=$SLURM_HOME/log
RUN=$SLURM_HOME/run
MUNGE_DIR=$SLURM_HOME/munge
MUNGE_SOCKET=$MUNGE_DIR/munge.socket
DB_DIR=$SLURM_HOME/mysql

log() { echo "[slurm.sh] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

pid_alive() { # pidfile
    [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

stop_daemons() { # name... : SIGTERM all at once, SIGKILL after 10 s
    local name pid pids=() i alive
    for name in "$@"; do
        pid_alive "$RUN/$name.pid" && { pid=$(cat "$RUN/$name.pid"); kill -TERM "$pid" 2>/dev/null; pids+=("$name:$pid"); }
    done
    for i in $(seq 1 50); do
        alive=0
        for pid in "${pids[@]}"; do kill -0 "${pid#*:}" 2>/dev/null && alive=1; done
        (( alive )) || break
        sleep 0.2
    done
    for pid in "${pids[@]}"; do
        if kill -0 "${pid#*:}" 2>/dev/null; then
            log "${pid%%:*} (${pid#*:}) ignored SIGTERM; sending SIGKILL"
            kill -KILL "${pid#*:}" 2>/dev/null || true
        fi
    done
    for name in "$@"; do rm -f "$RUN/$name.pid" "$RUN/$name.self.pid"; done
}

# Run a daemon in the foreground of its own session, in the background of
# this shell: its pid is known at once (no fork race), it survives the end
# of the calling shell/CI step, and errors it prints before its log file is
# open (e.g. slurm.conf parse errors) land in $LOG/NAME.out.
launch() { # name cmd...
    local name=$1; shift
    setsid "$@" </dev/null >>"$LOG/$name.out" 2>&1 &
    echo $! >"$RUN/$name.pid"  # the daemon's own pid file is $name.self.pid
}

show_logs() {
    local f
    for f in "$LOG"/*.log "$LOG"/*.out; do
        [[ -s $f ]] || continue
        # NAME.out (daemon stderr) repeats NAME.log once that log is open.
        [[ $f == *.out && -s ${f%.out}.log ]] && continue
        echo "----- tail -n 40 $f -----" >&2
        tail -n 40 "$f" >&2 || true
    done
    echo "----- fatal lines -----" >&2
    grep -h 'fatal' "$LOG"/slurm*.log "$LOG"/munged.log 2>/dev/null | tail -n 5 >&2 || true
}

install_packages() {
    local need=() p
    local pkgs=(slurmctld slurmd slurm-client munge)
    [[ $SLURM_ACCOUNTING == slurmdbd ]] && pkgs+=(slurmdbd mariadb-server)
    for p in "${pkgs[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
    done
    [[ ${#need[@]} -eq 0 ]] && return 0
    [[ $(id -u) -eq 0 ]] || die "need root to apt-get install ${need[*]}"
    log "installing: ${need[*]}"
    local t0=$SECONDS
    export DEBIAN_FRONTEND=noninteractive
    # Refresh lists only if the candidate is unknown (fresh container).
    if ! apt-cache policy "${need[0]}" 2>/dev/null | grep -q 'Candidate: [0-9]'; then
        apt-get update -q >"$LOG/apt.log" 2>&1 || { cat "$LOG/apt.log" >&2; die "apt-get update failed"; }
    fi
    # Packages' postinst may try to start services; we run our own daemons,
    # so keep them from starting (restored afterwards).
    local policy=/usr/sbin/policy-rc.d had_policy=1
    if [[ ! -e $policy ]]; then
        had_policy=0
        printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"
    fi
    if ! apt-get install -y -q -o DPkg::Lock::Timeout=300 --no-install-recommends "${need[@]}" >>"$LOG/apt.log" 2>&1; then
        [[ $had_policy -eq 1 ]] || rm -f "$policy"
        tail -n 30 "$LOG/apt.log" >&2; die "apt-get install failed"
    fi
    [[ $had_policy -eq 1 ]] || rm -f "$policy"
    log "installed in $((SECONDS - t0)) s"
}

write_conf() {
    local host cpus mem sockets cores threads
    host=$(hostname -s)
    # Hardware as slurmd itself sees it (so the node never drains for
    # "Low RealMemory"/CPU mismatch); leave 512 MB for the OS.
    local hw; hw=$(slurmd -C | head -n1)
    cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
    sockets=$(sed -n 's/.*SocketsPerBoard=\([0-9]*\).*/\1/p' <<<"$hw")
    cores=$(sed -n 's/.*CoresPerSocket=\([0-9]*\).*/\1/p' <<<"$hw")
    threads=$(sed -n 's/.*ThreadsPerCore=\([0-9]*\).*/\1/p' <<<"$hw")
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
    [[ -n $cpus && -n $mem ]] || die "could not parse 'slurmd -C': $hw"
    (( mem > 1024 )) && mem=$((mem - 512))

    local acct
    if [[ $SLURM_ACCOUNTING == slurmdbd ]]; then
        acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=${SLURMDBD_PORT:-6819}
# For slurmdbd connections the munge socket is taken from here, not AuthInfo.
AccountingStoragePass=${MUNGE_SOCKET}"
    else
        acct="AccountingStorageType=accounting_storage/none"
    fi

    cat >"$SLURM_CONF" <<EOF
# Generated by .ci/slurm.sh -- one-node test cluster, daemons run as root.
ClusterName=smoulder
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=${MUNGE_SOCKET}
StateSaveLocation=${SLURM_HOME}/state
SlurmdSpoolDir=${SLURM_HOME}/spool
SlurmctldPidFile=${RUN}/slurmctld.self.pid
SlurmdPidFile=${RUN}/slurmd.self.pid
SlurmctldLogFile=${LOG}/slurmctld.log
SlurmdLogFile=${LOG}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups: plain /proc process tracking, no task confinement.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, a job with no --mem gets the whole node's memory.
DefMemPerCPU=$((mem / cpus))
SchedulerType=sched/backfill
# A job whose afterok dependency failed is cancelled instead of pending forever.
DependencyParameters=kill_invalid_depend
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
MailProg=/bin/true
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
LaunchParameters=use_interactive_step
MinJobAge=300
InactiveLimit=0
KillWait=5
Waittime=0
JobCompType=jobcomp/filetxt
JobCompLoc=${LOG}/jobcomp.txt
${acct}
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} Sockets=${sockets:-1} CoresPerSocket=${cores:-$cpus} ThreadsPerCore=${threads:-1} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

start_munge() {
    mkdir -p "$MUNGE_DIR"; chmod 755 "$MUNGE_DIR"  # socket must be reachable by job users
    if [[ ! -s $MUNGE_DIR/munge.key ]]; then
        dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1 count=1024 status=none
    fi
    chmod 400 "$MUNGE_DIR/munge.key"
    pid_alive "$RUN/munged.pid" && return 0
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    # --force: munged as root with key/socket in a non-standard directory.
    launch munged munged --foreground --force --key-file="$MUNGE_DIR/munge.key" \
        --socket="$MUNGE_SOCKET" --pid-file="$RUN/munged.self.pid" --log-file="$LOG/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed"
    local i
    for i in $(seq 1 50); do [[ -S $MUNGE_SOCKET ]] && break; sleep 0.1; done
    pid_alive "$RUN/munged.pid" || { show_logs; die "munged failed to start"; }
    munge -S "$MUNGE_SOCKET" -n | unmunge -S "$MUNGE_SOCKET" >/dev/null \
        || { show_logs; die "munge credential round-trip failed"; }
}

start_slurmdbd() {
    [[ $SLURM_ACCOUNTING == slurmdbd ]] || return 0
    local i sock=$DB_DIR/mysqld.sock dbport=${SLURM_MYSQL_PORT:-3307}
    mkdir -p "$DB_DIR"
    if ! pid_alive "$RUN/mysqld.pid"; then
        if [[ ! -d $DB_DIR/data/mysql ]]; then
            mariadb-install-db --no-defaults --user=root --datadir="$DB_DIR/data" --skip-test-db \
                >"$LOG/mariadb-install.log" 2>&1 \
                || { cat "$LOG/mariadb-install.log" >&2; die "mariadb-install-db failed"; }
        fi
        launch mysqld mariadbd --no-defaults --user=root --datadir="$DB_DIR/data" --socket="$sock" \
            --pid-file="$RUN/mysqld.self.pid" --bind-address=127.0.0.1 --port="$dbport" \
            --log-error="$LOG/mariadb.log" --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900
        for i in $(seq 1 60); do
            mariadb --no-defaults -S "$sock" -e 'select 1' >/dev/null 2>&1 && break
            pid_alive "$RUN/mysqld.pid" || break
            sleep 0.5
        done
        mariadb --no-defaults -S "$sock" -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" \
            || { show_logs; die "mariadb did not start"; }
    fi
    cat >"$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=${MUNGE_SOCKET}
DbdHost=$(hostname -s)
DbdAddr=127.0.0.1
DbdPort=${SLURMDBD_PORT:-6819}
SlurmUser=root
PidFile=${RUN}/slurmdbd.self.pid
LogFile=${LOG}/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=${dbport}
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
    chmod 600 "$ETC/slurmdbd.conf"
    if ! pid_alive "$RUN/slurmdbd.pid"; then
        # slurmdbd reads slurmdbd.conf from the directory of $SLURM_CONF.
        launch slurmdbd slurmdbd -D
        for i in $(seq 1 30); do
            pid_alive "$RUN/slurmdbd.pid" || { show_logs; die "slurmdbd exited"; }
            timeout 2 sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.5
        done
    fi
    timeout 10 sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx smoulder \
        || timeout 10 sacctmgr -i add cluster smoulder >/dev/null \
        || { show_logs; die "sacctmgr add cluster failed"; }
}

cmd_start() {
    mkdir -p "$ETC" "$LOG" "$RUN" "$SLURM_HOME/state" "$SLURM_HOME/spool"
    local t0=$SECONDS f
    # Fresh daemon logs for a fresh start (previous ones go to log/prev/).
    if ! pid_alive "$RUN/slurmctld.pid"; then
        mkdir -p "$LOG/prev"
        for f in "$LOG"/*.log "$LOG"/*.out; do
            [[ -f $f && $f != */apt.log ]] && mv -f "$f" "$LOG/prev/"
        done
    fi
    install_packages
    write_conf
    start_munge
    start_slurmdbd
    if ! pid_alive "$RUN/slurmctld.pid"; then
        launch slurmctld slurmctld -D
    fi
    # The node counts as up once this slurmd has registered (the state file
    # of an earlier run may already say "idle").
    local since=0000
    if ! pid_alive "$RUN/slurmd.pid"; then
        since=$(date +%Y-%m-%dT%H:%M:%S)
        launch slurmd slurmd -D
    fi
    local d deadline=$((SECONDS + START_TIMEOUT)) state="" registered="" ready=0
    while (( SECONDS < deadline )); do
        for d in slurmctld slurmd; do
            pid_alive "$RUN/$d.pid" || { show_logs; die "$d is not running (see its log above)"; }
        done
        state=$(timeout 2 sinfo -h -N -o '%T' 2>/dev/null | head -n1 || true)
        registered=""
        [[ -n $state ]] && registered=$(timeout 2 scontrol show node "$(hostname -s)" 2>/dev/null \
            | sed -n 's/.*SlurmdStartTime=\([^ ]*\).*/\1/p' || true)
        if [[ $state =~ ^(idle|mixed|allocated|completing)$ && -n $registered && ! $registered < $since ]]; then
            ready=1; break
        fi
        # A node left down/drained by an earlier run: resume it.
        if [[ $state == down* || $state == drain* ]]; then
            scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true
        fi
        sleep 1
    done
    if (( ! ready )); then
        sinfo -N -l >&2 || true
        show_logs
        die "node not idle after ${START_TIMEOUT} s (state: '${state:-no answer}')"
    fi
    log "cluster up in $((SECONDS - t0)) s"
    sinfo
    echo "export SLURM_CONF=$SLURM_CONF"
}

cmd_stop() {
    if [[ -f $SLURM_CONF ]] && pid_alive "$RUN/slurmctld.pid"; then
        scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
        scancel --quiet --state=PENDING 2>/dev/null || true
        local i
        for i in $(seq 1 20); do
            [[ -z $(squeue -h 2>/dev/null) ]] && break; sleep 0.5
        done
    fi
    stop_daemons slurmd slurmctld
    stop_daemons slurmdbd
    stop_daemons mysqld munged
    # Leftovers whose pid file was lost: only processes started for this
    # SLURM_HOME (slurm daemons carry SLURM_CONF in their environment,
    # munged/mariadbd carry SLURM_HOME in their arguments).
    local p comm
    for p in /proc/[0-9]*; do
        comm=$(cat "$p/comm" 2>/dev/null) || continue
        case $comm in
            slurmctld|slurmd|slurmdbd|slurmscriptd)
                tr '\0' '\n' <"$p/environ" 2>/dev/null | grep -qxF "SLURM_CONF=$SLURM_CONF" || continue ;;
            slurmstepd)  # its process title overwrites its environment: look at its job's
                local c kids ours=0
                kids=$(cat "$p/task/${p#/proc/}/children" 2>/dev/null || pgrep -P "${p#/proc/}" || true)
                for c in $kids; do
                    tr '\0' '\n' <"/proc/$c/environ" 2>/dev/null | grep -qxF "SLURM_CONF=$SLURM_CONF" && ours=1
                done
                (( ours )) || continue
                # the job's script leads its own process group: end the group, not just it
                for c in $kids; do kill -KILL -- "-$c" 2>/dev/null || kill -KILL "$c" 2>/dev/null || true; done ;;
            munged|mariadbd)
                tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -qF "$SLURM_HOME/" || continue ;;
            *) continue ;;
        esac
        log "killing leftover $comm (${p#/proc/})"
        kill -KILL "${p#/proc/}" 2>/dev/null || true
    done
    log "stopped"
}

cmd_status() {
    [[ -f $SLURM_CONF ]] || die "no $SLURM_CONF (not started?)"
    sinfo
    squeue
}

case ${1:-} in
    start)  cmd_start ;;
    stop)   cmd_stop ;;
    status) cmd_status ;;
    env)    echo "export SLURM_CONF=$SLURM_CONF" ;;
    *) echo "usage: $0 {start|stop|status|env}" >&2; exit 2 ;;
esac

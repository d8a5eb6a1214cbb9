#!/usr/bin/env bash
# Start a real single-node SLURM cluster (Debian 12, root, no systemd needed) for tests/test_slurm.py, or to try
# `snakemake --profile profiles/slurm` on one machine. Idempotent: installs what is missing, (re)writes config,
# starts only daemons that are not already running, and waits until the node is idle. Fake GPUs are character
# devices declared as GRES gpu, so that GPU requests are scheduled and jobs get CUDA_VISIBLE_DEVICES.
# Based on a recipe seen working on this machine (../shared/reference/slurm/).
#
# Env knobs:
#   SLURM_CI_DIR   state/spool/log/pid dir          (default: a slurm-ci folder in TMPDIR)
#   SLURM_WITH_DBD 1 = MariaDB + slurmdbd (sacct works), 0 = no accounting
#                  (then snakemake needs slurm-status-command: squeue) (default 1)
#   SLURM_FAKE_GPUS number of fake GPUs declared as GRES gpu (0 = none) (default 2)
#   SLURM_ACCOUNT  account created in slurmdbd for the current user (default ci)
#   SLURM_STARTED_FILE  where `start` lists the daemons it started that were not running before (name and pid
#                  file, one a line), and what `stop` stops (default $SLURM_CI_DIR/started): a cluster, or a
#                  munged or MariaDB, that was already running is left running.
# Usage: start_slurm.sh [start|stop]
set -euo pipefail

D=${SLURM_CI_DIR:-${TMPDIR:-/tmp}/slurm-ci}
WITH_DBD=${SLURM_WITH_DBD:-1}
NGPU=${SLURM_FAKE_GPUS:-2}
ACCOUNT=${SLURM_ACCOUNT:-ci}
NODE=$(hostname -s)
ETC=/etc/slurm
export DEBIAN_FRONTEND=noninteractive

STARTED=${SLURM_STARTED_FILE:-$D/started}

log() { echo "[start_slurm $(date +%T)] $*"; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
munge_up() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

stop_started() {
  # only the daemons the last `start` started (listed in $STARTED), the last started first
  [ -s "$STARTED" ] || { log "nothing to stop ($STARTED lists no daemon)"; return 0; }
  tac "$STARTED" | while read -r name pidfile; do
    if alive "$pidfile"; then
      pid=$(cat "$pidfile"); log "stopping $name ($pid)"; kill "$pid" || true
      for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    fi
  done
  : > "$STARTED"
}

if [ "${1:-start}" = stop ]; then stop_started; exit 0; fi

mkdir -p "$D"
# what runs already is not this run's to stop
before=" "
command -v munge >/dev/null && munge_up && before+="munged "
command -v mariadb-admin >/dev/null && mariadb-admin ping >/dev/null 2>&1 && before+="mariadb "
for p in slurmdbd slurmctld slurmd; do alive "$D/$p.pid" && before+="$p "; done
: > "$STARTED"
mark() { case "$before" in *" $1 "*) ;; *) echo "$1 $2" >> "$STARTED" ;; esac; }

# ---------- 1. packages ----------
pkgs=(slurmctld slurmd slurm-client munge)
[ "$WITH_DBD" = 1 ] && pkgs+=(slurmdbd mariadb-server)
missing=()
for p in "${pkgs[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get install ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

mkdir -p "$D"/{state,spool,log,fakegpu}

# ---------- 2. munge ----------
if [ ! -s /etc/munge/munge.key ]; then
  mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
fi
install -d -o munge -g munge -m 0755 /run/munge
if ! munge_up; then
  log "starting munged"
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 1 20); do munge_up && break; sleep 0.5; done
  mark munged /run/munge/munged.pid
fi

# ---------- 3. fake GPUs (char devices; gres/gpu ignores File-less entries) ----------
if [ "$NGPU" -gt 0 ]; then
  for i in $(seq 0 $((NGPU - 1))); do
    f="$D/fakegpu/gpu$i"
    [ -e "$f" ] || mknod "$f" c 195 "$i" 2>/dev/null || touch "$f"   # touch = fallback, logs an error but works
  done
fi

# ---------- 4. config ----------
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) / 1024 ))
REALMEM=$(( MEM_MB * 90 / 100 ))
HW=$(slurmd -C | head -1 | sed -e 's/^NodeName=[^ ]* //' -e 's/ RealMemory=[0-9]*//')
if [ "$WITH_DBD" = 1 ]; then
  ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStoreFlags=job_comment"
else
  ACCT="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi
GRESLINE=""; GRESTYPES=""
if [ "$NGPU" -gt 0 ]; then GRESLINE=" Gres=gpu:$NGPU"; GRESTYPES="GresTypes=gpu"; fi

cat > "$D/slurm.conf.new" <<EOF
ClusterName=ci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/slurmctld.pid
SlurmdPidFile=$D/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldPort=6817
SlurmdPort=6818
ReturnToService=2
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
MinJobAge=300
JobCompType=jobcomp/none
$ACCT
$GRESTYPES
NodeName=$NODE NodeAddr=127.0.0.1 $HW RealMemory=$REALMEM$GRESLINE State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
if [ "$NGPU" -gt 0 ]; then
  echo "NodeName=$NODE Name=gpu File=$D/fakegpu/gpu[0-$((NGPU - 1))]" > "$D/gres.conf.new"
else
  : > "$D/gres.conf.new"
fi
changed=0
for f in slurm.conf gres.conf; do
  if ! cmp -s "$D/$f.new" "$ETC/$f"; then install -m 644 "$D/$f.new" "$ETC/$f"; changed=1; fi
  rm -f "$D/$f.new"
done
if [ $changed = 1 ]; then
  log "config changed"
  # restart our own daemons so that they pick it up
  for p in slurmctld slurmd; do alive "$D/$p.pid" && kill "$(cat "$D/$p.pid")" || true; done
  sleep 2
fi

# ---------- 5. MariaDB + slurmdbd ----------
if [ "$WITH_DBD" = 1 ]; then
  install -d -o mysql -g mysql /run/mysqld
  if ! mariadb-admin ping >/dev/null 2>&1; then
    log "starting mariadbd"
    setsid /usr/sbin/mariadbd --user=mysql --bind-address=127.0.0.1 \
      </dev/null >"$D/log/mariadb.log" 2>&1 &
    for _ in $(seq 1 60); do mariadb-admin ping >/dev/null 2>&1 && break; sleep 0.5; done
    cp /run/mysqld/mysqld.pid "$D/mariadb.pid"
    mark mariadb "$D/mariadb.pid"
  fi
  mariadb -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmpw';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  cat > "$D/slurmdbd.conf.new" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
DebugLevel=info
LogFile=$D/log/slurmdbd.log
PidFile=$D/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StoragePort=3306
StorageUser=slurm
StoragePass=slurmpw
StorageLoc=slurm_acct_db
EOF
  if ! cmp -s "$D/slurmdbd.conf.new" "$ETC/slurmdbd.conf"; then
    install -m 600 "$D/slurmdbd.conf.new" "$ETC/slurmdbd.conf"
    alive "$D/slurmdbd.pid" && kill "$(cat "$D/slurmdbd.pid")" && sleep 2
  fi
  rm -f "$D/slurmdbd.conf.new"
  if ! alive "$D/slurmdbd.pid"; then
    log "starting slurmdbd"
    slurmdbd                       # daemonizes, writes $D/slurmdbd.pid
    for _ in $(seq 1 60); do (exec 3<>/dev/tcp/127.0.0.1/6819) 2>/dev/null && break; sleep 0.5; done
    mark slurmdbd "$D/slurmdbd.pid"
  fi
fi

# ---------- 6. slurmctld + slurmd ----------
if ! alive "$D/slurmctld.pid"; then log "starting slurmctld"; slurmctld; mark slurmctld "$D/slurmctld.pid"; fi
for _ in $(seq 1 60); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.5; done
if ! alive "$D/slurmd.pid"; then log "starting slurmd"; slurmd; mark slurmd "$D/slurmd.pid"; fi

if [ "$WITH_DBD" = 1 ]; then
  USER_NAME=$(id -un)
  sacctmgr -n list account "$ACCOUNT" format=account | grep -q . ||
    sacctmgr -i add account "$ACCOUNT" Description=ci Organization=ci >/dev/null
  sacctmgr -n list assoc user="$USER_NAME" account="$ACCOUNT" format=user | grep -q . ||
    sacctmgr -i add user "$USER_NAME" Account="$ACCOUNT" DefaultAccount="$ACCOUNT" >/dev/null
fi

# ---------- 7. wait for idle node ----------
for i in $(seq 1 120); do
  st=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
  case "$st" in
    idle|mixed|allocated|completing) log "node $NODE is $st"; break ;;
    *drain*|*inval*|down*) scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
  esac
  sleep 0.5
  [ "$i" = 120 ] && { log "node did not become idle (state '$st')"; sinfo -R; exit 1; }
done
# smoke test: a real job step must run
timeout 60 srun -N1 -n1 -t 1 true
[ "$NGPU" -gt 0 ] && timeout 60 srun -N1 -n1 -t 1 --gres=gpu:1 true
sinfo -N -o "%N %T %c %m %G"

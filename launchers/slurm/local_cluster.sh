#!/usr/bin/env bash
# A throw-away single-node SLURM on 127.0.0.1 for the launcher tests (root, no systemd needed).
#
#   launchers/slurm/local_cluster.sh start BASE   # config + munged + slurmctld + slurmd; waits for the node
#   launchers/slurm/local_cluster.sh stop  BASE   # cancel jobs, stop the daemons (pidfiles under BASE)
#   export SLURM_CONF=BASE/etc/slurm.conf         # then sinfo / sbatch / srun talk to it
#
# Everything lives under BASE (config, state, spool, logs, munge key and socket); nothing is
# written to /etc. Needs Debian's slurm-wlm and munge (scripts/setup_test_services.sh).
set -euo pipefail
cmd=${1:?start|stop}
base=$(realpath -m "${2:?BASE folder}")
node=$(hostname -s)
conf=$base/etc/slurm.conf
sock=$base/munge/munge.socket
ctld_port=${SLURM_LOCAL_CTLD_PORT:-6817}
slurmd_port=${SLURM_LOCAL_SLURMD_PORT:-6818}

running() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pid() {
  local pidfile=$1 pid
  running "$pidfile" || return 0
  pid=$(cat "$pidfile"); kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}

start() {
  mkdir -p "$base"/{etc,state,spool,log,run,munge}
  chmod 700 "$base/munge"
  local hw mem
  hw=$(slurmd -C | head -1 | tr ' ' '\n' | grep -E '^(CPUs|Boards|SocketsPerBoard|CoresPerSocket|ThreadsPerCore)=' | tr '\n' ' ')
  mem=$(( $(free -m | awk '/^Mem:/{print $2}') - 1024 ))
  cat > "$conf" <<CONF
ClusterName=iaklocal
SlurmctldHost=${node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=${sock}
SlurmctldPort=${ctld_port}
SlurmdPort=${slurmd_port}
StateSaveLocation=${base}/state
SlurmdSpoolDir=${base}/spool
SlurmctldPidFile=${base}/run/slurmctld.pid
SlurmdPidFile=${base}/run/slurmd.pid
SlurmctldLogFile=${base}/log/slurmctld.log
SlurmdLogFile=${base}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=${node} NodeAddr=127.0.0.1 ${hw}RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=${node} Default=YES MaxTime=INFINITE State=UP
CONF
  export SLURM_CONF=$conf
  [[ -s $base/munge/munge.key ]] || { dd if=/dev/urandom of="$base/munge/munge.key" bs=1024 count=1 2>/dev/null; chmod 600 "$base/munge/munge.key"; }
  running "$base/run/munged.pid" || munged --force --socket="$sock" --key-file="$base/munge/munge.key" \
      --pid-file="$base/run/munged.pid" --log-file="$base/log/munged.log" --seed-file="$base/munge/seed"
  running "$base/run/slurmctld.pid" || slurmctld -f "$conf"
  for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.1; done
  running "$base/run/slurmd.pid" || slurmd -f "$conf" -N "$node"
  for _ in $(seq 200); do
    [[ $(sinfo -h -n "$node" -o %T 2>/dev/null) == idle* ]] && { echo "SLURM_CONF=$conf"; return 0; }
    sleep 0.1
  done
  echo "node did not become idle; logs in $base/log" >&2; tail -n 20 "$base"/log/*.log >&2; return 1
}

stop() {
  export SLURM_CONF=$conf
  if running "$base/run/slurmctld.pid"; then scancel --quiet --user=root 2>/dev/null || true; fi
  stop_pid "$base/run/slurmd.pid"
  stop_pid "$base/run/slurmctld.pid"
  stop_pid "$base/run/munged.pid"
}

case $cmd in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop BASE" >&2; exit 2 ;;
esac

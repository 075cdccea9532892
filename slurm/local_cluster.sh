#!/usr/bin/env bash
# slurm/local_cluster.sh up|down|status [DIR]
#
# A real two-node Slurm cluster on this one machine (nodes n1 and n2, one CPU each), to try
# slurm/train.sbatch on a laptop and to test it: munged, slurmctld and one slurmd per node, with every
# file under DIR (default /tmp/dist_llama_slurm). Needs root and Debian's packages:
#   apt-get install -y slurmd slurmctld slurm-client munge
# `up` prints the line to use the cluster from a shell: export SLURM_CONF=DIR/slurm.conf
# `down` stops every daemon it started, by its own pid, and removes what it added to /etc/hosts.
# Exit status 3: the cluster cannot start here (not root, packages missing), told in one line.
set -euo pipefail

action=${1:?usage: slurm/local_cluster.sh up|down|status [DIR]}
dir=$(realpath -m "${2:-${DIST_LLAMA_SLURM_DIR:-/tmp/dist_llama_slurm}}")
ctld_port=${DIST_LLAMA_SLURMCTLD_PORT:-16817}
node_ports=(${DIST_LLAMA_SLURMD_PORTS:-17001 17002})
nodes=(n1 n2)
hosts_mark="# dist_llama local Slurm cluster"
export SLURM_CONF="${dir}/slurm.conf"

cannot() { echo "local Slurm cluster cannot start: $*" >&2; exit 3; }

stop_pidfile() {  # stop the daemon whose pid the file holds, and wait until it is gone
  local pidfile=$1 pid
  [ -f "${pidfile}" ] || return 0
  pid=$(cat "${pidfile}")
  if [ -n "${pid}" ] && kill -0 "${pid}" 2>/dev/null; then
    kill "${pid}"
    for _ in $(seq 50); do kill -0 "${pid}" 2>/dev/null || break; sleep 0.1; done
    kill -0 "${pid}" 2>/dev/null && kill -9 "${pid}"
  fi
  rm -f "${pidfile}"
}

write_config() {
  local host i
  host=$(hostname -s)
  mkdir -p "${dir}/state" "${dir}/log"
  for node in "${nodes[@]}"; do mkdir -p "${dir}/spool/${node}"; done
  {
    echo "ClusterName=dist_llama_local"
    echo "SlurmctldHost=${host}"
    echo "SlurmctldPort=${ctld_port}"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "AuthType=auth/munge"
    echo "StateSaveLocation=${dir}/state"
    echo "SlurmdSpoolDir=${dir}/spool/%n"
    echo "SlurmctldPidFile=${dir}/slurmctld.pid"
    echo "SlurmdPidFile=${dir}/slurmd.%n.pid"
    echo "SlurmctldLogFile=${dir}/log/slurmctld.log"
    echo "SlurmdLogFile=${dir}/log/slurmd.%n.log"
    # No cgroups in containers and on many laptops: track processes by parent id, bind nothing.
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_CPU"
    echo "SchedulerType=sched/backfill"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "AccountingStorageType=accounting_storage/none"
    echo "MpiDefault=none"
    echo "MailProg=/bin/true"
    echo "ReturnToService=2"
    echo "JobRequeue=1"
    echo "KillWait=30"
    echo "MinJobAge=600"
    for i in "${!nodes[@]}"; do
      echo "NodeName=${nodes[$i]} NodeHostname=${host} Port=${node_ports[$i]} CPUs=1 State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${nodes[*]}") Default=YES MaxTime=INFINITE State=UP"
  } > "${SLURM_CONF}"
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    return 0  # a munged already answers (the machine's own): use it, and leave it running
  fi
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
  fi
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  runuser -u munge -- munged --pid-file=/run/munge/munged.pid
  echo /run/munge/munged.pid > "${dir}/munged.pidfile"
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0; sleep 0.1; done
  cannot "munged started but does not answer (see /var/log/munge/munged.log)"
}

add_hosts() {
  # The rendezvous endpoint is the first node's name, as on a real cluster: the names must resolve.
  getent hosts "${nodes[0]}" >/dev/null && return 0
  echo "127.0.0.1 ${nodes[*]} ${hosts_mark}" >> /etc/hosts
}

remove_hosts() {
  grep -q "${hosts_mark}" /etc/hosts 2>/dev/null || return 0
  # /etc/hosts may be a bind mount (containers): rewrite it in place rather than replacing the file.
  local kept
  kept=$(grep -v "${hosts_mark}" /etc/hosts)
  printf '%s\n' "${kept}" > /etc/hosts
}

wait_idle() {
  local idle
  for _ in $(seq 100); do
    idle=$(sinfo -h -N -o "%N %t" 2>/dev/null | awk '$2 == "idle"' | wc -l)
    [ "${idle}" -eq "${#nodes[@]}" ] && return 0
    sleep 0.2
  done
  sinfo -N >&2 || true
  cannot "the nodes did not become idle within 20 s (logs in ${dir}/log)"
}

case "${action}" in
  up)
    [ "$(id -u)" -eq 0 ] || cannot "it needs root (the daemons run as root and it edits /etc/hosts)"
    for tool in munged munge slurmctld slurmd sbatch scontrol sinfo; do
      command -v "${tool}" >/dev/null || cannot "${tool} is not installed (apt-get install -y slurmd slurmctld slurm-client munge)"
    done
    if [ -f "${dir}/slurmctld.pid" ] && kill -0 "$(cat "${dir}/slurmctld.pid")" 2>/dev/null; then
      wait_idle
      echo "export SLURM_CONF=${SLURM_CONF}"
      exit 0
    fi
    mkdir -p "${dir}"
    write_config
    start_munge
    add_hosts
    slurmctld -c -f "${SLURM_CONF}"  # -c: a fresh cluster, no jobs from an earlier run
    for node in "${nodes[@]}"; do
      slurmd -f "${SLURM_CONF}" -N "${node}"
    done
    wait_idle
    echo "export SLURM_CONF=${SLURM_CONF}"
    ;;
  down)
    if [ -f "${SLURM_CONF}" ] && command -v scancel >/dev/null; then
      scancel --quiet --partition=debug 2>/dev/null || true
    fi
    for node in "${nodes[@]}"; do stop_pidfile "${dir}/slurmd.${node}.pid"; done
    stop_pidfile "${dir}/slurmctld.pid"
    if [ -f "${dir}/munged.pidfile" ]; then
      stop_pidfile "$(cat "${dir}/munged.pidfile")"
      rm -f "${dir}/munged.pidfile"
    fi
    remove_hosts
    ;;
  status)
    sinfo -N
    squeue
    ;;
  *)
    echo "usage: slurm/local_cluster.sh up|down|status [DIR]" >&2
    exit 2
    ;;
esac

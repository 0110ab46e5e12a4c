# Shared by launch/train.slurm and launch/eval.slurm; `dsum submit` inlines it into the scripts it renders.
#
# dsum_launch ARGS...  runs `accelerate launch -m dsum ARGS` once per node (one srun task per node),
#                      and forwards the preemption warning (SIGUSR1) to dsum's processes;
# dsum_finish          prints the wall time and requeues the job if that warning came.
#
# Settings, from the environment (the cluster's own go in DSUM_ENV_FILE or in sbatch options):
#   DSUM_ACCELERATE_CONFIG  Accelerate config (default accelerate_configs/multi_node_ddp.yaml)
#   DSUM_ENV_FILE           sourced first: module loads, a virtual environment, NCCL_* variables
#   DSUM_PORT               rendezvous port on the first node (default 29500)
#   DSUM_PROCS_PER_NODE     processes per node; default: the GPUs SLURM gives each node
#   DSUM_LOG_DIR            where per-node and per-rank logs go (default slurm-logs)
#   DSUM_MAX_REQUEUES       requeue at most this many times (default 20)

dsum_started=$(date +%s)
if [[ -n "${DSUM_ENV_FILE:-}" ]]; then
  # shellcheck disable=SC1090
  source "$DSUM_ENV_FILE"
fi
: "${SLURM_JOB_ID:?submit this script with sbatch}"

dsum_config=${DSUM_ACCELERATE_CONFIG:-accelerate_configs/multi_node_ddp.yaml}
dsum_port=${DSUM_PORT:-29500}
dsum_nodes=$SLURM_JOB_NUM_NODES
dsum_procs_per_node=${DSUM_PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
if [[ -z "$dsum_procs_per_node" ]]; then
  echo "dsum: error: no GPUs in this allocation; ask for --gpus-per-node, or set DSUM_PROCS_PER_NODE" >&2
  exit 2
fi
dsum_main_ip=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
dsum_logs=${DSUM_LOG_DIR:-slurm-logs}/job-$SLURM_JOB_ID-run-${SLURM_RESTART_COUNT:-0}
dsum_preempted=0
dsum_status=0
mkdir -p "$dsum_logs"

dsum_on_usr1() {
  dsum_preempted=1
  echo "dsum: SIGUSR1 (time limit near, or preemption): the processes save at the next step and stop"
  # Every process of the job's steps, not this shell; if that fails, the job still ends at its limit.
  scancel --signal=USR1 "$SLURM_JOB_ID" || echo "dsum: scancel could not pass SIGUSR1 on" >&2
}

dsum_on_term() {
  echo "dsum: SIGTERM: the job is ending; the processes save at the next step if there is time"
}

dsum_launch() {
  echo "dsum: job $SLURM_JOB_ID, run ${SLURM_RESTART_COUNT:-0}: $dsum_nodes node(s) x $dsum_procs_per_node" \
       "process(es), rendezvous $dsum_main_ip:$dsum_port, logs in $dsum_logs"
  trap dsum_on_usr1 USR1
  trap dsum_on_term TERM
  # One launcher per node. The launchers ignore SIGUSR1, which only dsum's own processes act on.
  srun --kill-on-bad-exit=1 --nodes="$dsum_nodes" --ntasks-per-node=1 --output="$dsum_logs/node-%n.log" \
    bash -c 'trap "" USR1; exec accelerate launch --config_file "$1" --num_machines "$2" \
               --num_processes "$(( $2 * $3 ))" --machine_rank "$SLURM_NODEID" \
               --main_process_ip "$4" --main_process_port "$5" --log_dir "$6" --tee 3 -m dsum "${@:7}"' \
    node-launcher "$dsum_config" "$dsum_nodes" "$dsum_procs_per_node" "$dsum_main_ip" "$dsum_port" \
    "$dsum_logs/ranks" "$@" &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    wait "$pid" || true  # a trapped signal ends `wait` early: wait again
  done
  wait "$pid" || dsum_status=$?
}

dsum_finish() {
  echo "dsum: wall time $(( $(date +%s) - dsum_started )) s, exit status $dsum_status"
  if (( dsum_preempted )); then
    if (( ${SLURM_RESTART_COUNT:-0} < ${DSUM_MAX_REQUEUES:-20} )); then
      echo "dsum: requeueing job $SLURM_JOB_ID; it continues from its last checkpoint"
      scontrol requeue "$SLURM_JOB_ID"
    else
      echo "dsum: requeued ${DSUM_MAX_REQUEUES:-20} times already; not again" >&2
    fi
  fi
  exit "$dsum_status"
}

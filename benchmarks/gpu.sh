#!/usr/bin/env bash
# One GPU call that tells where dsum's time goes and how far it is from its goals, on an offline GPU
# machine with torch installed (bring the other wheels and the data, see benchmarks/README.md):
#
#   benchmarks/gpu.sh WHEELS_DIR DATA_DIR OUT_DIR [profile|goals|all]
#
# profile  the three ways on flan-t5-base (a few minutes), with torch.profiler over a few timed steps of
#          each (OUT_DIR/profile/: top operators, the GPU's busy share, the host's syncs and launches)
# goals    dsum alone on the GPU goals' workloads (BENCHMARKS.md), as benched, then with train.compile
# all      both (the default)
#
# Every step runs under its own timeout, so one slow step cannot eat the others; logs and JSON go to
# OUT_DIR and a short table is printed last. DSUM_GPU_DEVICE=cpu runs the same steps on the CPU's small
# models with tiny sizes: a check of the plumbing, not a measurement.
set -uo pipefail
wheels=$1 data=$2 out=$3 what=${4:-all}
device=${DSUM_GPU_DEVICE:-cuda}
mkdir -p "$out"
if [ -n "$wheels" ] && ls "$wheels"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/dsum-site "$wheels"/*.whl || exit 1
  export PYTHONPATH=/tmp/dsum-site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python=${PYTHON:-python3}
# The profile is about training: a fifth of the test dialogues keeps its evaluation short. On the CPU:
# the small models, and sizes that take seconds.
profile_sizes=(--eval-dialogues 100 --notebook-rows 20) goals_sizes=() t5=flan-t5-base compiled=flan-t5-base
if [ "$device" = cpu ]; then  # compiling a whole CPU epoch of T5 takes minutes: the Llama's few steps instead
  profile_sizes=(--train-steps 2 --eval-dialogues 4 --notebook-rows 2) goals_sizes=(--train-steps 2 --eval-dialogues 4)
  t5=t5 compiled=llama
fi

step() {  # step NAME SECONDS COMMAND...: run it under its timeout, its output in OUT_DIR/NAME.log
  local name=$1 seconds=$2
  shift 2
  local started=$SECONDS
  timeout --kill-after=10 "$seconds" "$@" >"$out/$name.log" 2>&1
  local status=$?
  echo "$name: exit $status after $((SECONDS - started)) s" | tee -a "$out/steps.txt"
}

"$python" -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))" \
  | tee "$out/machine.txt"
if [ "$what" = profile ] || [ "$what" = all ]; then
  step bench-profile 420 "$python" -m dsum bench --device "$device" --models "$t5" --data "$data" \
    --profile "$out/profile" --json "$out/bench-profile.json" "${profile_sizes[@]}"
fi
if [ "$what" = goals ] || [ "$what" = all ]; then
  step goals 330 "$python" -m dsum bench --goals --device "$device" --data "$data" --json "$out/goals.json" \
    --profile "$out/profile-goals" "${goals_sizes[@]}"
  step goals-compiled 180 "$python" -m dsum bench --goals --device "$device" --models "$compiled" --data "$data" \
    --json "$out/goals-compiled.json" --dsum train.compile=true "${goals_sizes[@]}"
fi
echo
cat "$out/steps.txt"
for f in "$out"/bench-profile.json "$out"/goals.json "$out"/goals-compiled.json; do
  [ -f "$f" ] && "$python" - "$f" <<'EOF'
import json, sys
results = json.load(open(sys.argv[1]))
print(sys.argv[1].rsplit("/", 1)[-1], results.get("commit"), results["date"])
for name, model in results.get("models", {}).items():
    print(f"  {name}: train real tokens/s", {w: round(v["real_tokens_per_second"]) for w, v in model["train"].items()})
for name, workload in results.get("workloads", {}).items():
    figures = {k: v for k, v in workload["figures"].items() if k in
               ("train_seconds", "real_tokens_per_second", "mfu", "eval_seconds", "peak_gpu_reserved_gib",
                "max_tokens_per_batch", "compiled_graphs")}
    print(f"  {name}: {figures}")
EOF
done
[ -f "$out/profile/summary.json" ] && "$python" - "$out/profile/summary.json" <<'EOF'
import json, sys
for name, run in json.load(open(sys.argv[1]))["runs"].items():
    print(f"profile {name}: {run['mean_step_ms']} ms a step, GPU busy {run['device_busy_share']}, "
          f"kernels a step {run['kernels_per_step']}")
EOF
exit 0

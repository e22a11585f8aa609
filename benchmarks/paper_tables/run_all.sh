#!/usr/bin/env bash
# All five paper tables on a 2-core CPU: two lanes of single-threaded jobs (faster than one 2-thread job).
# Finished training runs and evaluations are cached under runs/paper_tables/, so a re-run only redoes what
# is missing. Tables and plots go to docs/results/. PAKHSH_BENCH=smoke runs the same scripts in seconds.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1
D=benchmarks/paper_tables
start=$(date +%s)

python "$D/train_runs.py" --lane 0 --lanes 2 & a=$!
python "$D/train_runs.py" --lane 1 --lanes 2 & b=$!
wait "$a"; wait "$b"
echo "training done after $(( $(date +%s) - start )) s"

# Two workers split all sampling/NLL evaluations; the grids of table 4 need no cache and run beside them.
python "$D/eval_all.py" & a=$!
( python "$D/table4_grids.py" && python "$D/eval_all.py" ) & b=$!
wait "$a"; wait "$b"
echo "evaluations done after $(( $(date +%s) - start )) s"

for t in table1_losses table2_steps table3_schedules table5_scaling; do
  python "$D/$t.py"
done
echo "all tables done after $(( $(date +%s) - start )) s"

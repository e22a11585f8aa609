"""Every cached evaluation of tables 1, 2, 3 and 5 as one job list, costliest first; run it in several processes
side by side and they split the work (lock files), e.g. on 2 cores:

    OMP_NUM_THREADS=1 python benchmarks/paper_tables/eval_all.py & OMP_NUM_THREADS=1 python ... eval_all.py

The table scripts then only read the cached results (and compute whatever is still missing themselves).
"""

from __future__ import annotations

import common as c
import table1_losses
import table2_steps
import table3_schedules
import table5_scaling


def main() -> None:
    c.setup()
    jobs = {}
    for table in (table1_losses, table2_steps, table3_schedules, table5_scaling):
        jobs.update({job.path: job for job in table.jobs().values()})  # shared evaluations appear once
    c.log(f"{len(jobs)} evaluations")
    c.run_jobs(list(jobs.values()))
    c.log("all evaluations done")


if __name__ == "__main__":
    main()

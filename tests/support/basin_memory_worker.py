"""estimate_basin at large D with a trivial loss |δ|²; prints peak memory and overheads as JSON.

    python basin_memory_worker.py D N_SAMPLES [BATCH_SIZE]

Peak RSS comes from ``resource.getrusage`` (kilobytes on Linux); the start is the resident
set after the imports, before the anchor is made; the time inside the loss is measured around every
call, so the rest of the wall time is the estimator's own overhead.
"""

import json
import resource
import sys
import time

import torch

from tyche.basin.core import estimate_basin
from tyche.basin.options import BasinOptions


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def resident_bytes() -> int:
    """The resident set now (/proc/self/statm), not the peak so far: the imports' transient
    peak must not hide what the run adds."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:  # not Linux: the peak so far is the best start we have
        return peak_bytes()


def main() -> None:
    dim, n = int(sys.argv[1]), int(sys.argv[2])
    batch = int(sys.argv[3]) if len(sys.argv) > 3 else None
    start = resident_bytes()
    anchor = torch.randn(dim, generator=torch.Generator().manual_seed(0)) * 0.02
    inside = [0.0, 0.0, 0]  # wall, cpu, rows

    def loss(offsets: torch.Tensor) -> torch.Tensor:  # |δ|²: no copy of the offsets
        t0, c0 = time.perf_counter(), time.process_time()
        out = torch.linalg.vecdot(offsets, offsets)
        inside[0] += time.perf_counter() - t0
        inside[1] += time.process_time() - c0
        inside[2] += offsets.shape[0]
        return out

    t0 = time.perf_counter()
    cpu0 = time.process_time()
    res = estimate_basin(loss, anchor, BasinOptions(cutoff=1e-2, n_samples=n, batch_size=batch),
                         progress=False)  # fmt: skip
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    print(
        json.dumps(
            {
                "dim": dim,
                "n_samples": n,
                "batch_size": res.settings["batch_size"],
                "start_bytes": start,
                "peak_bytes": peak_bytes(),
                "wall_s": wall,
                "cpu_s": cpu,
                "loss_s": inside[0],
                "loss_rows": inside[2],
                "evals_per_direction": res.evals_per_direction,
                "overhead_s_per_direction": (wall - inside[0]) / n,
                "overhead_cpu_s_per_direction": (cpu - inside[1]) / n,
                "max_rel_delta_error": float(((res.deltas - 1e-2) / 1e-2).abs().max()),
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()

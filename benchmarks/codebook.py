"""Codebook features: training step time with and without codebooks, cache and search time.

    python benchmarks/codebook.py [--reps 9] [--threads 1]

Model: the TokFSM layout of ``zoo:tokfsm`` (GPT-2, or GPT-NeoX with ``--arch gpt_neox``;
4 layers, width 128, 4 heads, MLP 512,
vocabulary 11; k = 1 codebooks of 256 codes on every head and MLP output), batches of the
zoo recipe (16 walks of 64 tokens). One training step is forward + backward + AdamW, timed
in CPU seconds of this process (``time.process_time``: with one thread, the wall time less
the time other work on the machine takes the core away). The two models run interleaved on
the same batches, so load from other work hits both alike; the ratio of the medians is the
figure. Then a cache of 256 walks is built and searched.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from tyche.codebook.cache import build_cache
from tyche.codebook.code_search import search
from tyche.codebook.model import CodebookModel, attach
from tyche.codebook.tokfsm import FSM
from tyche.codebook.train import TrainConfig, _optimizer, compute_gradients
from tyche.zoo.tokfsm import TokFSMConfig, build_base


def step_times(reps: int, batch_size: int, seq_len: int, arch: str) -> dict[str, list[float]]:
    cfg = TokFSMConfig(arch=arch)
    fsm = FSM.random(cfg.n_states, cfg.n_edges, seed=0)
    plain = CodebookModel(build_base(cfg, fsm))
    plain._rehook()
    coded = attach(build_base(cfg, fsm), list(cfg.sites), cfg.num_codes, cfg.k, seed=0)
    models = {"without codebooks": plain, "with codebooks": coded}
    opts = {name: _optimizer(m, TrainConfig()) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    g = torch.Generator().manual_seed(0)
    for rep in range(reps + 2):  # the first two are warm-up
        batch = fsm.batch(batch_size, seq_len, g)
        for name, model in models.items():
            model.train()
            start = time.process_time()
            opts[name].zero_grad(set_to_none=True)
            compute_gradients(model, batch)
            opts[name].step()
            if rep >= 2:
                times[name].append(time.process_time() - start)
    return times


def cache_and_search(reps: int, arch: str) -> dict[str, float]:
    cfg = TokFSMConfig(arch=arch)
    fsm = FSM.random(cfg.n_states, cfg.n_edges, seed=0)
    model = attach(build_base(cfg, fsm), list(cfg.sites), cfg.num_codes, cfg.k, seed=0).eval()
    model.tokenizer = fsm.tokenizer()
    rows = fsm.batch(256, 64, torch.Generator().manual_seed(1))
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        cache = build_cache(model, rows, tmp, neurons=True, copy_model=False, progress=False)
        out["build cache (256 x 64 tokens, 8 codebooks, neurons)"] = time.perf_counter() - start
        for label, neurons in (("search, codes only", False), ("search + neuron baseline", True)):
            runs = []
            for _ in range(reps):
                start = time.perf_counter()
                search(cache, r"(4)", parity="odd", top=20, neurons=neurons)
                runs.append(time.perf_counter() - start)
            out[label] = statistics.median(runs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=9, help="timed steps per model (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    recipe = TokFSMConfig()
    parser.add_argument("--batch_size", type=int, default=recipe.batch_size, help="walks per step")
    parser.add_argument("--seq_len", type=int, default=recipe.seq_len, help="tokens per walk")
    parser.add_argument(
        "--arch", choices=("gpt2", "gpt_neox"), default=recipe.arch, help="base model family"
    )
    parser.add_argument("--no_cache", action="store_true", help="time the training steps only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    times = step_times(args.reps, args.batch_size, args.seq_len, args.arch)
    base = statistics.median(times["without codebooks"])
    print(
        f"TokFSM {args.arch} training step, batch {args.batch_size} x {args.seq_len} tokens, "
        f"{args.threads} thread(s), median of {args.reps}:"
    )
    print("| model | CPU ms/step | steps/s | ratio |\n| --- | --- | --- | --- |")
    for name, values in times.items():
        med = statistics.median(values)
        print(f"| {name} | {1000 * med:.0f} | {1 / med:.2f} | {med / base:.2f} |")
    if args.no_cache:
        return
    print("\n| operation | seconds |\n| --- | --- |")
    for label, seconds in cache_and_search(args.reps, args.arch).items():
        print(f"| {label} | {seconds:.3f} |")


if __name__ == "__main__":
    main()

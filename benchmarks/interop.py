"""Benchmark the frameworks' paths: the same model as HF, as TransformerLens, as nnsight.

Default (``python benchmarks/interop.py``): ``zoo:shakespeare-lm`` converted to a
TransformerLens ``HookedTransformer`` by ``tyche.frameworks.hooked_from_hf`` (unprocessed
weights) and wrapped by ``nnsight.NNsight``; 32 × 128 tokens of ``zoo:shakespeare``.

Reported, interleaved over ``--repeats`` rounds after one warm-up round (medians):

* the conversion's time and the largest logit difference HF against TransformerLens;
* one forward pass on all tokens, HF against ``HookedLM`` (the TransformerLens einsums);
* a causal basis at ``resid_pre.1`` (k = 4, logit lens) on each of the three, its seconds and
  its energies (nnsight is the HF module itself, so it equals HF exactly).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def _timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="zoo:shakespeare-lm")
    parser.add_argument("--n_sequences", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    from nnsight import NNsight

    from tyche.causal import CausalOptions, extract_causal_bases
    from tyche.cli.inputs import TextRows
    from tyche.frameworks import HookedLM, hooked_from_hf
    from tyche.zoo import resolve_model
    from tyche.zoo.catalogue import get_entry

    zoo = resolve_model(args.model)
    hf = zoo.model.eval()
    rows = TextRows(n_sequences=args.n_sequences, seq_len=args.seq_len, seed=0).load(
        zoo.tokenizer, zoo.default_data
    )
    tokens = rows.tokens
    start = time.perf_counter()
    hooked = hooked_from_hf(str(get_entry(args.model).path), hf, zoo.tokenizer)
    convert_s = time.perf_counter() - start
    tl = HookedLM(hooked)
    with torch.no_grad():
        gap = (hf(**tokens).logits - tl(**tokens).logits).abs().max().item()
        forward: dict[str, list[float]] = {"hf": [], "tl": []}
        for _ in range(args.repeats):
            for name, model in (("hf", hf), ("tl", tl)):
                forward[name].append(_timed(lambda m=model: m(**tokens), 1)[0])
        hf_s, tl_s = (statistics.median(forward[n]) for n in ("hf", "tl"))
    report = {"convert_s": convert_s, "max_logit_gap": gap, "forward_s": {"hf": hf_s, "tl": tl_s}}
    options = CausalOptions(max_iter=50)
    runs = {"hf": (hf, "resid_pre.1"), "tl": (hooked, "blocks.1.hook_resid_pre"),
            "nnsight": (NNsight(hf), "resid_pre.1")}  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in runs}
    energies: dict[str, list[float]] = {}
    for rep in range(args.repeats + 1):  # interleaved, so that the load falls on all three
        for name, (model, site) in runs.items():
            start = time.perf_counter()
            bases = extract_causal_bases(
                model, tokens, args.k, sites=[site], options=options, progress=False
            )
            if rep:  # round 0 warms the caches up and is not counted
                times[name].append(time.perf_counter() - start)
            energies[name] = next(iter(bases.values())).energies.tolist()
    report["causal"] = {
        name: {"seconds": statistics.median(times[name]), "energies": energies[name]}
        for name in runs
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

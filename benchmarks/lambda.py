"""λ two ways on the same model, loss and data: Tyche's basin-volume slope against devinterp's
SGLD estimate of the local learning coefficient.

    pip install -c constraints.txt -e '.[llc]'        # devinterp
    python benchmarks/lambda.py [--cases calibration,exact,digits,lm] [--json out.json]
    python benchmarks/lambda.py --cases calibration      # the exact suite alone, no devinterp

Both measure the same λ: the exponent in Vol{w : K(w) < ε} ∝ ε^λ for the loss K(w) around the
anchor w0 (K(w0) = 0). The loss is the same function for both:

* exact cases, D = a + b: K(w) = Σ_{i<a} w_i² + Σ_{i≥a} w_i⁴, λ = a/2 + b/4 exactly;
* zoo:digits-mlp: K = mean over the 1,024 training inputs of KL(p_w0 ‖ p_w), nats;
* zoo:shakespeare-lm: K = mean over 8 × 63 tokens of Shakespeare of KL(p_w0 ‖ p_w) (the size
  of `tyche basin`'s default evaluation set; SGLD's batch is then all 8 sequences).

Tyche: ``estimate_basin(..., cutoffs=[...])`` and ``learning_coefficient`` over the three
smallest cutoffs (bootstrap interval over directions). devinterp (``devinterp.slt.llc.llc``):
λ̂ = nβ (E_SGLD[K] − K(w0)) with its documented settings (v2 README: nβ = 30, 4 chains × 200
draws, batch 32, no burn-in) and its own calibration advice (the SGLD calibration notebook):
sweep the step size over 1e-5, 1e-4, 1e-3 and the localization γ over 1, 10, 100; keep the
largest step whose loss traces converge, do not start with a spike and stay above the
initial loss, and with it the smallest γ that does (when none converges within the sweep's
draws, the first, in that order, that is only still converging). The interval is
mean ± 1.96 sd/√chains over chains.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from tyche.basin import BasinOptions, estimate_basin, learning_coefficient
from tyche.basin.loss import ModelLoss

N_BETA = 30.0  # devinterp README's example value (v2 has no default)
CHAINS, DRAWS, BATCH = 4, 200, 32  # devinterp v2 SamplerConfig defaults
SWEEP_LR = (1e-5, 1e-4, 1e-3)
SWEEP_GAMMA = (1.0, 10.0, 100.0)
SWEEP_CHAINS, SWEEP_DRAWS = 2, 100


@dataclass
class Row:
    case: str
    truth: float | None
    tyche: float
    tyche_ci: tuple[float, float]
    tyche_s: float
    tyche_note: str
    devinterp: float
    devinterp_ci: tuple[float, float]
    devinterp_s: float
    devinterp_settings: str


# ----------------------------------------------------------------------------- devinterp
def _dataset(rows: list[list[int]]):
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": rows}).with_format("torch")


def _sgld(model, dataset, loss_fn, lr, gamma, chains, draws, seed=100):
    from devinterp.slt.llc import llc

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = llc(model=model, dataset=dataset, observables={}, lr=lr, n_beta=N_BETA,
                  loss_fn=loss_fn, num_chains=chains, num_draws=draws,
                  batch_size=min(BATCH, len(dataset)),
                  localization=gamma, init_seed=seed, output_path=f"{tmp}/s.zarr")  # fmt: skip
        trace = torch.as_tensor(out["loss_trace"].values).double()  # (chain, step)
        init = float(out["init_loss"].values)
        per_chain = torch.as_tensor(out["llc_per_chain"].values).double()
    return per_chain, trace - init


def _healthy(excess: torch.Tensor) -> tuple[bool, str]:
    """The calibration notebook's checks on loss traces (excess loss over the initial one)."""
    mean = excess.mean(0)
    n = mean.numel()
    if not torch.isfinite(excess).all():
        return False, "diverged"
    late = mean[n // 2 :].mean()
    if late <= 0 or (mean < 0).double().mean() > 0.1:
        return False, "dips below the initial loss"
    if mean[: max(1, n // 10)].max() > 2 * late:
        return False, "initial spike"
    q3, q4 = mean[n // 2 : 3 * n // 4].mean(), mean[3 * n // 4 :].mean()
    if abs(q4 - q3) > 0.2 * abs(q4):
        return False, "not converged"
    return True, "ok"


def devinterp_lambda(model, dataset, loss_fn) -> tuple[float, tuple[float, float], float, str]:
    t0 = time.perf_counter()
    chosen, notes = None, []
    for lr in sorted(SWEEP_LR, reverse=True):
        for gamma in SWEEP_GAMMA:
            _, excess = _sgld(model, dataset, loss_fn, lr, gamma, SWEEP_CHAINS, SWEEP_DRAWS)
            ok, why = _healthy(excess)
            notes.append(f"lr {lr:g} γ {gamma:g}: {why}")
            if ok:
                chosen = (lr, gamma)
                break
        if chosen:
            break
    if chosen is None:  # the advice's order again, settling for traces still converging
        slow = [n for n in notes if n.endswith("not converged")]
        if slow:
            lr, gamma = (float(v) for v in slow[0].split(":")[0].split()[1::2])
            chosen = (lr, gamma)
            notes.append(f"none passed: lr {lr:g} γ {gamma:g}, the first still converging")
        else:
            chosen = (min(SWEEP_LR), max(SWEEP_GAMMA))
            notes.append("none passed: the most conservative setting used")
    sweep_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    per_chain, _ = _sgld(model, dataset, loss_fn, *chosen, CHAINS, DRAWS)
    seconds = time.perf_counter() - t0
    mean, sd = float(per_chain.mean()), float(per_chain.std())
    half = 1.96 * sd / math.sqrt(CHAINS)
    settings = (f"lr {chosen[0]:g}, γ {chosen[1]:g}, nβ {N_BETA:g} (sweep {sweep_s:.0f} s: "
                f"{'; '.join(notes)})")  # fmt: skip
    return mean, (mean - half, mean + half), seconds, settings


# ----------------------------------------------------------------------------- tyche
def tyche_lambda(loss, anchor, cutoffs, n_samples, sigma, preconditioner=None):
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        options = BasinOptions(cutoffs=cutoffs, n_samples=n_samples, sigma=sigma)
        curve = estimate_basin(loss, anchor, options, preconditioner=preconditioner,
                               progress=False)  # fmt: skip
    seconds = time.perf_counter() - t0
    lam = learning_coefficient(curve)
    slopes = " → ".join(f"{s:,.1f}" for s in lam.local_slopes)
    note = f"{'straight' if lam.straight else 'NOT straight'} ({slopes}); " \
           f"{curve.evals_per_direction:.2f} evals/dir"  # fmt: skip
    return lam, seconds, note


# ----------------------------------------------------------------------------- cases
class Point(nn.Module):
    """A model that is just its parameter vector w (the exact cases)."""

    def __init__(self, dim: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dim, dtype=torch.float64))


def exact_case(a: int, b: int, pre: bool = False) -> Row:
    dim = a + b

    def k_of(w: torch.Tensor) -> torch.Tensor:  # w (..., D)
        return (w[..., :a] ** 2).sum(-1) + (w[..., a:] ** 4).sum(-1)

    pre_vec = None
    if pre:  # Hessian diagonal (2 on the quadratic coordinates, 0 on the quartic) + eps 1e-2
        hess = torch.cat([torch.full((a,), 2.0), torch.zeros(b)]).double()
        pre_vec = 1.0 / (hess.sqrt() + 1e-2)
    lam, secs, note = tyche_lambda(k_of, torch.zeros(dim, dtype=torch.float64),
                                   [1e-8, 1e-7, 1e-6, 1e-5, 1e-4], 256, 1.0, pre_vec)  # fmt: skip
    model = Point(dim)
    data = _dataset([[0, 0]] * 1024)

    def loss_fn(m, input_ids):
        return k_of(m.w).expand(input_ids.shape[0], 1)

    d, d_ci, d_s, settings = devinterp_lambda(model, data, loss_fn)
    name = f"exact ({a}, {b})" + (", Hessian-diagonal preconditioner" if pre else "")
    return Row(name, a / 2 + b / 4, lam.value, (lam.ci_low, lam.ci_high), secs, note, d, d_ci,
               d_s, settings)  # fmt: skip


def digits_case() -> Row:
    from tyche.zoo import load_digits_mlp

    mlp = load_digits_mlp()
    loss = ModelLoss(mlp.model, mlp.x_train)
    lam, secs, note = tyche_lambda(loss, loss.anchor, [1e-6, 1e-5, 1e-4, 1e-3, 1e-2], 100,
                                   mlp.prior_sigma)  # fmt: skip
    x = mlp.x_train
    with torch.no_grad():
        anchor_logp = mlp.model(x).log_softmax(-1)
    data = _dataset([[i, i] for i in range(len(x))])

    def loss_fn(m, input_ids):  # per-example KL(p_w0 ‖ p_w): (batch, 1)
        i = input_ids[:, 0]
        logq = m(x[i]).log_softmax(-1)
        p = anchor_logp[i]
        return (p.exp() * (p - logq)).sum(-1, keepdim=True)

    d, d_ci, d_s, settings = devinterp_lambda(mlp.model, data, loss_fn)
    note += f"; D/2 = {loss.n_params / 2:,.0f}"
    return Row("zoo:digits-mlp (D = 4,810)", None, lam.value, (lam.ci_low, lam.ci_high), secs,
               note, d, d_ci, d_s, settings)  # fmt: skip


def shakespeare_case(n_seq: int = 8, seq_len: int = 64) -> Row:
    from tyche.data import chunk_and_tokenize
    from tyche.zoo import resolve_model, resolve_texts

    zm = resolve_model("zoo:shakespeare-lm")
    tokens = chunk_and_tokenize(resolve_texts("zoo:shakespeare"), zm.tokenizer,
                                max_seq_len=seq_len, chunking=True, max_examples=n_seq)  # fmt: skip
    ids = tokens["input_ids"][:n_seq]
    where = torch.ones_like(ids, dtype=torch.bool)
    where[:, -1] = False  # devinterp's per-token loss covers positions 0..T-2
    loss = ModelLoss(zm.model, {"input_ids": ids}, where=where)
    lam, secs, note = tyche_lambda(loss, loss.anchor, [1e-6, 1e-5, 1e-4, 1e-3, 1e-2], 32, None)
    with torch.no_grad():  # the anchor's log-probs, once; looked up by sequence
        anchor_logp = zm.model(ids).logits[:, :-1].log_softmax(-1)
    row_of = {tuple(r): i for i, r in enumerate(ids.tolist())}

    def loss_fn(m, input_ids):  # per-token KL(p_w0 ‖ p_w): (batch, T-1)
        p = anchor_logp[[row_of[tuple(r)] for r in input_ids.tolist()]]
        logq = m(input_ids).logits[:, :-1].log_softmax(-1)
        return (p.exp() * (p - logq)).sum(-1)

    d, d_ci, d_s, settings = devinterp_lambda(zm.model, _dataset(ids.tolist()), loss_fn)
    note += f"; D/2 = {loss.n_params / 2:,.0f}"
    return Row(f"zoo:shakespeare-lm (D = {loss.n_params:,})", None, lam.value,
               (lam.ci_low, lam.ci_high), secs, note, d, d_ci, d_s, settings)  # fmt: skip


# ----------------------------------------------------------------------------- calibration
@dataclass
class CalibrationRow:
    case: str
    dim: int
    exact_log_p: list[float]
    exact_slope: float
    naive_log_p: list[float]
    naive_lambda: float
    naive_verdict: str
    naive_evals: int
    adapt_log_p: list[float]
    adapt_lambda: float
    adapt_verdicts: list[str]
    adapt_lambda_verdict: str
    adapt_evals: int
    seconds: float


def calibration_case(case, n_samples: int, adapt: int, cutoffs) -> CalibrationRow:
    """One case of `tyche.basin.calibration.SUITE`: naive (the same number of directions in
    all, (adapt + 1)·n_samples) and adaptive against the exact values, σ = 1."""
    anchor = case.anchor(torch.float64)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        naive = estimate_basin(case.loss, anchor, BasinOptions(
            cutoffs=cutoffs, sigma=1.0, n_samples=(adapt + 1) * n_samples), progress=False)
        adapted = estimate_basin(case.loss, anchor, BasinOptions(
            cutoffs=cutoffs, sigma=1.0, n_samples=n_samples, adapt=adapt), progress=False)
    seconds = time.perf_counter() - t0
    lam_n, lam_a = learning_coefficient(naive), learning_coefficient(adapted)
    return CalibrationRow(
        case=case.name, dim=case.dim,
        exact_log_p=[case.log_prob(c) for c in cutoffs],
        exact_slope=case.fitted_slope(cutoffs),
        naive_log_p=naive.log_probs.tolist(), naive_lambda=lam_n.value,
        naive_verdict=lam_n.verdict,
        naive_evals=int(naive.n_evals.sum()) + naive.settings["pilot_evals"] + 1,
        adapt_log_p=adapted.log_probs.tolist(), adapt_lambda=lam_a.value,
        adapt_verdicts=list(adapted.verdicts), adapt_lambda_verdict=lam_a.verdict,
        adapt_evals=adapted.settings["adapt_loss_evals"], seconds=seconds,
    )  # fmt: skip


def calibration_table(rows: list[CalibrationRow]) -> str:
    """Markdown: the worst relative error of log P over the cutoffs, λ against the exact
    slope at the fitted cutoffs, and the verdicts."""
    lines = [
        "| case | D | exact log P (smallest cutoff) | naive: worst log P error, λ, verdict "
        "| adaptive: worst log P error, λ, verdict | exact slope | loss evals naive / adaptive |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    def worst(got: list[float], exact: list[float]) -> float:
        return max(abs(g - e) / abs(e) for g, e in zip(got, exact))

    for r in rows:
        verdicts = "/".join(dict.fromkeys(r.adapt_verdicts))
        err_n, err_a = worst(r.naive_log_p, r.exact_log_p), worst(r.adapt_log_p, r.exact_log_p)
        lines.append(
            f"| {r.case} | {r.dim} | {r.exact_log_p[0]:,.2f} | {100 * err_n:.1f}%, "
            f"{r.naive_lambda:.2f}, {r.naive_verdict} | {100 * err_a:.1f}%, "
            f"{r.adapt_lambda:.2f}, {r.adapt_lambda_verdict} (cutoffs: {verdicts}) | "
            f"{r.exact_slope:.3f} | {r.naive_evals:,} / {r.adapt_evals:,} |"
        )
    return "\n".join(lines)


def table(rows: list[Row]) -> str:
    head = ("| case | truth | Tyche λ (basin slope) | 95% CI | time | devinterp λ̂ (SGLD) | 95% CI "
            "| time |")  # fmt: skip
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        truth = "—" if r.truth is None else f"{r.truth:g}"
        lines.append(
            f"| {r.case} | {truth} | {r.tyche:,.1f} | [{r.tyche_ci[0]:,.1f}, {r.tyche_ci[1]:,.1f}]"
            f" | {r.tyche_s:.1f} s | {r.devinterp:,.1f} | [{r.devinterp_ci[0]:,.1f}, "
            f"{r.devinterp_ci[1]:,.1f}] | {r.devinterp_s:.1f} s |"
        )
    lines.append("")
    for r in rows:
        lines.append(f"- {r.case}: Tyche {r.tyche_note}; devinterp {r.devinterp_settings}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="calibration,exact,digits,lm",
                        help="comma-separated: calibration (the exact suite, naive against "
                             "adaptive, no devinterp), exact, digits, lm")  # fmt: skip
    parser.add_argument("--n_samples", type=int, default=200,
                        help="calibration: directions per adaptive round")
    parser.add_argument("--adapt", type=int, default=3, help="calibration: adaptive rounds")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    cases = {c.strip() for c in args.cases.split(",")}
    known = {"calibration", "exact", "digits", "lm"}
    if not cases <= known:
        parser.error(f"--cases: unknown {sorted(cases - known)}")
    torch.manual_seed(0)
    if "calibration" in cases:
        from tyche.basin.calibration import SUITE, SUITE_CUTOFFS

        cal = []
        for case in SUITE:
            n = args.n_samples * (5 if case.dim > 100 else 1)  # D = 1000: more rays than groups
            cal.append(calibration_case(case, n, args.adapt, list(SUITE_CUTOFFS)))
            print(calibration_table(cal[-1:]).splitlines()[2], flush=True)
        print(calibration_table(cal))
        if args.json:
            with open(args.json.replace(".json", "-calibration.json"), "w") as f:
                json.dump([vars(r) for r in cal], f, indent=1)
        cases.discard("calibration")
        if not cases:
            return
    runs = []
    if "exact" in cases:
        runs += [lambda: exact_case(100, 0), lambda: exact_case(0, 100),
                 lambda: exact_case(50, 50), lambda: exact_case(50, 50, pre=True)]  # fmt: skip
    if "digits" in cases:
        runs.append(digits_case)
    if "lm" in cases:
        runs.append(shakespeare_case)
    rows = []
    for make in runs:
        rows.append(make())
        print(table(rows[-1:]).splitlines()[2], flush=True)  # each row as soon as it is done
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.__dict__ for r in rows], f, indent=1)


if __name__ == "__main__":
    main()

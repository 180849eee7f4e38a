# ruff: noqa: E402 (each cell imports what it uses)

# %% [markdown]
# # Basin volume of the digits MLP
#
# How much of parameter space implements what a trained network does? `tyche.basin`
# estimates the log-probability that a parameter vector drawn from a Gaussian prior
# N(0, σ²I) lands in the *basin* of the trained parameters θ: the star-shaped region around θ
# where the model's outputs stay within a KL cutoff ε (nats, mean per example) of the trained
# model's. It samples directions, finds along each the radius where the KL reaches ε,
# integrates the prior exactly along that ray, and takes the log-mean-exp over directions.
#
# This tutorial measures the basin paper's MLP on sklearn's digits (`zoo:digits-mlp`,
# 64-64-10, D = 4,810 parameters, trained here in about a second): naive against
# Adam-preconditioned directions, the whole cutoff curve and the learning coefficient λ, and
# one basin per digit class. Everything is seeded; the page is this script's own output.

# %%
import torch

from tyche.basin import (
    BasinOptions,
    estimate_basin,
    learning_coefficient,
    model_loss,
    plot_cutoff_scan,
    plot_histogram,
)
from tyche.basin.preconditioners import build_preconditioner
from tyche.zoo import load_digits_mlp

torch.manual_seed(0)
mlp = load_digits_mlp()  # trained on first use, then read from the zoo cache
n_params = sum(p.numel() for p in mlp.model.parameters())
print(
    f"D = {n_params:,} parameters; train accuracy {mlp.train_accuracy:.3f}, "
    f"test accuracy {mlp.test_accuracy:.3f}"
)
print(f"prior sigma = {mlp.prior_sigma:.4f} (the training loss's L2 term as a Gaussian prior)")

# %% [markdown]
# ## Naive against Adam-preconditioned directions
#
# `model_loss` builds the batched loss the estimator needs: for offsets δ (B, D) it returns
# the mean KL (B,) between the model at θ + δ and at θ on the 1,024 training digits. A
# *preconditioner* p reshapes the directions (v = p ⊙ u, unit determinant) and the estimator
# importance-weights them, so every preconditioner estimates the same quantity; a good one
# (Adam's second moments, p ∝ 1/√v̂) draws directions closer to the basin's shape and gives a
# larger, tighter estimate. A search at the cutoffs 1e-5 … 1e-1 returns a `BasinCurve`: one
# search per direction covers all five.

# %%
loss = model_loss(mlp.model, mlp.x_train)
names = [name for name, _ in mlp.model.named_parameters()]
preconditioners = {
    "naive": None,
    "adam": build_preconditioner(
        "adam", mlp.model, mlp.x_train, names=names, optimizer_state=mlp.optimizer_state
    ),
}
cutoffs = [1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
options = BasinOptions(cutoffs=cutoffs, n_samples=32, sigma=mlp.prior_sigma, seed=0)
curves = {
    kind: estimate_basin(loss, loss.anchor, options, preconditioner=p, progress=False)
    for kind, p in preconditioners.items()
}
header = f"{'':6} {'cutoff':>7} {'log P (nats)':>13} {'95% interval':>22} {'ESS':>5} {'k̂':>6}"
print(header + "  verdict")
for kind, curve in curves.items():
    for res in curve.results:
        lo, hi = res.interval()
        print(
            f"{kind:6} {res.cutoff:7.0e} {res.log_prob:13.1f} [{lo:9.1f}, {hi:9.1f}] "
            f"{res.ess:5.1f} {res.khat:6.1f}  {res.verdict}"
        )

# %% [markdown]
# The log-probabilities are large negative numbers: the basin is a tiny part of the prior.
# Adam's directions give a higher estimate at every cutoff; since every estimate is an
# average of positive importance weights, a higher one is the better lower bound. The ESS
# (effective sample size) says how many directions carry the average, and the Pareto k̂
# (Vehtari et al., JMLR 2024) how heavy the weights' tail is: k̂ ≥ 0.7 gives the verdict
# "lower bound only". Here the ESS is about 1 and k̂ far above 0.7: with 32 directions in
# 4,810 dimensions the best direction dominates, so each figure is a lower bound rather than
# a converged mean (the basin paper's regime too); the interval is the bootstrap over
# directions and spans resampling noise only.
#
# ## The cutoff curve and the learning coefficient λ
#
# Near a minimum, log P(ε) ≈ λ ln ε + c: λ is the volume-scaling exponent (the learning
# coefficient of singular learning theory), D/2 at a regular minimum and less at a degenerate
# one. `learning_coefficient` fits it over the three smallest cutoffs, with a bootstrap
# interval over directions and a check that the curve is straight there.

# %%
fits = {kind: learning_coefficient(curve) for kind, curve in curves.items()}
for kind, lam in fits.items():
    print(f"{kind}: {lam.describe()}")
print(f"D/2 = {n_params / 2:,.0f}")
plot_cutoff_scan(
    cutoffs, {k: c.results for k, c in curves.items()}, n_params, "cutoff_scan.png", fits=fits
)

# %% [markdown]
# Both slopes lie within a few per cent of D/2 (λ/(D/2) is printed), and the fit says
# whether the local slopes still move across the fitted cutoffs. A slope near D/2 is a known
# limit of ray sampling rather than evidence of a regular minimum: along almost every
# direction the quadratic part of the loss wins at small cutoffs, so the sampled slope tends
# to D/2 even where λ is smaller ([BENCHMARKS](../../benchmarks.md) compares it with
# devinterp's SGLD estimate). The dotted line is the slope D/2.
#
# ## The spread of the per-direction estimates
#
# Each direction gives its own estimate; the result is their log-mean-exp. The histogram at
# ε = 1e-2 shows how much wider the naive directions spread, and why their mean is carried
# by a few of them.

# %%
at = {kind: curve.at(1e-2) for kind, curve in curves.items()}
plot_histogram(at, "histogram.png")
for kind, res in at.items():
    print(
        f"{kind}: per-direction estimates from {res.estimates.min():.1f} to "
        f"{res.estimates.max():.1f} nats; log-mean-exp {res.log_prob:.1f}"
    )

# %% [markdown]
# ## One basin per digit class
#
# `where=` restricts the KL to part of the data: a boolean mask over the examples. The model
# still reads every input; only the mean runs over the chosen examples. With the same
# directions (same seed) and the Adam preconditioner, each class gets its own basin: a
# larger basin means that behaviour survives more of the parameter perturbations.

# %%
per_class = BasinOptions(cutoff=1e-2, n_samples=16, sigma=mlp.prior_sigma, seed=0)
print(f"{'digit':>5} {'examples':>8} {'log P (nats)':>13} {'95% interval':>22}")
for digit in range(10):
    where = mlp.y_train == digit
    class_loss = model_loss(mlp.model, mlp.x_train, where=where)
    res = estimate_basin(
        class_loss,
        class_loss.anchor,
        per_class,
        preconditioner=preconditioners["adam"],
        progress=False,
    )
    lo, hi = res.interval()
    print(f"{digit:5d} {int(where.sum()):8d} {res.log_prob:13.1f} [{lo:9.1f}, {hi:9.1f}]")

# %% [markdown]
# ## The same from the command line
#
# `tyche basin` with no arguments is this measurement (naive against Adam on
# `zoo:digits-mlp`, 100 directions by default); `--where 'label=each'` is the per-class
# loop above, `--cutoffs` and `--lambda` the curve and λ. Here with 16 directions, run
# in-process through `tyche.__main__.main` (the same as typing the command in a shell); it
# prints its table and writes results, `summary.json` and `histogram.png` under `--out`.
# Its `adam label=3` and `adam label=8` rows repeat the loop's figures: the same seed draws
# the same directions.

# %%
from tyche.__main__ import main

main(["basin", "--n_samples", "16", "--where", "label=3;label=8", "--out", "runs/basin"])

# %% [markdown]
# Every result folder holds safetensors + JSON (`VolumeResult.load` reads it back) with the
# settings and the model's fingerprint. [BENCHMARKS](../../benchmarks.md) has the measured
# figures at 100 and more directions, the comparison with the original basin-volume code and
# the λ study.

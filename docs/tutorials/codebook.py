# ruff: noqa: E402 (each cell imports what it uses)

# %% [markdown]
# # Codebook features of a small language model
#
# Which discrete features does a layer use, and what happens if we force them? A *codebook*
# (Tamkin, Taufeeque & Goodman 2023) replaces the activation x at a site by the mean of its k
# most similar codes out of a learned set: with x̂ = LayerNorm(x) and sᵢ = ⟨x̂, cᵢ⟩/‖cᵢ‖, the
# output is y = mean of the top-k cᵢ. Each token then carries a few code ids at every
# codebook: sparse, discrete features that can be searched like text and switched on by hand.
#
# This page trains codebooks on the MLP outputs of a tiny GPT-NeoX (2 layers, width 64, a
# 512-token BPE), the model of the causal tutorial: trained here on 36 Shakespeare plays from
# `zoo:shakespeare` with the zoo's recipe, or read from the zoo cache when that tutorial has
# already trained it. It then caches every token's codes, searches the codes for a pattern,
# and forces a code to see the next-token distribution and the generated text move. The
# codebook paper's own TokFSM task (`zoo:tokfsm`) trains for many minutes; its figures are in
# [BENCHMARKS](../../benchmarks.md).

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
# Training rows come from four plays the model was trained on, evaluation rows from
# *Macbeth*, which it never saw: rows of 64 tokens.

# %%
from transformers import AutoModelForCausalLM, AutoTokenizer

from tyche.zoo import load_shakespeare
from tyche.zoo.text import play_titles

model = AutoModelForCausalLM.from_pretrained(lm_dir)
tokenizer = AutoTokenizer.from_pretrained(lm_dir)
plays = dict(zip(play_titles(), load_shakespeare()))


def rows(texts: list[str], seq_len: int = 64) -> torch.Tensor:
    """The texts' token ids cut into rows (n, seq_len)."""
    ids = [i for t in texts for i in tokenizer.backend_tokenizer.encode(t).ids]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


train_ids = rows([plays[p] for p in ("hamlet", "king-lear", "othello", "romeo-and-juliet")])
eval_ids = rows([plays["macbeth"]])[:128]
print(f"training rows {tuple(train_ids.shape)}, evaluation rows {tuple(eval_ids.shape)}")

# %% [markdown]
# ## Train the codebooks
#
# `attach` puts a codebook of 128 codes (k = 4 active per token) at each block's MLP output
# (`mlp_out.*`) and returns a `CodebookModel`. `train_codebooks` trains the codes for 150
# steps of 16 rows, with the base model frozen (`freeze_base=True`), the codes initialised by
# k-means on 4,096 tokens of the sites' activations; the loss is the language-model loss plus
# the codes' reconstruction error. The evaluation compares the model's held-out loss with and
# without codebooks.

# %%
from tyche.codebook import TrainConfig, attach, evaluate_lm, row_sampler, train_codebooks
from tyche.codebook.report import training_line

clean = evaluate_lm(model, eval_ids)
cb = attach(model, "mlp_out.*", num_codes=128, k=4, seed=0)
train_config = TrainConfig(
    steps=150,
    batch_size=16,
    lr=3e-3,
    warmup_steps=15,
    log_every=15,
    freeze_base=True,
    kmeans_init=True,
    kmeans_tokens=4096,
    seed=0,
)
result = train_codebooks(cb, row_sampler(train_ids, 16, seed=0), train_config, progress=False)
with_codes = evaluate_lm(cb, eval_ids)
print(
    f"codebooks at {', '.join(cb.sites)}: {result.n_params_codebooks:,} code parameters; "
    f"{result.seconds:.1f} s"
)
print(training_line(result.history[-1]))
print(
    f"held-out loss {clean['loss']:.3f} nats/token without codebooks, "
    f"{with_codes['loss']:.3f} with them"
)

# %% [markdown]
# The gap between the two losses is the price of squeezing each MLP output through 4 of 128
# codes. `plot_training` draws the logged curves: loss, reconstruction error, the fraction of
# codes that never fired in a window, and the entropy of code usage.

# %%
from tyche.codebook import plot_training

plot_training(result.history, "training.png")

# %% [markdown]
# ## Cache the codes and search them
#
# `build_cache` runs the model over the evaluation rows and stores every token's code ids
# (and the dense activations entering each codebook, for the neuron baseline) in a folder.
# `search` ranks codes for a regular expression over the text: precision (the fraction of a
# code's firings on matching tokens) and recall (the fraction of matching tokens it fires
# on), next to the best single neuron at the same recall. The plays mark each speech with its
# speaker in bold (`**MACBETH**`); the pattern `\*\*` finds the tokens of those marks.

# %%
from tyche.codebook import build_cache, code_contexts, search

cache = build_cache(
    cb, eval_ids, "runs/codebook-cache", tokenizer=tokenizer, copy_model=False, progress=False
)
found = search(cache, r"\*\*", min_recall=0.2)
print(found.table(5))

# %% [markdown]
# The best code's contexts: where it fires, with the firing token in `[[ ]]` (⏎ is a line
# break).

# %%
best = found.matches[0]
for context in code_contexts(cache, best["site"], best["code"], n=6, window=6):
    print(context.render())

# %% [markdown]
# ## Force the code and watch the output move
#
# `Intervention(site, code, positions=(-1,))` forces that code at the prompt's last token;
# inside `with intervene(model, [...])` every forward pass carries the edit. We compare the
# next-token distributions in the middle of a line of verse, where a speaker mark is
# unlikely, with and without forcing the speaker-mark code (`next_token_jsd` gives the
# Jensen-Shannon divergence between the two, in nats), and then generate greedily from the
# same prompt both ways (`generate`).

# %%
from tyche.codebook import Intervention, generate, intervene, next_token_jsd

prompt = tokenizer("Come, let me clutch thee, and the", return_tensors="pt").input_ids
forced = Intervention(best["site"], best["code"], positions=(-1,))


def top_tokens(logits: torch.Tensor, n: int = 5) -> str:
    probs = logits.softmax(-1)
    values, ids = probs.topk(n)
    return ", ".join(f"{tokenizer.decode(i)!r} {v:.2f}" for v, i in zip(values, ids))


with torch.no_grad():
    before = cb(input_ids=prompt).logits[0, -1]
    with intervene(cb, [forced]):
        after = cb(input_ids=prompt).logits[0, -1]
print("next token, as trained:", top_tokens(before))
print(f"next token, {best['site']} code {best['code']} forced:", top_tokens(after))
print(f"JSD between the two: {next_token_jsd(cb, prompt, [forced]).item():.3f} nats")
for label, edits in (("as trained", []), ("forced", [forced])):
    out = generate(cb, prompt, edits, max_new_tokens=16, do_sample=False)
    print(f"{label:>10}: {tokenizer.decode(out[0])!r}")

# %% [markdown]
# The forced code fires around the speaker marks, so forcing it in the middle of a line
# moves probability toward what follows such a mark (compare the two lists, and the JSD), and
# the greedy continuations part from the first token. The model is tiny (a held-out loss of
# about 3.7 nats per token), so neither continuation reads like Shakespeare; what the page
# shows is that one discrete code, switched on at one position, changes what the model says.
#
# On the command line the same pipeline is `tyche codebook train`, `cache`, `search`,
# `contexts` and `intervene` (`--force SITE:CODE`), and `tyche codebook app` opens the cache
# in a Streamlit code browser.

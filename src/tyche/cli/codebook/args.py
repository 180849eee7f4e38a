"""The options of every ``tyche codebook`` command, as dataclasses (attribute docstrings are
the ``--help`` texts)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

from tyche.cli.commandline import CommandError
from tyche.cli.inputs import ModelSource, TextRows
from tyche.codebook.options import TrainConfig


@dataclass
class ModelFlags:
    model: str = "zoo:shakespeare-lm"
    """'zoo:NAME' or a local folder (a save_pretrained model, with or without codebooks)"""


@dataclass
class CodebookRows(TextRows):
    """The token rows of a codebook command: a seeded draw of text, or TokFSM walks."""

    data: str | None = None
    """text: zoo:shakespeare, zoo:stdlib-docs or a UTF-8 text file; or 'fsm:FOLDER' /
    'fsm:zoo:tokfsm' for TokFSM walks from that folder's fsm.json (default: the model's own zoo
    data, else zoo:shakespeare)"""

    def check(self) -> None:
        """The text flags (see :meth:`TextRows.check`), ``fsm:`` specs included."""
        from tyche.cli.codebook.loading import check_data_spec

        if self.data is not None and self.data.startswith("fsm:"):
            check_data_spec(self.data)
            TextRows(None, self.n_sequences, self.seq_len, self.seed).check()  # the numbers
            return
        super().check()


@dataclass(frozen=True)
class TrainFlags(TrainConfig):
    """The optimiser settings of ``tyche codebook train``: a
    :class:`~tyche.codebook.TrainConfig` whose flags are checked in the command line's words,
    with the command's defaults; the settings without a flag keep the library's defaults, and
    the seed is ``--seed`` (:meth:`library` makes the library's config)."""

    steps: int = 600
    """optimiser steps"""
    batch_size: int = 16
    """sequences per step (split over torchrun processes)"""
    lr: float = 1e-3
    """peak learning rate of the base model"""
    code_lr: float | None = None
    """peak learning rate of the codebooks (default: --lr)"""
    weight_decay: float = 0.01
    """AdamW weight decay of the base model (codebooks: none)"""
    warmup_steps: int = 50
    """linear warm-up steps"""
    schedule: Literal["cosine", "constant"] = "cosine"
    """learning-rate schedule after warm-up"""
    freeze_base: bool = False
    """train only the codebooks"""
    snap_after: int = 0
    """steps with the codebooks passing their inputs through (a warm start) before they snap"""
    kmeans_init: bool = False
    """initialise the codes by k-means on the model's activations"""
    kmeans_tokens: int = 16384
    """tokens of activations clustered by --kmeans_init"""
    kmeans_calibrate: bool = False
    """with --kmeans_init, fit the codebooks' layer norms so codes output at their inputs' scale"""
    init_dictionary: str | None = None
    """a SAELens or sparsify dictionary folder: the codebook at the site it writes starts from
    its decoder directions, the rows of largest norm (in code:
    tyche.codebook.init_from_dictionary)"""
    init_dictionary_energies: str | None = None
    """with --init_dictionary: the features/ folder `tyche causal --features` saved for that
    dictionary; the codes come from the latents of largest causal energy instead"""
    replace_dead_every: int = 0
    """replace codes unused for this many steps by recent inputs (0: never)"""
    log_every: int = 50
    """steps between logged metrics"""
    checkpoint_every: int = 0
    """steps between checkpoints (0: only at the end)"""
    min_lr_ratio: float = field(default=TrainConfig.min_lr_ratio, init=False)
    grad_clip: float | None = field(default=TrainConfig.grad_clip, init=False)
    snap_lr_factor: float | None = field(default=TrainConfig.snap_lr_factor, init=False)
    replace_rho: float = field(default=TrainConfig.replace_rho, init=False)
    seed: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        from tyche.cli.commandline import check_number

        for name in ("steps", "batch_size", "log_every", "kmeans_tokens"):
            check_number(getattr(self, name), f"--{name}", minimum=1, integer=True)
        for name in ("warmup_steps", "replace_dead_every", "checkpoint_every", "snap_after"):
            check_number(getattr(self, name), f"--{name}", minimum=0, integer=True)
        for name in ("lr", "code_lr"):
            check_number(getattr(self, name), f"--{name}", above=0)
        check_number(self.weight_decay, "--weight_decay", minimum=0)
        if self.init_dictionary is not None and self.kmeans_init:
            raise CommandError("--init_dictionary and --kmeans_init both set the codes; use one")
        if self.init_dictionary_energies is not None and self.init_dictionary is None:
            raise CommandError("--init_dictionary_energies ranks the latents of "
                               "--init_dictionary; give --init_dictionary too")  # fmt: skip
        super().__post_init__()

    def library(self, seed: int) -> TrainConfig:
        """The library's :class:`~tyche.codebook.TrainConfig` of these flags and ``seed``."""
        values = {f.name: getattr(self, f.name) for f in fields(TrainConfig)}
        return TrainConfig(**{**values, "seed": seed})


@dataclass
class CodebookTrainConfig:
    """Attach codebooks to a model (or continue a codebook model) and train them."""

    source: ModelSource = field(default_factory=ModelSource)
    """the model: 'zoo:NAME' or a local folder (a save_pretrained model, with or without
    codebooks) (--model, --allow_long_context)"""
    rows: CodebookRows = field(default_factory=lambda: CodebookRows(seq_len=128))
    """the training rows (--data; --n_sequences: default every row of the text but the
    --eval_sequences held out; --seq_len; --seed: also of training)"""
    sites: str = "attn_heads.*,mlp_out.*"
    """site patterns for new codebooks, comma separated (ignored for a codebook model)"""
    num_codes: int = 512
    """codes per codebook (per head for attn_heads)"""
    k: int = 1
    """codes chosen per token"""
    similarity: Literal["inner_product", "cosine", "euclidean"] = "inner_product"
    """how inputs are compared with codes"""
    loss: Literal["aeloss", "fullaeloss", "vqvae", "base"] = "aeloss"
    """gradient variant of the codebooks (see tyche.codebook.layer)"""
    beta: float = 0.25
    """commitment weight (fullaeloss, vqvae)"""
    restore_scale: bool = False
    """codebook outputs keep their input's own mean and spread (for a frozen base)"""
    from_scratch: bool = False
    """re-initialise the model's weights (seeded by --seed) and train it from scratch"""
    train: TrainFlags = field(default_factory=TrainFlags)
    """the optimiser's settings (flat flags: --steps ... --checkpoint_every)"""
    resume: bool = False
    """continue the run in --out from its checkpoint; every flag that changes the trained model
    or its data must be as saved (only --log_every and --checkpoint_every may change; to train
    a finished model further, start a new run with --model OUT)"""
    eval_sequences: int = 64
    """held-out sequences for the final next-token loss and accuracy"""
    out: str = "runs/codebook"
    """output folder: the trained model (loadable by transformers), train_result/, checkpoint/"""
    overwrite: bool = False
    """replace a run of other settings in --out (its files are removed first)"""


@dataclass
class CacheConfig:
    """Run a codebook model over data and store every token's code ids (plus text)."""

    source: ModelSource = field(default_factory=ModelSource)
    """the codebook model: 'zoo:NAME' or a local folder (--model, --allow_long_context)"""
    rows: CodebookRows = field(default_factory=lambda: CodebookRows(n_sequences=256, seq_len=128))
    """the rows cached (--data, --n_sequences, --seq_len, --seed)"""
    batch_size: int = 32
    """sequences per forward pass"""
    neurons: bool = True
    """also store the dense activations entering each codebook (neuron baseline)"""
    copy_model: bool = True
    """store the model inside the cache folder (the app and interventions use it)"""
    out: str = "runs/codebook-cache"
    """output folder of the cache"""
    overwrite: bool = False
    """replace a cache of other settings in --out (its files are removed first)"""


@dataclass
class SearchConfig:
    """Find codes that fire on a regex, ranked by precision against the best neuron."""

    cache: str = "runs/codebook-cache"
    """cache folder (tyche codebook cache)"""
    pattern: str = r"\bking\b"
    """regex; with a group, its start is the targeted token"""
    sites: str | None = None
    """codebook sites to search, comma separated (default: all)"""
    min_recall: float = 0.01
    """drop codes firing on fewer matched tokens than this share"""
    min_precision: float = 0.0
    """drop codes less precise than this"""
    top: int = 20
    """rows shown"""
    parity: Literal["even", "odd"] | None = None
    """keep only even or odd token positions (TokFSM: odd = first digits)"""
    neurons: bool = True
    """compare every code with the best single neuron at the same recall"""
    out: str | None = None
    """also save the result here (safetensors + JSON)"""
    overwrite: bool = False
    """with --out: replace a result of other settings there"""


@dataclass
class TopicsConfig:
    """Find the topic codes of documents: codes active at many of their tokens, rarely
    elsewhere (ranked by the log odds ratio of firing inside against outside)."""

    cache: str = "runs/codebook-cache"
    """cache folder (tyche codebook cache)"""
    rows: str | None = None
    """the document: these cache rows, comma separated (e.g. 0,1,2 or 0-4,9)"""
    regex: str | None = None
    """the documents: every cache row whose text matches this regex"""
    word: str | None = None
    """the documents: every cache row that contains this word (whole word, any case),
    against the rows that don't"""
    sites: str | None = None
    """codebook sites to search, comma separated (default: all)"""
    min_recall: float = 0.2
    """drop codes active at fewer of the documents' tokens than this share"""
    min_precision: float = 0.01
    """drop codes with fewer of their activations inside the documents than this share"""
    top: int = 20
    """rows shown (and saved)"""
    out: str | None = None
    """also save the result here (meta.json + tensors.safetensors)"""
    overwrite: bool = False
    """with --out: replace a result of other settings there"""


@dataclass
class ContextsConfig:
    """Show the contexts where a code fired, the token marked."""

    cache: str = "runs/codebook-cache"
    """cache folder"""
    site: str = "mlp_out.0"
    """codebook site"""
    code: int = 0
    """code id"""
    head: int | None = None
    """head (per-head codebooks)"""
    n: int = 20
    """contexts shown"""
    window: int = 12
    """tokens of context either side"""


@dataclass
class InterveneConfig(ModelFlags):
    """Generate from a prompt with and without codes forced, replaced, appended or blocked."""

    cache: str | None = None
    """take the model from this cache folder instead of --model"""
    prompt: str = "To be, or not to be"
    """text to continue"""
    force: str = ""
    """codes to force: SITE[/hHEAD]:CODE[@POS;POS], comma separated"""
    replace: str = ""
    """codes that replace the weakest slots (same syntax)"""
    append: str = ""
    """codes added as an extra slot (same syntax)"""
    block: str = ""
    """codes never chosen (the next best takes their place)"""
    topic: str = ""
    """topic codes forced together (same syntax, e.g. the line tyche codebook topics prints):
    the codes of one codebook (head) take its weakest slots k-1, k-2, ... at every position;
    at most k per codebook (use --append to add codes as extra slots instead)"""
    n_samples: int = 3
    """continuations per setting"""
    max_new_tokens: int = 32
    """tokens generated"""
    temperature: float = 1.0
    """sampling temperature (0: greedy)"""
    seed: int = 0
    """sampling seed (the same for both settings)"""


@dataclass
class SteerConfig:
    """Topic steering: force the codes of a word and count continuations that contain it."""

    cache: str = "runs/codebook-cache"
    """cache folder holding the model (built with --copy_model)"""
    words: str = "king,love,blood,death"
    """words, comma separated"""
    prompts: str = "zoo:shakespeare"
    """prompt source: text data; prompts are 4 seeded windows of --prompt_tokens tokens"""
    n_prompts: int = 4
    """prompts"""
    prompt_tokens: int = 16
    """tokens per prompt"""
    samples_per_prompt: int = 10
    """continuations per prompt (4 x 10 = 40 per word)"""
    max_new_tokens: int = 48
    """tokens per continuation"""
    max_codes: int = 8
    """codes forced per word"""
    target: Literal["before", "word"] = "before"
    """force the codes of the token before the word (they predict it) or of the word itself"""
    min_precision: float = 0.5
    """codes must be at least this precise for the word"""
    min_recall: float = 0.02
    """codes must fire on at least this share of the word's tokens"""
    sites: str | None = None
    """search only these codebook sites (comma separated)"""
    seed: int = 0
    """seed of prompts and sampling"""
    out: str | None = None
    """save the table as JSON here"""
    overwrite: bool = False
    """with --out: replace the file if it exists"""


@dataclass
class TokFSMEvalConfig(ModelFlags):
    """Evaluate a TokFSM codebook model: transitions, purity, state forcing."""

    model: str = "zoo:tokfsm"
    """'zoo:tokfsm' or a folder with codebooks and fsm.json"""
    n_samples: int = 100
    """sampled sequences for the transition accuracy"""
    seq_len: int = 64
    """tokens per sampled sequence"""
    allow_long_context: bool = False
    """let --seq_len past the model's context length through (rotary positions only; a
    learned position table has no embedding past it)"""
    n_trials: int = 100
    """state-forcing trials"""
    forcing_sites: str | None = None
    """codebooks whose state codes are forced, a site glob of single codebooks (not per head),
    e.g. 'mlp_out.0' for the first layer's alone (default: every MLP codebook, if any)"""
    seed: int = 0
    """sampling seed"""


@dataclass
class AppConfig:
    """Start the Streamlit code browser on a cache folder."""

    cache: str = "runs/codebook-cache"
    """cache folder (tyche codebook cache)"""
    port: int = 8501
    """port of the web server"""
    headless: bool = True
    """do not open a browser window"""

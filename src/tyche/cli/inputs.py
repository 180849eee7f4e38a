"""The inputs every command shares: the model (:class:`ModelSource`) and the token rows it
reads (:class:`TextRows`).

Both are dataclasses embedded whole in a command's config, so their fields are the same flags
in every command (``--model``, ``--allow_long_context``; ``--data``, ``--n_sequences``,
``--seq_len``, ``--seed``). Each has a ``check()`` that runs before anything loads and a
``load()`` after. A command sets its own defaults by embedding an instance, e.g.
``rows: TextRows = field(default_factory=lambda: TextRows(n_sequences=64, seq_len=128))``;
``None`` means "the command's default", filled in with :meth:`TextRows.filled`.

The row draw is one for every command: the text is tokenized whole into rows of ``seq_len``
tokens (documents joined by EOS), a permutation of the rows is drawn from ``seed``, and the
first ``n_sequences`` rows of it are used, in corpus order. A held-out set (a command's
evaluation or test rows) is the *last* rows of the same permutation, so it never overlaps.
The same ``--data --n_sequences --seq_len --seed`` therefore give the same rows, and the same
:func:`tyche.data.token_ids_sha256`, in every command; each records it in its output.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tyche.cli.commandline import (
    CommandError,
    check_context,
    check_number,
    check_readable_text,
    reworded_text_errors,
)

if TYPE_CHECKING:
    import torch

    from tyche.zoo.resolve import ZooModel

__all__ = ["DEFAULT_TEXT", "ModelSource", "Rows", "TextRows"]

#: the text a language model reads when neither --data nor the model's zoo entry names one
DEFAULT_TEXT = "zoo:shakespeare"
#: zoo models that are classifiers (no tokenizer); a command lists those it takes
CLASSIFIERS = ("zoo:digits-mlp", "zoo:digits-mlp-poisoned", "zoo:modadd", "zoo:fashion-mlp")


@dataclass
class ModelSource:
    """The model a command reads."""

    model: str = "zoo:shakespeare-lm"
    """'zoo:NAME' (see `tyche zoo list`) or a local save_pretrained folder; prefix 'tl:'
    (tl:zoo:NAME, tl:FOLDER) to measure it as a TransformerLens HookedTransformer, whose
    hook names (blocks.0.hook_resid_pre, ...) are then site names"""
    allow_long_context: bool = False
    """let --seq_len past the model's context length through (rotary positions only; a
    learned position table has no embedding past it)"""

    def check(self, classifiers: tuple[str, ...] = ()) -> str | None:
        """Check ``--model`` without loading it; the zoo classifier it names (one of
        ``classifiers``, which the command accepts), or None for a language model."""
        from tyche.zoo.catalogue import check_name

        spec = self.model
        if spec.startswith("tl:"):
            from tyche.frameworks import require_interop

            require_interop("transformer_lens", f"--model {spec}")
            spec = spec[len("tl:") :]
            if not spec or spec.startswith("tl:"):
                raise CommandError(f"--model {self.model}: give tl:zoo:NAME or tl:FOLDER")
            if spec in CLASSIFIERS:
                raise CommandError(f"--model {self.model}: TransformerLens models are language "
                                   "models; give tl:zoo:shakespeare-lm or tl:FOLDER")  # fmt: skip
            return replace(self, model=spec).check(())
        if spec.startswith("zoo:"):
            name = f"zoo:{check_name(spec, kind='model')}"
            if name in CLASSIFIERS:
                if name not in classifiers:
                    raise CommandError(f"--model {name} is not a language model (it has no "
                                       "tokens); give one")  # fmt: skip
                return name
            return None
        folder = Path(spec).expanduser()
        if not folder.is_dir():
            raise CommandError(
                f"--model: no folder {spec!r}; give zoo:NAME or a save_pretrained folder"
            )
        if not (folder / "config.json").is_file():
            raise CommandError(
                f"--model: {spec!r} has no config.json; is it a save_pretrained folder?"
            )
        return None

    def load(self, seq_len: int | None = None) -> ZooModel:
        """The language model and its tokenizer, on this process's device; ``seq_len`` is
        checked against its context length (``--allow_long_context``)."""
        from tyche.distributed import default_device
        from tyche.zoo import resolve_model

        hooked = self.model.startswith("tl:")
        spec = self.model[len("tl:") :] if hooked else self.model
        zoo_model = resolve_model(spec)
        if zoo_model.tokenizer is None:
            raise CommandError(f"--model {self.model} has no tokenizer; give a language model")
        if hooked:
            zoo_model = self._as_hooked(zoo_model, spec)
        if seq_len is not None:
            self.check_context(zoo_model.model, seq_len)
        zoo_model.model.to(default_device())
        return zoo_model

    @staticmethod
    def _as_hooked(zoo_model: ZooModel, spec: str) -> ZooModel:
        """``zoo_model`` with its HF model converted to a TransformerLens HookedTransformer
        (unprocessed weights, :func:`tyche.frameworks.hooked_from_hf`), seen as a HookedLM."""
        from tyche.frameworks import HookedLM, hooked_from_hf
        from tyche.zoo.catalogue import get_entry

        folder = get_entry(spec, kind="model").path if spec.startswith("zoo:") else spec
        hooked = hooked_from_hf(str(folder), zoo_model.model, zoo_model.tokenizer)
        return replace(zoo_model, model=HookedLM(hooked), name=f"tl:{zoo_model.name}")

    def check_context(self, model: Any, seq_len: int) -> None:
        """Refuse ``--seq_len`` past ``model``'s context (see :func:`check_context`)."""
        check_context(model, seq_len, "--seq_len", allow_long=self.allow_long_context,
                      name=self.model)  # fmt: skip


@dataclass(frozen=True)
class Rows:
    """The token rows a command read.

    ``tokens`` holds ``input_ids`` and ``attention_mask``, LongTensor ``(n, seq_len)``, in
    corpus order; ``held_out`` the same for the held-out rows (None without them);
    ``available`` the rows the whole text gives; ``data`` the text spec used.
    """

    tokens: dict[str, torch.Tensor]
    held_out: dict[str, torch.Tensor] | None
    available: int
    data: str

    @property
    def input_ids(self) -> torch.Tensor:
        return self.tokens["input_ids"]

    def record(self, rows: TextRows) -> dict[str, Any]:
        """What an output folder records of its inputs (JSON-ready): the flags, the rows
        read and ``input_ids_sha256``, the SHA-256 of their token ids in order."""
        from tyche.data import token_ids_sha256

        n, seq_len = self.input_ids.shape
        out = {"data": self.data, "n_sequences": n, "seq_len": seq_len, "seed": rows.seed,
               "input_ids_sha256": token_ids_sha256(self.input_ids)}  # fmt: skip
        if self.held_out is not None:
            out["held_out_sequences"] = self.held_out["input_ids"].shape[0]
            out["held_out_input_ids_sha256"] = token_ids_sha256(self.held_out["input_ids"])
        return out

    def note(self, asked: int | None) -> str:
        """``data: n sequences × T tokens`` (and a word if the text had fewer than asked)."""
        n, seq_len = self.input_ids.shape
        short = "" if asked is None or n >= asked else f" (the text has only {n} of {asked})"
        return f"{self.data}: {n} sequences × {seq_len} tokens{short}"


@dataclass
class TextRows:
    """The token rows a command reads: one seeded draw from the tokenized text."""

    data: str | None = None
    """text: zoo:shakespeare, zoo:stdlib-docs or a UTF-8 text file (default: the model's own
    zoo data, else zoo:shakespeare)"""
    n_sequences: int | None = None
    """sequences drawn (seeded) from the whole tokenized text"""
    seq_len: int | None = None
    """tokens per sequence"""
    seed: int = 0
    """seed of the sequence draw and of the method's own random draws"""

    def filled(self, n_sequences: int | None, seq_len: int) -> TextRows:
        """These rows with the command's defaults where a field is None (``n_sequences``
        None: every row of the text)."""
        return replace(
            self,
            n_sequences=self.n_sequences if self.n_sequences is not None else n_sequences,
            seq_len=self.seq_len if self.seq_len is not None else seq_len,
        )

    def check(self) -> None:
        """Check the flags without reading the text."""
        check_number(self.n_sequences, "--n_sequences", minimum=1, integer=True)
        check_number(self.seq_len, "--seq_len", minimum=2, integer=True)
        check_number(self.seed, "--seed", minimum=0, integer=True)
        if self.data is None:
            return
        if self.data.startswith("zoo:"):
            from tyche.zoo.catalogue import check_name

            if check_name(self.data, kind="data") == "fashion-mnist":
                raise CommandError("--data: zoo:fashion-mnist is image data, not text")
        else:
            check_readable_text(self.data, "--data")

    def spec(self, default_data: str | None = None) -> str:
        """The text read: ``--data``, else the model's zoo data, else :data:`DEFAULT_TEXT`."""
        return self.data or default_data or DEFAULT_TEXT

    def load(self, tokenizer: Any, default_data: str | None = None, *, held_out: int = 0,
             held_out_flag: str = "--n_sequences", texts: Any = None) -> Rows:  # fmt: skip
        """Tokenize the text and draw the rows (see the module docstring).

        ``held_out`` rows are set aside from the end of the permutation (the flag that asks for
        them is ``held_out_flag``, for the error); ``texts`` (documents)
        replaces the text named by ``--data`` (e.g. one play of it). Raises
        :class:`CommandError` when the text is too short for one row, or for the held-out
        rows and at least one drawn row.
        """
        import torch

        from tyche.data import chunk_and_tokenize
        from tyche.zoo import resolve_texts

        if self.seq_len is None:
            raise TypeError("TextRows.load needs seq_len: fill in the command's default first")
        spec = self.spec(default_data)
        with reworded_text_errors("--data", spec, "--seq_len"):
            docs = resolve_texts(spec) if texts is None else texts
            tokens = chunk_and_tokenize(docs, tokenizer, max_seq_len=self.seq_len)
        available = tokens["input_ids"].shape[0]
        need = (self.n_sequences or 1) + held_out
        if held_out and available < need:
            asked = f"{held_out_flag} {held_out}" if self.n_sequences is None else \
                f"--n_sequences {self.n_sequences}"  # fmt: skip
            raise CommandError(
                f"{asked}: --data {spec} gives {available} sequences of --seq_len "
                f"{self.seq_len} tokens, and the draw with its {held_out} held-out rows needs "
                f"{need}; ask for fewer, or give a smaller --seq_len or more text"
            )
        order = torch.randperm(available, generator=torch.Generator().manual_seed(self.seed))
        room = available - held_out
        n = room if self.n_sequences is None else min(self.n_sequences, room)
        picked = order[:n].sort().values
        rest = order[available - held_out :].sort().values if held_out else None
        return Rows(
            tokens={k: v[picked] for k, v in tokens.items()},
            held_out=None if rest is None else {k: v[rest] for k, v in tokens.items()},
            available=available,
            data=spec,
        )

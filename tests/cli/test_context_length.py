"""A sequence length past a model's context is refused right after the model loads.

Every command that takes a sequence length checks it against the model's config
(``max_position_embeddings`` / ``n_positions`` / ``n_ctx``, :func:`tyche.sites.context_length`):
past it a rotary model (GPT-NeoX, Llama) runs only with ``--allow_long_context``, and a model
with a learned position table (GPT-2) never, since no position past the table has an embedding.
The tiny models of conftest have 64 positions.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import build_gpt2, build_llama, build_neox, cli, make_tiny_tokenizer, tiny_text_list
from tyche.sites import context_field, context_length, learned_positions

LIMIT = 64


def test_context_length_and_learned_positions_of_the_three_families() -> None:
    gpt2, neox, llama = build_gpt2(), build_neox(), build_llama()
    assert context_field(gpt2) in (("max_position_embeddings", LIMIT), ("n_positions", LIMIT))
    assert context_length(neox) == context_length(llama) == LIMIT
    assert learned_positions(gpt2) and not learned_positions(neox) and not learned_positions(llama)
    assert context_length(torch.nn.Linear(2, 2)) is None
    assert not learned_positions(torch.nn.Linear(2, 2))
    # what the refusal protects against: GPT-2 has no embedding for position 64
    with pytest.raises(IndexError):
        gpt2(torch.zeros(1, LIMIT + 1, dtype=torch.long))
    assert neox(torch.zeros(1, LIMIT + 1, dtype=torch.long)).logits.shape[1] == LIMIT + 1


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Tiny GPT-NeoX (rotary) and GPT-2 (learned positions) folders, a text file, a graph."""
    from tyche.__main__ import main

    root = tmp_path_factory.mktemp("context")
    out = {"text": root / "text.txt", "graph": root / "graph"}
    out["text"].write_text("\n\n".join(tiny_text_list() * 12))
    for name, build in (("neox", build_neox), ("gpt2", build_gpt2)):
        build().save_pretrained(root / name)
        make_tiny_tokenizer().save_pretrained(root / name)
        out[name] = root / name
    main(["interaction", "build", "--model", "zoo:digits-mlp", "--n_rows", "60", "--no-plot",
          "--out", str(out["graph"])])  # fmt: skip
    return out


#: (command, the flag of its sequence length, the other arguments it needs)
COMMANDS = [
    (["basin"], "--seq_len", []),
    (["causal"], "--seq_len", []),
    (["causal", "train-lens"], "--seq_len", []),
    (["codebook", "train"], "--seq_len", ["--steps", "1"]),
    (["codebook", "cache"], "--seq_len", []),
    (["interaction", "build"], "--seq_len", []),
    (["interaction", "ablate"], "--seq_len", ["--graph", "{graph}"]),
]


@pytest.mark.parametrize(
    ("command", "flag", "extra"), COMMANDS, ids=[" ".join(c[0]) for c in COMMANDS]
)
def test_a_sequence_past_the_context_is_refused(
    command, flag, extra, folders, capsys, tmp_path
) -> None:
    extra = [a.format(graph=folders["graph"]) for a in extra]
    for arch, allow, pattern in (
        ("neox", [], rf"{flag} 65 is past the context of .*neox \(max_position_embeddings 64 "
                     rf"tokens\); give {flag} 64 or less, or add --allow_long_context"),
        ("gpt2", [], rf"{flag} 65 is past the 64 positions of .*gpt2: it learned one embedding"),
        ("gpt2", ["--allow_long_context"], r"--allow_long_context cannot help"),
    ):  # fmt: skip
        run = cli(capsys, *command, "--model", str(folders[arch]), "--data",
                  str(folders["text"]), flag, "65", "--out", str(tmp_path / arch), *extra,
                  *allow)  # fmt: skip
        errors = [line for line in run.err.splitlines() if "error:" in line]
        assert run.code == 2 and len(errors) == 1 and "Traceback" not in run.err, run.err
        import re

        assert re.search(pattern, errors[0]), (pattern, errors[0])
        assert " ".join(command[:1]) in errors[0]


def test_allow_long_context_lets_a_rotary_model_through(folders, capsys, tmp_path) -> None:
    """GPT-NeoX past its 64 positions with the flag: the training runs and saves."""
    run = cli(capsys, "codebook", "train", "--model", str(folders["neox"]), "--data",
              str(folders["text"]), "--seq_len", "65", "--allow_long_context", "--steps", "1",
              "--batch_size", "2", "--num_codes", "8", "--sites", "mlp_out.1", "--log_every",
              "1", "--eval_sequences", "2", "--out", str(tmp_path / "long"))  # fmt: skip
    assert run.code == 0, run.err
    assert (tmp_path / "long" / "codebooks.json").is_file()

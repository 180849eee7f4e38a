"""Models, FSMs and token rows named on the command line: zoo entries or local folders."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from tyche.cli.commandline import CommandError, check_readable_text, split_list

if TYPE_CHECKING:
    import torch


#: a model folder has one of these: an HF config, or the codebooks of a TransformerLens base
MODEL_FILES = ("config.json", "codebooks.json")


def split(text: str | None) -> list[str] | None:
    return split_list(text) or None


def check_model_spec(spec: str, flag: str = "--model") -> None:
    """A zoo language model or a local model folder, checked without loading anything."""
    from tyche.zoo.catalogue import check_name

    if spec.startswith("tl:"):
        from tyche.frameworks import require_interop

        require_interop("transformer_lens", f"{flag} {spec}")
        check_model_spec(spec[len("tl:") :], flag)
        return
    if spec.startswith("zoo:"):
        name = check_name(spec, kind="model")
        if name in ("digits-mlp", "digits-mlp-poisoned"):
            raise CommandError(f"{flag}: zoo:{name} is not a language model; codebooks need one")
    elif not any((Path(spec).expanduser() / name).is_file() for name in MODEL_FILES):
        raise CommandError(f"{flag}: no model folder at {spec!r} (expected config.json there)")


def check_data_spec(spec: str, flag: str = "--data") -> None:
    from tyche.zoo.catalogue import check_name

    if spec.startswith("fsm:"):
        target = spec.removeprefix("fsm:")
        if target.startswith("zoo:"):
            check_model_spec(target, flag)
        elif not (Path(target).expanduser() / "fsm.json").is_file():
            raise CommandError(f"{flag}: no fsm.json in {target!r}")
    elif spec.startswith("zoo:"):
        if check_name(spec, kind="data") == "fashion-mnist":
            raise CommandError(f"{flag}: zoo:fashion-mnist is image data, not text")
    else:
        check_readable_text(spec, flag)


def folder_of(spec: str) -> Path:
    from tyche.zoo.catalogue import get_entry
    from tyche.zoo.resolve import ensure_prepared

    if spec.startswith("zoo:"):
        entry = get_entry(spec, kind="model")
        ensure_prepared(entry)
        return entry.path
    path = Path(spec).expanduser()
    if not any((path / name).is_file() for name in MODEL_FILES):
        raise FileNotFoundError(f"no model folder at {spec!r} (expected config.json there)")
    return path


def default_data_of(spec: str) -> str | None:
    """The data a zoo model is naturally read on (its entry's ``default_data``), else None."""
    if not spec.startswith("zoo:"):
        return None
    from tyche.zoo.catalogue import get_entry

    return get_entry(spec, kind="model").default_data


def load_model(spec: str) -> Any:
    """A CodebookModel from a zoo name or folder (no codebooks if the folder has none).

    ``tl:SPEC`` measures the model as a TransformerLens HookedTransformer (see
    ``tyche.frameworks.hooked_from_hf``); a codebook folder trained on one records that spec
    and is loaded on the same conversion again (its weights hash checked).
    """
    check_model_spec(spec)
    import json

    from tyche.codebook.model import CODEBOOKS_CONFIG, CodebookModel
    from tyche.distributed import default_device

    if spec.startswith("tl:"):
        return _hooked_model(spec)
    folder = folder_of(spec)
    saved = folder / CODEBOOKS_CONFIG
    base_spec = None
    if saved.is_file():
        base_spec = (json.loads(saved.read_text()).get("base_model") or {}).get("spec")
    if base_spec is not None:
        base = _hooked_model(base_spec)
        model = CodebookModel.from_pretrained(folder, base_model=base.base)
        model.base_spec, model.tokenizer = base_spec, model.tokenizer or base.tokenizer
    elif saved.is_file():
        model = CodebookModel.from_pretrained(folder, device=default_device())
    else:
        from tyche.zoo.resolve import load_hf_folder

        base, tokenizer, _ = load_hf_folder(folder)
        model = CodebookModel(base.to(default_device()))
        model.tokenizer = tokenizer
        model._rehook()
    if model.tokenizer is None:
        raise CommandError(f"{spec} has no tokenizer in its folder; codebook tools need one")
    return model


def _hooked_model(spec: str) -> Any:
    """A CodebookModel without codebooks over the TransformerLens conversion of ``tl:SPEC``."""
    from tyche.codebook.model import CODEBOOKS_CONFIG, CodebookModel
    from tyche.distributed import default_device
    from tyche.frameworks import HookedLM, hooked_from_hf
    from tyche.zoo.resolve import load_hf_folder

    folder = folder_of(spec[len("tl:") :])
    if (folder / CODEBOOKS_CONFIG).is_file():
        raise CommandError(f"--model {spec}: that folder has codebooks; give it without tl: "
                           "(a codebook folder remembers the model it was trained on)")  # fmt: skip
    base, tokenizer, _ = load_hf_folder(folder)
    hooked = hooked_from_hf(str(folder), base.to(default_device()), tokenizer)
    model = CodebookModel(HookedLM(hooked))
    inner = spec[len("tl:") :]
    model.tokenizer = tokenizer
    model.base_spec = spec if inner.startswith("zoo:") else f"tl:{folder.resolve()}"
    model._rehook()
    return model


def fsm_of(spec: str):
    from tyche.codebook.tokfsm import FSM

    target = spec.removeprefix("fsm:")
    folder = folder_of(target) if target.startswith("zoo:") else Path(target).expanduser()
    return FSM.load(folder)


def load_rows(data: str, tokenizer: Any, seq_len: int, n: int, seed: int,
              flags: tuple[str, str] = ("--data", "--seq_len")) -> torch.Tensor:  # fmt: skip
    """``n`` token rows of ``seq_len``: TokFSM walks (``fsm:...``) or a seeded draw of text.
    ``flags`` name ``data`` and ``seq_len`` on the command line (for the errors)."""
    import torch

    from tyche.cli.commandline import reworded_text_errors

    if data.startswith("fsm:"):
        return fsm_of(data).batch(n, seq_len, torch.Generator().manual_seed(seed))
    from tyche.data import chunk_and_tokenize
    from tyche.zoo.resolve import resolve_texts

    with reworded_text_errors(flags[0], data, flags[1]):
        rows = chunk_and_tokenize(resolve_texts(data), tokenizer, max_seq_len=seq_len)
    rows = rows["input_ids"]
    pick = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))
    return rows[pick[:n]]


def reinitialise(base: torch.nn.Module, seed: int) -> None:
    """Draw fresh weights for a HF model (its own initialiser, seeded)."""
    import torch

    if not hasattr(base, "_init_weights"):
        raise CommandError(f"{type(base).__name__} has no _init_weights; cannot train from scratch")
    # transformers marks loaded weights as initialised and its initialiser then skips them
    for item in [*base.modules(), *base.parameters()]:
        if getattr(item, "_is_hf_initialized", False):
            item._is_hf_initialized = False
    torch.manual_seed(seed)
    base.apply(base._init_weights)
    if hasattr(base, "tie_weights"):
        base.tie_weights()

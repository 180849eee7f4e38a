"""Models from other frameworks, as the torch module every method measures.

Every method calls :func:`as_module` on the model it is given, so it accepts, besides a
HuggingFace model or any ``nn.Module``:

* an **nnsight** ``NNsight`` / ``LanguageModel`` (or any nnsight ``Envoy`` root): measured as
  the module it wraps (``model._module``), so the numbers are the HF model's own;
* a **TransformerLens** ``TransformerBridge`` (TransformerLens 3's wrapper that runs the HF
  model's own modules): measured as that HF model (``bridge.original_model``), whose tensors
  are the bridge's hook values; TransformerLens hook names translate to its aliases;
* a **TransformerLens** ``HookedTransformer``: measured through :class:`HookedLM`, a view that
  shares its submodules (the same parameters, hook points and module names, so
  ``blocks.3.hook_resid_pre`` names a site) and answers the HuggingFace calls the methods make:
  ``model(input_ids=..., attention_mask=..., labels=...)`` returns an object with ``logits``
  (and ``loss``), ``model.config`` has the usual fields, ``model.generate`` samples.

Neither library is imported here: a model is recognised by its class's module. Site names of
both frameworks resolve as described in :mod:`tyche.hook_names`.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from tyche.errors import InputError

__all__ = ["HookedLM", "LMOutput", "as_module", "framework_of", "hooked_from_hf", "require_interop"]


def _origin(obj: Any) -> str:
    return type(obj).__module__.partition(".")[0]


def framework_of(model: Any) -> str:
    """``"nnsight"``, ``"transformer_lens"`` or ``"torch"`` (HF models and plain modules)."""
    origin = _origin(model)
    if origin == "nnsight":
        return "nnsight"
    if isinstance(model, HookedLM) or (
        origin == "transformer_lens" and hasattr(model, "hook_dict") and hasattr(model, "cfg")
    ):
        return "transformer_lens"
    return "torch"


def as_module(model: Any) -> nn.Module:
    """The ``nn.Module`` Tyche measures for ``model`` (see the module docstring).

    An HF model or plain module comes back as it is; an nnsight wrapper as the module it
    wraps; a TransformerLens ``HookedTransformer`` as a :class:`HookedLM` over it. Raises
    ``InputError`` for anything that is not a torch module or one of those.
    """
    kind = framework_of(model)
    if kind == "nnsight":
        inner = getattr(model, "_module", None)
        if not isinstance(inner, nn.Module):
            raise InputError(f"this nnsight {type(model).__name__} wraps no torch module")
        return inner
    if kind == "transformer_lens" and isinstance(getattr(model, "original_model", None), nn.Module):
        if getattr(model, "_weights_processed", False):
            raise InputError(
                "this TransformerBridge's weights were processed (enable_compatibility_mode "
                "folds layer norms), so its HF modules no longer hold the model's own weights; "
                "measure it before enable_compatibility_mode(), or boot it without processing"
            )
        return model.original_model
    if kind == "transformer_lens" and not isinstance(model, HookedLM):
        return HookedLM(model)
    if not isinstance(model, nn.Module):
        raise InputError(
            f"expected a torch nn.Module, a HuggingFace model, a TransformerLens "
            f"HookedTransformer or an nnsight model; got {type(model).__name__}"
        )
    return model


@dataclass
class LMOutput:
    """What a HuggingFace causal LM returns, as far as Tyche reads it."""

    logits: torch.Tensor
    """(B, T, V) next-token logits"""
    loss: torch.Tensor | None = None
    """mean next-token cross-entropy (nats) over labels that are not -100, when labels given"""

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


class HookedLM(nn.Module):
    """A TransformerLens ``HookedTransformer`` with the HuggingFace calling convention.

    It *shares* the model's submodules (``self._modules is hooked._modules``): its named
    modules and parameters are the TransformerLens model's own, hooks put on them fire in
    ``hooked.run_with_hooks`` as well, and ``torch.func.functional_call`` on this view swaps
    the TransformerLens model's parameters. ``hooked`` is kept outside the module tree.
    """

    def __init__(self, hooked: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "hooked", hooked)
        self._modules = hooked._modules  # the same dict: one tree of modules, two roots
        self.training = hooked.training
        cfg = hooked.cfg
        self.cfg = cfg
        self.config = SimpleNamespace(
            model_type="transformer_lens",
            vocab_size=cfg.d_vocab,
            hidden_size=cfg.d_model,
            num_hidden_layers=cfg.n_layers,
            num_attention_heads=cfg.n_heads,
            n_positions=cfg.n_ctx,
            eos_token_id=getattr(getattr(hooked, "tokenizer", None), "eos_token_id", None),
        )

    @property
    def device(self) -> torch.device:
        first = next(self.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    def _apply(self, fn: Any, recurse: bool = True) -> HookedLM:
        """``.to()``, ``.double()``, ...: as for any module, then ``cfg.dtype``/``cfg.device``
        follow the parameters (TransformerLens's norms cast their output to ``cfg.dtype``)."""
        super()._apply(fn, recurse)
        first = next((p for p in self.parameters() if p.is_floating_point()), None)
        if first is not None:
            self.cfg.dtype, self.cfg.device = first.dtype, str(first.device)
        return self

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> LMOutput:
        """``input_ids`` (B, T) token ids; ``attention_mask`` (B, T), passed on only when it
        masks something; ``labels`` (B, T) give ``loss`` (shifted, -100 ignored)."""
        if input_ids is None:
            raise InputError("HookedLM needs input_ids (B, T) token ids")
        if kwargs:
            raise InputError(f"HookedLM does not take {sorted(kwargs)}; pass input_ids")
        masks = attention_mask is not None and not bool(attention_mask.bool().all())
        logits = self.hooked(
            input_ids, return_type="logits", attention_mask=attention_mask if masks else None
        )
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        return LMOutput(logits, loss)

    def get_input_embeddings(self) -> nn.Module:
        return self.hooked.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.hooked.unembed

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        attention_mask: torch.Tensor | None = None,
        **_: Any,
    ) -> torch.Tensor:
        """Sample (or take the argmax of) ``max_new_tokens`` tokens after ``input_ids`` (B, T),
        one full forward pass per token so that hooks see every position every step;
        returns (B, T + max_new_tokens)."""
        tokens = input_ids
        for _ in range(max_new_tokens):
            logits = self.forward(tokens).logits[:, -1].float()
            if not do_sample:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                nxt = torch.multinomial(
                    _filtered(logits / temperature, top_k, top_p).softmax(-1), 1
                )
            tokens = torch.cat([tokens, nxt.to(tokens.dtype)], dim=1)
        return tokens


def _filtered(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Logits (B, V) with everything outside the top ``k`` and the nucleus ``p`` set to -inf."""
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        drop = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1) > top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def require_interop(module: str, what: str) -> Any:
    """Import ``module`` (a library of the ``[interop]`` extra) or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise InputError(
            f"{what} needs {module}; install the interop extra: pip install 'tyche[interop]'"
        ) from err


def hooked_from_hf(folder: str, hf_model: nn.Module, tokenizer: Any = None) -> nn.Module:
    """A TransformerLens ``HookedTransformer`` holding ``hf_model``'s weights, unprocessed.

    ``folder`` is the model's ``save_pretrained`` folder (TransformerLens reads its
    ``config.json`` to build the ``HookedTransformerConfig``); the weights are converted by
    TransformerLens's own converter for the architecture and loaded with no folding or
    centring (``fold_ln``, ``center_writing_weights``, ``center_unembed``,
    ``fold_value_biases`` all off), so every hook point holds the HF model's own tensor and
    the logits equal the HF model's to float rounding (BENCHMARKS.md). dtype and device follow
    ``hf_model``'s parameters. Raises ``InputError`` when TransformerLens is missing or does
    not know the architecture.
    """
    tl = require_interop("transformer_lens", "a TransformerLens model (--model tl:...)")
    import transformer_lens.loading_from_pretrained as loading

    param = next(hf_model.parameters())
    try:
        fields = loading.convert_hf_model_config(str(folder))
    except (ValueError, NotImplementedError, KeyError) as err:
        raise InputError(f"TransformerLens cannot convert the model in {folder}: {err}") from err
    known = tl.HookedTransformerConfig.__dataclass_fields__
    cfg = tl.HookedTransformerConfig(
        **{k: v for k, v in fields.items() if k in known},
        device=str(param.device),
        dtype=param.dtype,
    )
    state = loading.get_pretrained_state_dict(
        str(folder), cfg, hf_model=hf_model, dtype=param.dtype
    )
    with warnings.catch_warnings():  # HookedTransformer's deprecation notice
        warnings.simplefilter("ignore")
        hooked = tl.HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    hooked.load_and_process_state_dict(
        state,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    return hooked.to(param.device, print_details=False).eval()

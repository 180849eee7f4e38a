"""Put codebooks into any model: :func:`attach` and :class:`CodebookModel`.

Codebooks sit at *sites* (:mod:`tyche.sites`): ``attn_heads.i`` (the per-head outputs before
the attention output projection, one codebook per head), ``mlp_out.i``, ``resid_post.i``,
``attn_out.i`` or any module name. They are inserted with persistent forward hooks
(:func:`tyche.hooks.add_replacement_hooks`) that replace the tensor at the site by the
codebook's output; the model's own modules, attention code included, are untouched, so this
works for GPT-2, GPT-NeoX, Llama and any model the sites resolve on. A TransformerLens
``HookedTransformer`` or an nnsight model is taken as :func:`tyche.frameworks.as_module` gives
it: on TransformerLens the sites may be hook names (``blocks.0.attn.hook_z`` gets one codebook
per head, like ``attn_heads.0``), and since the view shares the model's modules the codebooks
act in its own forward passes too (``hooked(tokens)``, ``run_with_hooks``, ``run_with_cache``).

A :class:`CodebookModel` is an ``nn.Module`` holding the base model and the codebooks, so
``named_parameters()`` lists both: an optimiser built from it after attaching trains every
parameter (the original built its parameter groups before replacing attention modules, so
those never trained). ``forward`` and ``generate`` are the base model's.

Saved folders (:meth:`CodebookModel.save_pretrained`) hold the base model exactly as
``save_pretrained`` writes it (``config.json``, ``model.safetensors``, the tokenizer if
given), loadable by ``transformers`` on its own, plus ``codebooks.safetensors`` (every
codebook's parameters and usage counts) and ``codebooks.json`` (sites and settings). A
TransformerLens base cannot be saved that way: its folder holds the codebooks only, and
reloading takes the model (``from_pretrained(path, base_model=hooked)``, checked by its hash).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tyche.codebook.layer import CodebookLayer, GroupedCodebookLayer, Loss, Similarity
from tyche.errors import InputError
from tyche.frameworks import as_module, framework_of
from tyche.hooks import ReplacementHooks, add_replacement_hooks, read_activations
from tyche.io import json_text, model_hash
from tyche.sites import resolve_sites

__all__ = ["CODEBOOKS_CONFIG", "CODEBOOKS_WEIGHTS", "CodebookModel", "attach"]

CODEBOOKS_CONFIG = "codebooks.json"
CODEBOOKS_WEIGHTS = "codebooks.safetensors"
FORMAT = "tyche-codebooks"
FORMAT_VERSION = 1


def _key(site_name: str) -> str:
    """A ModuleDict key for a site name (dots and colons are not allowed there)."""
    return site_name.replace(".", "_").replace(":", "__")


def _param_like(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.get_default_dtype()


class CodebookModel(nn.Module):
    """A base model with codebooks at some of its sites (build it with :func:`attach`).

    ``base`` is the wrapped model, ``codebooks`` a ``ModuleDict`` of the layers; ``sites``
    lists the site names in forward order; ``codebook(site)`` returns one layer. Calling the
    model calls the base model (its outputs, loss and ``generate`` are the base model's, with
    every activation at a site replaced by its codebook's output).
    """

    def __init__(self, base: nn.Module) -> None:
        """``base``: the model, as :func:`tyche.frameworks.as_module` takes it."""
        super().__init__()
        if isinstance(base, CodebookModel):
            raise TypeError("base is already a CodebookModel; pass it to attach() to add sites")
        self.base = as_module(base)
        self.codebooks = nn.ModuleDict()
        self._site_names: list[str] = []
        self._hooks: ReplacementHooks | None = None
        self._detached = False
        #: optional tokenizer, saved next to the model by save_pretrained
        self.tokenizer: Any | None = None
        #: the command line's spec of a TransformerLens base (``tl:...``), saved with the
        #: codebooks so that the command line can rebuild that base
        self.base_spec: str | None = None

    # ------------------------------------------------------------------ structure
    @property
    def sites(self) -> list[str]:
        """Site names of the codebooks, in forward order."""
        return list(self._site_names)

    @property
    def config(self) -> Any:
        """The base model's config (HF models)."""
        return getattr(self.base, "config", None)

    @property
    def device(self) -> torch.device:
        return _param_like(self.base)[0]

    def codebook(self, site: str) -> GroupedCodebookLayer:
        """The codebook layer at ``site`` (a name from :attr:`sites`)."""
        if site not in self._site_names:
            raise InputError(f"no codebook at site {site!r}; codebooks are at {self.sites}")
        return self.codebooks[_key(site)]  # type: ignore[return-value]

    def layers(self) -> dict[str, GroupedCodebookLayer]:
        """``{site: layer}`` in forward order."""
        return {s: self.codebook(s) for s in self._site_names}

    def match(self, patterns: str | Sequence[str] | None) -> list[str]:
        """Codebook sites matching alias/module-name globs (None: all), in forward order.

        Raises ``ValueError`` when a pattern matches a site that has no codebook or nothing.
        """
        if patterns is None:
            return self.sites
        names = [s.name for s in resolve_sites(self.base, patterns)]
        missing = [n for n in names if n not in self._site_names]
        if missing:
            raise InputError(f"sites {missing} have no codebook; codebooks are at {self.sites}")
        return [s for s in self._site_names if s in names]

    def _add(self, site: str, layer: GroupedCodebookLayer) -> None:
        if site in self._site_names:
            raise InputError(f"site {site!r} already has a codebook")
        self.codebooks[_key(site)] = layer
        self._site_names.append(site)

    def _rehook(self) -> None:
        """(Re)place one replacement hook per codebook, in forward order."""
        if self._hooks is not None:
            self._hooks.remove()
        mapping = {site: self.codebook(site) for site in self._site_names}
        self._hooks = add_replacement_hooks(self.base, mapping) if mapping else None
        if self._hooks is not None:
            self._site_names = [s.name for s in self._hooks.sites]

    def __deepcopy__(self, memo: dict) -> CodebookModel:
        """A copy whose hooks call its own codebooks (hooks are not copied, they are re-placed)."""
        import copy

        hooked = self._hooks is not None
        if hooked:
            self._hooks.remove()  # type: ignore[union-attr]
            self._hooks = None
        try:
            new = type(self).__new__(type(self))
            memo[id(self)] = new
            for key, value in self.__dict__.items():
                new.__dict__[key] = copy.deepcopy(value, memo)
        finally:
            if hooked:
                self._rehook()
        if hooked:
            new._rehook()
        return new

    def detach(self) -> nn.Module:
        """Remove the codebooks' hooks and return the base model (as it was before)."""
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
        self._detached = True
        return self.base

    # ------------------------------------------------------------------ running
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._detached:
            raise RuntimeError("this CodebookModel was detached; attach() the codebooks again")
        return self.base(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The base model's ``generate`` (HF models), with the codebooks in place."""
        if self._detached:
            raise RuntimeError("this CodebookModel was detached; attach() the codebooks again")
        if not hasattr(self.base, "generate"):
            raise TypeError(f"{type(self.base).__name__} has no generate()")
        return self.base.generate(*args, **kwargs)

    def set_snap(self, on: bool, sites: str | Sequence[str] | None = None) -> None:
        """Switch snapping on or off at the codebooks matching ``sites`` (None: all).

        A codebook that does not snap passes its input through unchanged.
        """
        for site in self.match(sites):
            self.codebook(site).snap = bool(on)

    @contextmanager
    def snapping(self, on: bool, sites: str | Sequence[str] | None = None):
        """Context manager form of :meth:`set_snap`; the previous states come back on exit."""
        chosen = self.match(sites)
        before = {s: self.codebook(s).snap for s in chosen}
        try:
            self.set_snap(on, chosen)
            yield self
        finally:
            for site, state in before.items():
                self.codebook(site).snap = state

    # ------------------------------------------------------------------ parameters
    def codebook_parameters(self) -> list[nn.Parameter]:
        """Every parameter of every codebook (codes and layer-norm affines)."""
        return list(self.codebooks.parameters())

    def model_parameters(self) -> list[nn.Parameter]:
        """Every parameter of the base model (read now, after the codebooks were attached)."""
        return list(self.base.parameters())

    def fingerprint(self) -> str:
        """:func:`tyche.io.model_hash` of base and codebook tensors (usage counts left out)."""
        state = {k: v for k, v in self.state_dict().items() if not k.endswith(".usage")}
        return model_hash(state)

    def reset_usage(self) -> None:
        """Zero every codebook's usage counts."""
        for layer in self.codebooks.values():
            layer.reset_usage()

    # ------------------------------------------------------------------ k-means
    @torch.no_grad()
    def kmeans_init(
        self,
        batches: Iterable[Mapping[str, torch.Tensor] | torch.Tensor],
        *,
        max_tokens: int = 16384,
        iters: int = 25,
        seed: int = 0,
        sequential: bool = True,
        calibrate: bool = False,
    ) -> dict[str, int]:
        """Initialise every codebook by k-means on the activations at its site.

        Takes ``batches`` (dicts of model inputs, or input-id tensors) until ``max_tokens``
        tokens, runs the model over them with the codebooks collecting their inputs instead of
        snapping, and clusters each codebook's (each head's) normalised inputs into its
        ``num_codes`` codes (:meth:`GroupedCodebookLayer.init_codes`; ``calibrate`` fits the
        layer norms' affines first, so codes output at the input's scale).

        ``sequential`` initialises the codebooks one site at a time in forward order, with the
        ones before already snapping: each clusters the activations it will see, not those of
        the model without codebooks (one pass over the batches per site). Otherwise one pass
        serves every site. Returns the tokens used per site. Snap states are restored.
        """
        layers = self.layers()
        kept: list[Mapping[str, torch.Tensor] | torch.Tensor] = []
        seen = 0
        for batch in batches:
            ids = batch if isinstance(batch, torch.Tensor) else batch["input_ids"]
            kept.append(batch)
            seen += ids.numel()
            if seen >= max_tokens:
                break
        if seen == 0:
            raise InputError("kmeans_init got no batches")
        snaps = {site: layer.snap for site, layer in layers.items()}
        was_training = self.training
        self.eval()
        rounds = [[s] for s in layers] if sequential else [list(layers)]
        used: dict[str, int] = {}
        try:
            for done, sites in enumerate(rounds):
                before = set(s for r in rounds[:done] for s in r)
                for site, layer in layers.items():
                    layer.snap = snaps[site] if site in before else False
                    layer.collected = [] if site in sites else None
                for batch in kept:
                    if isinstance(batch, torch.Tensor):
                        self.base(input_ids=batch.to(self.device))
                    else:
                        self.base(**{k: v.to(self.device) for k, v in batch.items()})
                for site in sites:
                    layer = layers[site]
                    if not layer.collected:
                        raise InputError(f"kmeans_init: site {site} was not reached")
                    data = torch.cat(layer.collected)[:max_tokens]
                    layer.collected = None
                    index = list(layers).index(site)
                    layer.init_codes(data, iters=iters, seed=seed + index, calibrate=calibrate)
                    used[site] = data.shape[0]
            return used
        finally:
            for site, layer in layers.items():
                layer.collected = None
                layer.snap = snaps[site]
            self.train(was_training)

    # ------------------------------------------------------------------ saving
    def settings(self) -> dict[str, Any]:
        """JSON description of the codebooks (what :meth:`from_pretrained` rebuilds)."""
        from tyche._version import __version__

        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tyche_version": __version__,
            "base_class": type(self.base).__name__,
            "codebooks": [
                {
                    "site": site,
                    "grouped": not isinstance(self.codebook(site), CodebookLayer),
                    "snap": self.codebook(site).snap,
                    **self.codebook(site).settings(),
                }
                for site in self._site_names
            ],
        }

    def save_pretrained(self, path: str | os.PathLike[str], tokenizer: Any | None = None) -> Path:
        """Write the base model (``save_pretrained``), the tokenizer and the codebooks.

        A TransformerLens base has no ``save_pretrained``: the folder then holds the codebooks
        (and the tokenizer, if given) but not the model, and ``codebooks.json`` records the
        model's name and weights hash under ``"base_model"``. Reloading needs the model:
        ``CodebookModel.from_pretrained(path, base_model=hooked)`` with the same weights
        (checked against the hash).
        """
        from safetensors.torch import save_file

        without_base = framework_of(self.base) == "transformer_lens"
        if not without_base and not hasattr(self.base, "save_pretrained"):
            raise TypeError(
                f"{type(self.base).__name__} has no save_pretrained; save "
                "model.codebooks.state_dict() and model.settings() yourself"
            )
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        settings = self.settings()
        if without_base:
            settings["base_model"] = _transformer_lens_record(self.base)
            # how the command line rebuilds that base (`--model tl:...`), when it built it
            settings["base_model"]["spec"] = getattr(self, "base_spec", None)
        else:
            self.base.save_pretrained(path)
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
        tensors = {
            k: v.detach().to("cpu").contiguous() for k, v in self.codebooks.state_dict().items()
        }
        save_file(tensors, str(path / CODEBOOKS_WEIGHTS), metadata={"format": "pt"})
        (path / CODEBOOKS_CONFIG).write_text(json_text(settings, indent=1, sort_keys=False))
        return path

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        base_model: nn.Module | None = None,
        *,
        dtype: torch.dtype | None = torch.float32,
        device: torch.device | str | None = None,
    ) -> CodebookModel:
        """Rebuild a model saved by :meth:`save_pretrained` (base, codebooks, tokenizer).

        ``base_model`` replaces loading the base from the folder (it must be the same model;
        a folder saved from a TransformerLens model needs it, and its weights hash must match).
        Raises ``FileNotFoundError`` for a folder without codebooks and ``ValueError`` for a
        format it cannot read or tensors that do not fit.
        """
        from safetensors.torch import load_file

        path = Path(path)
        cfg_file, weights = path / CODEBOOKS_CONFIG, path / CODEBOOKS_WEIGHTS
        if not cfg_file.is_file() or not weights.is_file():
            raise FileNotFoundError(
                f"{path} holds no codebooks (expected {CODEBOOKS_CONFIG} and {CODEBOOKS_WEIGHTS}; "
                "write them with CodebookModel.save_pretrained)"
            )
        cfg = json.loads(cfg_file.read_text())
        if cfg.get("format") != FORMAT or int(cfg.get("format_version", 99)) > FORMAT_VERSION:
            raise InputError(f"{cfg_file} is not a codebook config this tyche can read")
        tokenizer = None
        if base_model is not None:
            base_model = as_module(base_model)
        if isinstance(cfg.get("base_model"), dict):
            _check_saved_base(path, cfg["base_model"], base_model)
        if base_model is None:
            from transformers import AutoModelForCausalLM

            kwargs = {} if dtype is None else {"dtype": dtype}
            base_model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
            if (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file():
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(path)
        if device is not None:
            base_model = base_model.to(device)
        model = cls(base_model)
        dev, dt = _param_like(base_model)
        for entry in cfg["codebooks"]:
            kwargs = {k: entry[k] for k in ("similarity", "loss", "beta")}
            kwargs["restore_scale"] = entry.get("restore_scale", False)
            if entry["grouped"]:
                layer = GroupedCodebookLayer(
                    entry["n_groups"], entry["dim"], entry["num_codes"], entry["k"], **kwargs
                )
            else:
                layer = CodebookLayer(entry["dim"], entry["num_codes"], entry["k"], **kwargs)
            layer.snap = bool(entry.get("snap", True))
            model._add(entry["site"], layer.to(dev, dt))
        state = load_file(str(weights), device=str(dev))
        try:
            model.codebooks.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise InputError(f"{weights} does not fit {cfg_file}: {err}") from err
        model._rehook()
        model.tokenizer = tokenizer
        return model.train(base_model.training)


def _transformer_lens_record(base: nn.Module) -> dict[str, Any]:
    """What ``codebooks.json`` keeps of a TransformerLens base it does not hold."""
    hooked = getattr(base, "hooked", base)
    return {
        "framework": "transformer_lens",
        "class": type(hooked).__name__,
        "model_name": getattr(getattr(base, "cfg", None), "model_name", None),
        "fingerprint": model_hash(base),
    }


def _check_saved_base(path: Path, saved: dict[str, Any], base: nn.Module | None) -> None:
    """Refuse to load codebooks saved without their (TransformerLens) model unless the same
    model is given."""
    name = saved.get("model_name") or "the model"
    if base is None:
        raise InputError(
            f"{path} holds the codebooks of a TransformerLens {saved.get('class')} ({name}) "
            "but not the model (TransformerLens has no save_pretrained); load that model "
            "again and pass it: CodebookModel.from_pretrained(path, base_model=model)"
        )
    theirs = model_hash(base)
    if saved.get("fingerprint") not in (None, theirs):
        raise InputError(
            f"base_model is not the model the codebooks in {path} were saved with (weights "
            f"hash {theirs}, saved {saved['fingerprint']} for {name}); pass that model, in "
            "the same dtype"
        )


def _example_inputs(model: nn.Module, device: torch.device) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.zeros(1, 2, dtype=torch.long, device=device)}


def attach(
    model: nn.Module,
    sites: str | Sequence[str] = ("attn_heads.*", "mlp_out.*"),
    num_codes: int = 1000,
    k: int = 1,
    *,
    similarity: Similarity = "inner_product",
    loss: Loss = "aeloss",
    beta: float = 0.25,
    restore_scale: bool = False,
    example_inputs: Mapping[str, torch.Tensor] | torch.Tensor | None = None,
    seed: int | None = None,
) -> CodebookModel:
    """Insert a codebook at every site matching ``sites``; returns a :class:`CodebookModel`.

    ``model`` is any model the sites resolve on (HF causal LMs of the GPT-2, GPT-NeoX and
    Llama families by alias; a TransformerLens ``HookedTransformer``, by alias or hook name; an
    nnsight model, as the module it wraps), or a :class:`CodebookModel` to add more codebooks
    to.
    ``attn_heads`` sites get a :class:`GroupedCodebookLayer` (one codebook of ``num_codes``
    codes per head), other sites a :class:`CodebookLayer`. Widths are read from one forward
    pass on ``example_inputs`` (default: two tokens of id 0). Codebooks follow the device and
    dtype of the model; ``seed`` seeds their initial codes. ``restore_scale`` gives each
    output its input's own mean and spread (see :mod:`tyche.codebook.layer`; for a frozen base).

    Raises ``ValueError`` for ``k > num_codes``, a bad setting, or a site pattern that
    matches nothing (naming close matches).
    """
    kwargs = {"similarity": similarity, "loss": loss, "beta": beta, "restore_scale": restore_scale}
    probe = GroupedCodebookLayer(1, 1, num_codes, k, **kwargs)
    del probe  # validates every setting before anything runs
    cb = model if isinstance(model, CodebookModel) else CodebookModel(model)
    base = cb.base
    resolved = resolve_sites(base, sites)
    taken = [s.name for s in resolved if s.name in cb.sites]
    if taken:
        raise InputError(f"sites {taken} already have codebooks")
    device, dtype = _param_like(base)
    inputs = example_inputs if example_inputs is not None else _example_inputs(base, device)
    was_training = base.training
    base.eval()
    try:
        with torch.no_grad(), read_activations(base, resolved) as acts:
            if isinstance(inputs, torch.Tensor):
                base(inputs)
            else:
                base(**inputs)
    finally:
        base.train(was_training)
    if seed is not None:
        torch.manual_seed(seed)
    for site in resolved:
        if site.name not in acts:
            raise InputError(f"site {site.name} was not reached by a forward pass of the model")
        shape = acts[site.name].shape
        if site.n_heads:
            layer: GroupedCodebookLayer = GroupedCodebookLayer(
                site.n_heads, shape[-1], num_codes, k, **kwargs
            )
        else:
            layer = CodebookLayer(shape[-1], num_codes, k, **kwargs)
        cb._add(site.name, layer.to(device, dtype))
    cb._rehook()
    return cb.train(base.training)

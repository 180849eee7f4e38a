"""Sparse dictionaries (SAEs and transcoders) from SAELens and sparsify, read without them.

A :class:`Dictionary` maps activations ``x`` (..., d_in) at one site to latent activations
``a`` (..., n_latents) and back to (..., d_out)::

    pre  = (x - b_dec · apply_b_dec_to_input) @ W_enc + b_enc
    a    = σ(pre)        relu | jumprelu: relu(pre)·[pre > θ] | topk: the k largest, relu'd
                         | groupmax: the largest of each of k equal groups, relu'd
    x̂    = a @ W_dec + b_dec  (+ x @ W_skipᵀ for skip transcoders)

A transcoder reads one site (``hook_name``) and writes another (``hook_name_out``). Folders:

* **SAELens**: ``cfg.json`` + ``sae_weights.safetensors`` (architectures standard, jumprelu,
  topk, transcoder, skip_transcoder, jumprelu_transcoder, jumprelu_skip_transcoder;
  ``normalize_activations`` must be ``"none"``);
* **sparsify**: ``cfg.json`` + ``sae.safetensors`` (``encoder`` linear, ``W_dec``, ``b_dec``,
  optional ``W_skip``; TopK or GroupMax; SAEs subtract ``b_dec`` from their input, transcoders
  do not), or a sparsify run folder with one such folder per hookpoint.

Neither library is imported. :func:`save_saelens` and :func:`save_sparsify` write the layouts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from tyche.errors import InputError

__all__ = [
    "Dictionary",
    "find_dictionary",
    "hookpoints",
    "load_dictionary",
    "save_saelens",
    "save_sparsify",
]

Activation = Literal["relu", "jumprelu", "topk", "groupmax"]
ACTIVATIONS = ("relu", "jumprelu", "topk", "groupmax")
SAELENS_WEIGHTS, SPARSIFY_WEIGHTS, CONFIG = "sae_weights.safetensors", "sae.safetensors", "cfg.json"
#: SAELens architectures read here: name -> (activation, transcoder)
SAELENS_ARCHITECTURES = {
    "standard": ("relu", False),
    "jumprelu": ("jumprelu", False),
    "topk": ("topk", False),
    "transcoder": ("relu", True),
    "skip_transcoder": ("relu", True),
    "jumprelu_transcoder": ("jumprelu", True),
    "jumprelu_skip_transcoder": ("jumprelu", True),
}
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16}  # fmt: skip


@dataclass(frozen=True)
class Dictionary:
    """A sparse dictionary: encoder, activation, decoder (see the module docstring).

    A frozen dataclass, not an ``nn.Module``: Tyche only reads dictionaries, so their tensors
    never join a model's parameters, state dict or hash; :meth:`to` returns a moved copy.

    Attributes:
        W_enc: (d_in, n_latents) encoder. b_enc: (n_latents,).
        W_dec: (n_latents, d_out) decoder, one row per latent. b_dec: (d_out,).
        activation: ``"relu"``, ``"jumprelu"`` (with ``threshold``), ``"topk"`` or
            ``"groupmax"`` (with ``k``).
        k: latents kept per position (topk) or groups (groupmax).
        threshold: (n_latents,) jumprelu thresholds.
        apply_b_dec_to_input: subtract ``b_dec`` from ``x`` before encoding (needs
            d_in = d_out).
        W_skip: (d_out, d_in) linear skip connection of a skip transcoder, or None.
        transcoder: reads ``hook_name`` and writes ``hook_name_out`` (another site).
        hook_name: the site the encoder reads (a TransformerLens hook name, a module name,
            ``name:input``), None when the folder does not say.
        hook_name_out: the site a transcoder writes (None for SAEs: ``hook_name``).
        source: ``"saelens"``, ``"sparsify"`` or ``""`` (built in code).
        metadata: other fields of the folder's configuration.
    """

    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    activation: Activation = "relu"
    k: int | None = None
    threshold: Tensor | None = None
    apply_b_dec_to_input: bool = False
    W_skip: Tensor | None = None
    transcoder: bool = False
    hook_name: str | None = None
    hook_name_out: str | None = None
    source: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.W_enc.ndim != 2 or self.W_dec.ndim != 2:
            raise InputError("W_enc must be (d_in, n_latents) and W_dec (n_latents, d_out)")
        (d_in, n), d_out = self.W_enc.shape, self.W_dec.shape[1]
        expected = {"b_enc": (n,), "W_dec": (n, d_out), "b_dec": (d_out,)}
        if self.threshold is not None:
            expected["threshold"] = (n,)
        if self.W_skip is not None:
            expected["W_skip"] = (d_out, d_in)
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise InputError(f"dictionary {name} has shape {tuple(getattr(self, name).shape)}"
                                 f", expected {shape} (d_in={d_in}, n_latents={n})")  # fmt: skip
        if self.activation not in ACTIVATIONS:
            raise InputError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.activation == "jumprelu" and self.threshold is None:
            raise InputError("a jumprelu dictionary needs threshold (n_latents,)")
        if self.activation in ("topk", "groupmax"):
            if not isinstance(self.k, int) or not 1 <= self.k <= n:
                raise InputError(f"a {self.activation} dictionary needs k in 1..{n}, got {self.k}")
            if self.activation == "groupmax" and n % self.k:
                raise InputError(f"groupmax needs n_latents={n} divisible by k={self.k}")
        if not self.transcoder and d_in != d_out:
            raise InputError(
                f"an SAE reconstructs its input, so d_in={d_in} must equal "
                f"d_out={d_out}; set transcoder=True for a map between two sites"
            )

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_out(self) -> int:
        return self.W_dec.shape[1]

    @property
    def n_latents(self) -> int:
        return self.W_enc.shape[1]

    @property
    def output_site(self) -> str | None:
        """The site the decoder writes: ``hook_name_out`` for transcoders, else ``hook_name``."""
        return self.hook_name_out if self.transcoder else self.hook_name

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> Dictionary:
        """A copy with every tensor on ``device`` in ``dtype`` (None: unchanged)."""
        moved = {name: getattr(self, name) for name in _TENSORS}
        return replace(self, **{n: None if t is None else t.to(device=device, dtype=dtype)
                                for n, t in moved.items()})  # fmt: skip

    def flat_input(self, x: Tensor) -> Tensor:
        """``x`` (..., d_in), or (..., H, d_head) with H·d_head = d_in (per-head sites) merged."""
        if x.shape[-1] != self.d_in and x.ndim >= 2 and x.shape[-2] * x.shape[-1] == self.d_in:
            x = x.flatten(-2)
        if x.shape[-1] != self.d_in:
            raise InputError(f"the dictionary reads width d_in={self.d_in}, got activations of "
                             f"shape {tuple(x.shape)}")  # fmt: skip
        return x.to(self.W_enc.dtype)

    def pre_activations(self, x: Tensor) -> Tensor:
        """(..., n_latents) encoder outputs before the activation, for ``x`` (..., d_in)."""
        x = self.flat_input(x)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        """Dense latent activations (..., n_latents) for ``x`` (..., d_in); zero = not firing."""
        pre = self.pre_activations(x)
        if self.activation == "relu":
            return pre.relu()
        if self.activation == "jumprelu":
            return pre.relu() * (pre > self.threshold).to(pre.dtype)
        if self.activation == "topk":
            values, index = pre.topk(self.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter_(-1, index, values.relu())
        groups = pre.relu().unflatten(-1, (self.k, -1))  # (..., k, n/k)
        values, index = groups.max(dim=-1)
        offsets = torch.arange(self.k, device=pre.device) * groups.shape[-1]
        return torch.zeros_like(pre).scatter_(-1, index + offsets, values)

    def decode(self, a: Tensor) -> Tensor:
        """(..., d_out) ``a @ W_dec + b_dec`` for latent activations ``a`` (..., n_latents)
        (no skip connection: see :meth:`reconstruct`)."""
        return a.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def reconstruct(self, x: Tensor) -> Tensor:
        """(..., d_out) the dictionary's output for ``x`` (..., d_in), skip connection included."""
        out = self.decode(self.encode(x))
        if self.W_skip is not None:
            out = out + self.flat_input(x) @ self.W_skip.T
        return out

    def latent_contributions(self, a: Tensor, latents: Tensor | None = None) -> Tensor:
        """(..., m, d_out) each latent's term ``a_i · W_dec[i]`` of the output, for ``a``
        (..., n_latents) and ``latents`` (m,) ids (None: all)."""
        index = torch.arange(self.n_latents, device=a.device) if latents is None else latents
        return a[..., index, None].to(self.W_dec.dtype) * self.W_dec[index]


_TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip")


# ----------------------------------------------------------------------------- reading
def _layout(path: Path) -> str | None:
    if (path / CONFIG).is_file() and (path / SAELENS_WEIGHTS).is_file():
        return "saelens"
    if (path / CONFIG).is_file() and (path / SPARSIFY_WEIGHTS).is_file():
        return "sparsify"
    return None


def hookpoints(path: str | os.PathLike[str]) -> list[str]:
    """The hookpoints of a sparsify run folder (its subfolders holding a sparse coder)."""
    root = Path(path).expanduser()
    found = [p.name for p in root.iterdir() if p.is_dir() and _layout(p)] if root.is_dir() else []
    return sorted(found)


def find_dictionary(path: str | os.PathLike[str], hookpoint: str | None = None) -> Path:
    """The folder of the dictionary at ``path`` (a SAELens or sparsify folder, or the one
    coder, or the ``hookpoint`` coder, of a sparsify run folder), weights not read.

    Raises ``InputError`` naming the layouts expected for a folder that is neither.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise InputError(f"no dictionary folder {str(root)!r}")
    if hookpoint is not None and _layout(root) is None:
        root = root / hookpoint
        if not root.is_dir():
            raise InputError(f"{path} has no hookpoint {hookpoint!r}; it has {hookpoints(path)}")
    if _layout(root) is not None:
        return root
    inner = hookpoints(root)
    if len(inner) == 1:
        return root / inner[0]
    if inner:
        raise InputError(f"{root} holds sparse coders for several hookpoints {inner}; pick "
                         f"one (e.g. {root / inner[0]})")  # fmt: skip
    found = sorted(p.name for p in root.iterdir())[:8]
    raise InputError(
        f"{root} is not a dictionary folder: expected {CONFIG} with {SAELENS_WEIGHTS} "
        f"(SAELens) or with {SPARSIFY_WEIGHTS} (sparsify), or one such folder per hookpoint; "
        f"it holds {found or 'nothing'}"
    )


def load_dictionary(path: str | os.PathLike[str], hookpoint: str | None = None) -> Dictionary:
    """Read a SAELens or sparsify dictionary folder (see the module docstring), on the CPU.

    ``hookpoint`` picks one sparse coder of a sparsify run folder (needed when it has
    several). Raises ``InputError`` for a folder that is neither layout, naming what was
    expected (:func:`find_dictionary`), and for settings this reader does not support.
    """
    root = find_dictionary(path, hookpoint)
    layout = _layout(root)
    try:
        cfg = json.loads((root / CONFIG).read_text())
        tensors = load_file(str(root / (SAELENS_WEIGHTS if layout == "saelens" else
                                        SPARSIFY_WEIGHTS)))  # fmt: skip
    except (ValueError, OSError) as err:  # JSON and safetensors errors are ValueErrors
        raise InputError(f"{root}: cannot read the dictionary ({err})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{root / CONFIG} is not a JSON object")
    reader = _from_saelens if layout == "saelens" else _from_sparsify
    try:
        return reader(cfg, tensors, root)
    except KeyError as err:
        raise InputError(f"{root}: the {layout} dictionary lacks {err}") from None


def _refuse(root: Path, what: str) -> InputError:
    return InputError(f"{root}: {what}")


def _from_saelens(cfg: dict[str, Any], tensors: dict[str, Tensor], root: Path) -> Dictionary:
    meta = dict(cfg.get("metadata") or {})
    arch = cfg.get("architecture", "standard")
    if arch not in SAELENS_ARCHITECTURES:
        raise _refuse(root, f"SAELens architecture {arch!r} is not supported (supported: "
                            f"{', '.join(SAELENS_ARCHITECTURES)})")  # fmt: skip
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", False, None):
        raise _refuse(root, f"normalize_activations={norm!r} is not supported (fold the "
                            "normalisation into the weights first)")  # fmt: skip
    if cfg.get("hook_head_index", meta.get("hook_head_index")) is not None:
        raise _refuse(root, "dictionaries of one attention head (hook_head_index) are not "
                            "supported; use one of the whole site")  # fmt: skip
    scale = tensors.pop("scaling_factor", None)
    if scale is not None and not bool((scale == 1).all()):
        raise _refuse(root, "a finetuning scaling_factor is not supported; fold it into "
                            "W_dec and b_dec first")  # fmt: skip
    activation, transcoder = SAELENS_ARCHITECTURES[arch]
    dtype = _DTYPES.get(str(cfg.get("dtype", "float32")).removeprefix("torch."), torch.float32)
    t = {name: value.to(dtype) for name, value in tensors.items()}
    if "log_threshold" in t:  # older jumprelu folders
        t["threshold"] = t.pop("log_threshold").exp()
    W_enc, b_enc, W_dec = t["W_enc"], t["b_enc"], t["W_dec"]
    if activation == "topk" and cfg.get("rescale_acts_by_decoder_norm"):  # fold the norms in
        norms = W_dec.norm(dim=-1)
        W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms[:, None]
    if (cfg.get("d_in"), cfg.get("d_sae")) != tuple(W_enc.shape):
        raise InputError(f"{root}: cfg.json says d_in={cfg.get('d_in')}, d_sae="
                         f"{cfg.get('d_sae')} but W_enc is {tuple(W_enc.shape)}")  # fmt: skip
    hook = meta.pop("hook_name", cfg.get("hook_name", cfg.get("hook_point")))
    hook_out = meta.pop("hook_name_out", cfg.get("hook_name_out"))
    return Dictionary(
        W_enc, b_enc, W_dec, t["b_dec"], activation,
        k=cfg.get("k") if activation == "topk" else None,
        threshold=t.get("threshold") if activation == "jumprelu" else None,
        apply_b_dec_to_input=not transcoder and bool(cfg.get("apply_b_dec_to_input", True)),
        W_skip=t.get("W_skip"), transcoder=transcoder, hook_name=hook,
        hook_name_out=hook_out if transcoder else None, source="saelens",
        metadata={"architecture": arch, **meta},
    )  # fmt: skip


def _from_sparsify(cfg: dict[str, Any], tensors: dict[str, Tensor], root: Path) -> Dictionary:
    activation = cfg.get("activation", "topk")
    if activation not in ("topk", "groupmax"):
        raise _refuse(root, f"sparsify activation {activation!r} is not supported (only "
                            "topk and groupmax)")  # fmt: skip
    transcode = bool(cfg.get("transcode", False))
    weight = tensors["encoder.weight"]
    if weight.shape[1] != cfg.get("d_in"):
        raise InputError(f"{root}: cfg.json says d_in={cfg.get('d_in')} but the encoder "
                         f"reads {weight.shape[1]}")  # fmt: skip
    # a sparsify run folder names its hookpoints in config.json beside the coders' folders
    hookpoint = root.name if (root.parent / "config.json").is_file() else None
    return Dictionary(
        weight.T.contiguous(), tensors["encoder.bias"], tensors["W_dec"], tensors["b_dec"],
        activation, k=int(cfg.get("k", 32)), apply_b_dec_to_input=not transcode,
        W_skip=tensors.get("W_skip"), transcoder=transcode,
        hook_name=None if hookpoint is None else hookpoint + (":input" if transcode else ""),
        hook_name_out=hookpoint if transcode else None, source="sparsify",
        metadata={key: cfg[key] for key in ("multi_topk", "normalize_decoder") if key in cfg},
    )  # fmt: skip


# ----------------------------------------------------------------------------- writing
def _input_bias(d: Dictionary, subtract: bool) -> Dictionary:
    """The same maps with ``apply_b_dec_to_input = subtract``: the encoder bias absorbs
    ``b_dec @ W_enc``, since ``(x - b_dec) W + b = x W + (b - b_dec W)``."""
    if d.apply_b_dec_to_input == subtract:
        return d
    if d.d_in != d.d_out:
        raise InputError("apply_b_dec_to_input needs d_in = d_out")
    shift = d.b_dec.to(d.W_enc.dtype) @ d.W_enc
    return replace(d, b_enc=d.b_enc + shift if subtract else d.b_enc - shift,
                   apply_b_dec_to_input=subtract)  # fmt: skip


def _dtype_name(d: Dictionary) -> str:
    return str(d.W_enc.dtype).removeprefix("torch.")


def _write(path: str | os.PathLike[str], cfg: dict[str, Any], tensors: dict[str, Tensor],
           weights: str) -> Path:  # fmt: skip
    folder = Path(path).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items() if v is not None},
              str(folder / weights))  # fmt: skip
    (folder / CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    return folder


def save_saelens(dictionary: Dictionary, path: str | os.PathLike[str]) -> Path:
    """Write ``dictionary`` as a SAELens folder (``SAE.load_from_disk`` reads it); returns it.

    Transcoders are written without ``apply_b_dec_to_input`` (SAELens refuses it; the bias is
    folded into ``b_enc``). TopK transcoders and groupmax have no SAELens architecture."""
    d = dictionary
    if d.activation == "groupmax" or (d.transcoder and d.activation == "topk"):
        raise InputError(f"SAELens has no {'transcoder ' if d.transcoder else ''}architecture "
                         f"with the {d.activation} activation; use save_sparsify")  # fmt: skip
    if d.W_skip is not None and not d.transcoder:
        raise InputError("SAELens has skip connections for transcoders only")
    if d.transcoder:
        d = _input_bias(d, False) if d.d_in == d.d_out else d
        arch = ("jumprelu_" if d.activation == "jumprelu" else "") + (
            "skip_transcoder" if d.W_skip is not None else "transcoder"
        )
    else:
        arch = {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk"}[d.activation]
    meta = {
        **{k: v for k, v in d.metadata.items() if k != "architecture"},
        "hook_name": d.hook_name,
        "sae_lens_version": "6.0.0",
    }  # the SAELens 6 layout
    if d.transcoder:
        meta["hook_name_out"] = d.hook_name_out
    cfg: dict[str, Any] = {
        "architecture": arch, "d_in": d.d_in, "d_sae": d.n_latents, "dtype": _dtype_name(d),
        "device": "cpu", "apply_b_dec_to_input": d.apply_b_dec_to_input,
        "normalize_activations": "none", "reshape_activations": "none", "metadata": meta,
    }  # fmt: skip
    if arch == "topk":
        cfg.update(k=d.k, rescale_acts_by_decoder_norm=False)
    if d.transcoder:
        cfg["d_out"] = d.d_out
    tensors = {"W_enc": d.W_enc, "b_enc": d.b_enc, "W_dec": d.W_dec, "b_dec": d.b_dec,
               "threshold": d.threshold, "W_skip": d.W_skip}  # fmt: skip
    return _write(path, cfg, tensors, SAELENS_WEIGHTS)


def save_sparsify(dictionary: Dictionary, path: str | os.PathLike[str]) -> Path:
    """Write ``dictionary`` as a sparsify folder (``SparseCoder.load_from_disk`` reads it).

    sparsify coders are TopK or GroupMax with d_in = d_out; an SAE's ``b_dec`` is subtracted
    from its input and a transcoder's is not (otherwise the bias is folded into the encoder's).
    sparsify records a coder's site only by its run layout: ``RUN/<hookpoint>/`` with the
    run's ``config.json`` in ``RUN`` (:func:`load_dictionary` reads the hookpoint from it)."""
    d = dictionary
    if d.activation not in ("topk", "groupmax") or d.d_in != d.d_out:
        raise InputError("sparsify stores topk or groupmax coders with d_in = d_out, not "
                         f"{d.activation} with d_in={d.d_in}, d_out={d.d_out}")  # fmt: skip
    d = _input_bias(d, not d.transcoder)
    unit = bool(((d.W_dec.norm(dim=-1) - 1).abs() < 1e-4).all())  # a flag for training only
    cfg: dict[str, Any] = {
        "activation": d.activation, "expansion_factor": max(d.n_latents // d.d_in, 1),
        "normalize_decoder": unit, "num_latents": d.n_latents, "k": d.k,
        "multi_topk": bool(d.metadata.get("multi_topk", False)),
        "skip_connection": d.W_skip is not None, "transcode": d.transcoder, "d_in": d.d_in,
    }  # fmt: skip
    tensors = {"encoder.weight": d.W_enc.T, "encoder.bias": d.b_enc, "W_dec": d.W_dec,
               "b_dec": d.b_dec, "W_skip": d.W_skip}  # fmt: skip
    return _write(path, cfg, tensors, SPARSIFY_WEIGHTS)

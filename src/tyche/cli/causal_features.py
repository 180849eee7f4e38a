"""``tyche causal --features DIR``: a dictionary's latents ranked by causal energy at its site.

After the causal bases are extracted, the dictionary (SAELens or sparsify folder,
:mod:`tyche.dictionaries`) is read at the site it writes, which must be one of ``--sites``
(a dictionary that names no site needs ``--sites`` to give exactly one). Each latent that
fires is removed where it fires and the mean KL of the same ``--target`` is measured
(:func:`tyche.causal.features.feature_energies`); the principal angles between the site's
causal basis and the span of the top-m latents' decoder rows follow. The table is printed and
the :class:`~tyche.causal.features.LatentEnergies` saved as ``--out/features``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tyche.cli.commandline import CommandError, check_number, split_list
from tyche.errors import InputError

if TYPE_CHECKING:
    import torch

    from tyche.causal.features import Coverage, LatentEnergies
    from tyche.dictionaries import Dictionary

__all__ = [
    "FeaturePlan",
    "check_feature_flags",
    "coverage_text",
    "features_table",
    "plan_features",
    "report_features",
    "run_features",
]

#: the folder in --out that holds the features' result
FEATURES = "features"


@dataclass
class FeaturePlan:
    """What ``--features`` measures: the dictionary, the --sites name of the site it writes,
    and the coverage sizes m."""

    dictionary: Dictionary
    site: str
    sizes: list[int]


def _sizes(text: str, k: int) -> list[int]:
    """``--coverage_m`` as ints (default: k, 2k, 4k)."""
    if not text.strip():
        return [k, 2 * k, 4 * k]
    try:
        sizes = [int(part) for part in split_list(text)]
    except ValueError:
        raise CommandError(f"--coverage_m must be comma-separated ints, got {text!r}") from None
    for size in sizes:
        check_number(size, "--coverage_m", minimum=1, integer=True)
    return sizes


def check_feature_flags(features: str | None, top: int, coverage_m: str, k: int) -> None:
    """The --features flags, checked before anything is loaded (the folder's layout only)."""
    if features is None:
        if coverage_m.strip():
            raise CommandError("--coverage_m applies with --features DIR only")
        return
    from tyche.dictionaries import find_dictionary

    check_number(top, "--features_top", minimum=1, integer=True)
    _sizes(coverage_m, k)
    try:
        find_dictionary(features)
    except InputError as err:
        raise CommandError(f"--features: {err}") from None


def plan_features(features: str, coverage_m: str, k: int, model: torch.nn.Module,
                  tokens: dict[str, Any], sites: list[str]) -> FeaturePlan:  # fmt: skip
    """Load the dictionary and refuse it, in the flags' words, unless it writes one of
    ``sites`` with the width of that site (one probe forward pass reads the widths)."""
    import torch

    from tyche.causal.features import check_widths
    from tyche.dictionaries import load_dictionary
    from tyche.hooks import read_activations
    from tyche.sites import resolve_sites

    try:
        dictionary = load_dictionary(features)
        site = _site_among(model, dictionary, sites)
        reads = resolve_sites(model, dictionary.hook_name)[0].name if dictionary.transcoder \
            and dictionary.hook_name else site  # fmt: skip
    except InputError as err:
        raise CommandError(f"--features: {err}") from None
    probe = {key: v[:1, :2].to(next(model.parameters()).device) for key, v in tokens.items()}
    with torch.no_grad(), read_activations(model, list(dict.fromkeys([site, reads]))) as acts:
        model(**probe)
    try:
        check_widths(dictionary, acts[site], acts[reads], site, reads)
    except InputError as err:
        raise CommandError(f"--features {features}: {err}") from None
    return FeaturePlan(dictionary, site, _sizes(coverage_m, k))


def _site_among(model: torch.nn.Module, dictionary: Dictionary, sites: list[str]) -> str:
    """The name in ``sites`` of the tensor the dictionary writes."""
    from tyche.sites import resolve_sites

    spec = dictionary.output_site
    if spec is None:
        if len(sites) != 1:
            raise InputError(f"the dictionary does not name its site, so --sites must give "
                             f"exactly one site, not {sites}")  # fmt: skip
        return sites[0]
    written = resolve_sites(model, spec)
    if len(written) != 1:
        raise InputError(f"its site {spec!r} matches {[s.name for s in written]}")
    key = (written[0].module_name, written[0].where)
    for site in resolve_sites(model, sites):
        if (site.module_name, site.where) == key:
            return site.name
    raise InputError(f"the dictionary writes {spec} ({written[0].name}), which --sites {sites} "
                     "does not include; add it to --sites")  # fmt: skip


def run_features(plan: FeaturePlan, model: torch.nn.Module, tokens: dict[str, Any],
                 target: str, lens: Any, basis: Any,
                 batch_size: int) -> LatentEnergies:  # fmt: skip
    """The latents' energies and their coverage of ``basis`` (every rank takes part)."""
    from tyche.causal.features import FeatureOptions, feature_energies

    options = FeatureOptions(batch_size=batch_size, coverage_m=tuple(plan.sizes))
    return feature_energies(model, tokens, plan.dictionary, plan.site, options, target=target,
                            lens=lens, basis=basis, progress=True)  # fmt: skip


def report_features(result: LatentEnergies, top: int) -> str:
    """The table of the top latents and the coverage angles, as printed."""
    text = "\n" + features_table(result, top)
    if result.coverage is not None:
        text += "\n" + coverage_text(result.coverage)
    return text


def features_table(result: LatentEnergies, top: int = 10) -> str:
    """The ``top`` latents: id, energy, positions it fires on, energy when firing (nats)."""
    lines = [
        f"latent energies at {result.site or '?'} ({result.target} target, "
        f"{result.n_positions} positions, {len(result.latents)} of {result.n_latents} "
        "latents fire)",
        f"{'rank':>4} {'latent':>7} {'energy':>11} {'fires':>7} {'when firing':>12}  (nats)",
    ]
    for rank in range(min(top, len(result.latents))):
        lines.append(
            f"{rank + 1:>4} {int(result.latents[rank]):>7} "
            f"{float(result.energies[rank]):>11.4g} {int(result.fires[rank]):>7} "
            f"{float(result.firing_energies[rank]):>12.4g}"
        )
    return "\n".join(lines)


def coverage_text(found: Coverage) -> str:
    """One line per m: the principal angles (degrees) between the causal basis and the span."""
    lines = [
        f"principal angles (degrees) between the top-{found.k} causal directions and "
        "the decoder span of the top-m latents"
    ]
    for size, angles in zip(found.m, found.degrees):
        lines.append(f"  m={size:<5} " + " ".join(f"{a:5.1f}" for a in angles.tolist()))
    return "\n".join(lines)

"""Text summaries of codebook results (what ``tyche codebook`` prints): where a code fires,
topic steering, the TokFSM evaluation and the last logged training window.

Every function returns a string (lines joined by newlines) and prints nothing. The search
table is :meth:`tyche.codebook.code_search.SearchResult.table`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tyche.codebook.code_search import Context

__all__ = [
    "contexts_text",
    "forcing_text",
    "purity_table",
    "steering_line",
    "tokfsm_accuracy_text",
    "training_line",
]


def contexts_text(
    site: str,
    code: int,
    contexts: Sequence[Context],
    *,
    head: int | None = None,
    n_fires: int,
    n_tokens: int,
) -> str:
    """A head line (``site[/hN] code C: fires on n_fires of n_tokens tokens``) and one line per
    context, ``  [row:position] before[[token]]after``."""
    lines = [
        f"{site}{'' if head is None else f'/h{head}'} code {code}: "
        f"fires on {n_fires} of {n_tokens} tokens"
    ]
    lines += [f"  [{ctx.row}:{ctx.position}] {ctx.render()}" for ctx in contexts]
    return "\n".join(lines)


def steering_line(row: Mapping[str, Any]) -> str:
    """One word's steering result (a row of :func:`~tyche.codebook.steering.topic_steering`
    with its ``word``): the share of continuations with the word, without and with its codes."""
    return (
        f"{row['word']:<10} baseline {100 * row['baseline_rate']:5.1f}%   with codes "
        f"{100 * row['steered_rate']:5.1f}%   ({row['n']} continuations; codes "
        f"{', '.join(row['codes'])})"
    )


def tokfsm_accuracy_text(report: Mapping[str, Any], n_states: int, n_samples: int) -> str:
    """The first-transition accuracy over all ``n_states`` states and the transition accuracy
    over ``n_samples`` sampled sequences (percent)."""
    return (
        f"first-transition accuracy (all {n_states} states): "
        f"{100 * report['first_transition_accuracy']:.1f}%\n"
        f"transition accuracy ({n_samples} sampled sequences): "
        f"{100 * report['transition_accuracy']:.1f}%"
    )


def purity_table(purity: Mapping[str, Mapping[str, Any]]) -> str:
    """Per codebook (:func:`~tyche.codebook.tokfsm.code_purity`): firing codes and the percent
    of them at least 90% pure for one state and for one trigram."""
    head = f"{'codebook':<22} {'firing':>6} {'≥0.9 pure (state)':>18} {'≥0.9 pure (trigram)':>20}"
    lines = [head]
    for key, rep in purity.items():
        lines.append(
            f"{key:<22} {rep['state']['n_firing']:>6} "
            f"{100 * rep['state']['frac_pure_90']:17.1f}% "
            f"{100 * rep['trigram']['frac_pure_90']:19.1f}%"
        )
    return "\n".join(lines)


def forcing_text(forcing: Mapping[str, Any], sites: Sequence[str]) -> str:
    """What forcing another state's codes at ``sites`` does
    (:func:`~tyche.codebook.steering.state_forcing`): three lines, rates in percent, JSDs in
    nats."""
    return "\n".join(
        [
            f"forcing another state's codes at {', '.join(sites)} "
            f"({forcing['n_trials']} trials), next token: "
            f"closer to that state's than to the own state's in "
            f"{100 * forcing['next_token_success_rate']:.0f}% of trials; mass on digits "
            f"that begin its successors {forcing['next_token_target_mass']:.2f} (without: "
            f"{forcing['next_token_baseline_mass']:.2f}); JSD to that state "
            f"{forcing['next_token_jsd_patched']:.3f} nats (unpatched "
            f"{forcing['next_token_jsd_unpatched']:.3f})",
            f"  whole next state: its successors most likely in "
            f"{100 * forcing['success_rate']:.0f}% of trials "
            f"(without: {100 * forcing['baseline_rate']:.0f}%); JSD to that state "
            f"{forcing['jsd_patched']:.3f} nats (unpatched {forcing['jsd_unpatched']:.3f})",
            f"  whole next state, codes of that state's run also at its digits: its "
            f"successors most likely in {100 * forcing['carried_success_rate']:.0f}% of "
            f"trials; JSD to that state {forcing['carried_jsd_patched']:.3f} nats",
        ]
    )


def training_line(last: Mapping[str, float]) -> str:
    """The last logged window of a training run (a row of ``TrainResult.history``)."""
    return (
        f"last logged: loss {last['loss']:.3f}, reconstruction {last['mse']:.3g}, "
        f"dead codes {100 * last['dead_fraction']:.1f}%, usage entropy "
        f"{last['entropy']:.2f} nats"
    )

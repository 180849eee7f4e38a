"""Streamlit code browser over one cache folder (run by ``tyche codebook app --cache DIR``).

Four tabs: regex **search** (codes ranked by precision against the best neuron), a code's
top **contexts** with the firing token highlighted, a token-by-token **code view** of any
text (runs the cached model), and an **intervention** (generate with a code forced). The
cache folder comes from ``--cache`` after ``--`` or from ``$TYCHE_CODEBOOK_CACHE``.
"""

from __future__ import annotations

import argparse
import html
import os
import sys
from typing import Any

from tyche.cli.codebook_app import CACHE_ENV
from tyche.codebook.cache import CodeCache, load_cache
from tyche.codebook.code_search import code_contexts, search


def _cache_dir(st: Any) -> str:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--cache", default=os.environ.get(CACHE_ENV))
    args, _ = parser.parse_known_args(sys.argv[1:])
    if not args.cache:
        st.error(f"no cache folder: run `tyche codebook app --cache DIR` (or set {CACHE_ENV})")
        st.stop()
    return args.cache


def _load(folder: str) -> CodeCache:
    return load_cache(folder)


def _load_model(folder: str) -> Any:
    return load_cache(folder).load_model()


def _model(folder: str) -> Any:
    import streamlit as st

    return st.cache_resource(show_spinner="loading the model")(_load_model)(folder)


def _head_label(head: int | None) -> str:
    return "" if head is None else str(head)


def _search_tab(cache: CodeCache) -> None:
    import streamlit as st

    pattern = st.text_input(
        "regex", key="pattern", placeholder="e.g. the (king): a group marks the token"
    )
    cols = st.columns(3)
    min_precision = cols[0].slider("min precision", 0.0, 1.0, 0.0, 0.05, key="min_precision")
    min_recall = cols[1].slider("min recall", 0.0, 1.0, 0.01, 0.01, key="min_recall")
    top = cols[2].number_input("rows", 1, 200, 20, key="top")
    if st.button("Search", key="search") and pattern:
        try:
            result = search(
                cache, pattern, min_precision=min_precision, min_recall=min_recall, top=int(top)
            )
        except ValueError as err:
            st.error(str(err))
            return
        st.session_state["result"] = result
    result = st.session_state.get("result")
    if result is None:
        return
    st.markdown(f"**{result.n_positions}** tokens match `{result.pattern}`")
    rows = [
        {
            "site": m["site"],
            "head": _head_label(m["head"]),
            "code": m["code"],
            "precision": round(m["precision"], 3),
            "recall": round(m["recall"], 3),
            "fires": m["n_fires"],
            "best neuron precision": round(m.get("neuron_precision", float("nan")), 3),
        }
        for m in result.matches
    ]
    if rows:
        st.table(rows)
    else:
        st.info("no code reaches these thresholds")
    if result.frac_beating_neurons is not None:
        st.caption(
            f"{100 * result.frac_beating_neurons:.0f}% of these codes are more precise "
            "than the best single neuron at the same recall"
        )


def _contexts_tab(cache: CodeCache) -> None:
    import streamlit as st

    cols = st.columns(4)
    site = cols[0].selectbox("codebook", cache.sites, key="ctx_site")
    groups = cache.layout(site)["n_groups"]
    head = cols[1].number_input("head", 0, groups - 1, 0, key="ctx_head") if groups > 1 else None
    code = cols[2].number_input("code", 0, cache.layout(site)["num_codes"] - 1, 0, key="ctx_code")
    n = cols[3].slider("contexts", 1, 100, 20, key="ctx_n")
    found = code_contexts(
        cache, site, int(code), head=None if head is None else int(head), n=int(n)
    )
    fires = int(cache.counts(site)[head or 0, int(code)])
    st.markdown(f"fires on **{fires}** of {cache.n_sequences * cache.seq_len} tokens")
    lines = [
        f"<div class='ctx'><code>{c.row}:{c.position}</code> {c.render('html')}</div>"
        for c in found
    ]
    st.markdown("\n".join(lines) or "never fires in the cache", unsafe_allow_html=True)


def _token_view_tab(cache: CodeCache, folder: str) -> None:
    import streamlit as st

    if cache.model_dir is None:
        st.info("this cache holds no model (built with --copy_model False)")
        return
    text = st.text_area("text", key="view_text")
    site = st.selectbox("codebook", cache.sites, key="view_site")
    if not st.button("Show codes", key="view") or not text:
        return
    import torch

    model = _model(folder)
    ids = model.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        model(input_ids=ids.to(model.device))
    codes = model.codebook(site).last_ids[0]  # (T, k) or (T, G, k)
    from tyche.codebook.cache import token_pieces

    pieces = token_pieces(model.tokenizer, ids)[0]
    rows = [{"token": repr(p), "codes": str(codes[t].tolist())} for t, p in enumerate(pieces)]
    st.table(rows)


def _intervention_tab(cache: CodeCache, folder: str) -> None:
    import streamlit as st

    if cache.model_dir is None:
        st.info("this cache holds no model (built with --copy_model False)")
        return
    prompt = st.text_input("prompt", key="iv_prompt")
    cols = st.columns(4)
    site = cols[0].selectbox("codebook", cache.sites, key="iv_site")
    groups = cache.layout(site)["n_groups"]
    head = cols[1].number_input("head", 0, groups - 1, 0, key="iv_head") if groups > 1 else None
    code = cols[2].number_input("code", 0, cache.layout(site)["num_codes"] - 1, 0, key="iv_code")
    new = cols[3].number_input("new tokens", 1, 200, 24, key="iv_new")
    if not st.button("Generate", key="iv_run") or not prompt:
        return
    from tyche.codebook.interventions import Intervention, generate

    model = _model(folder)
    tok = model.tokenizer
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    iv = Intervention(site, int(code), head=None if head is None else int(head))
    kwargs = {
        "do_sample": False,
        "max_new_tokens": int(new),
        "pad_token_id": tok.pad_token_id or tok.eos_token_id,
    }
    for name, ivs in (("without", []), ("with code forced", [iv])):
        out = generate(model, ids, ivs, **kwargs)
        text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        st.markdown(
            f"**{name}:** {html.escape(prompt)}<mark>{html.escape(text)}</mark>",
            unsafe_allow_html=True,
        )


def main() -> None:
    import streamlit as st

    st.set_page_config(page_title="tyche code browser", layout="wide")
    folder = _cache_dir(st)
    cache = st.cache_resource(show_spinner="loading the cache")(_load)(folder)
    m = cache.manifest
    st.title("Code browser")
    st.caption(
        f"model {m.get('model_name')} ({m['model_fingerprint']}), data "
        f"{m.get('data_name')}: {m['n_sequences']} × {m['seq_len']} tokens, "
        f"{len(cache.sites)} codebooks"
    )
    tabs = st.tabs(["Search", "Code contexts", "Token view", "Intervention"])
    with tabs[0]:
        _search_tab(cache)
    with tabs[1]:
        _contexts_tab(cache)
    with tabs[2]:
        _token_view_tab(cache, folder)
    with tabs[3]:
        _intervention_tab(cache, folder)


if __name__ == "__main__":  # streamlit runs the script as __main__; importing it does nothing
    main()

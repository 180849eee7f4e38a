"""`tyche codebook ...` end to end on tiny models: every command and every flag."""

from __future__ import annotations

import json

import pytest
import torch

from tyche.__main__ import main
from tyche.cli.codebook import main as codebook_main


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer, tiny_texts):
    """A tiny model folder, a text file, a trained codebook model and its cache."""
    from conftest import build_neox

    root = tmp_path_factory.mktemp("cli")
    folder = root / "model"
    build_neox().save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    text = root / "text.txt"
    text.write_text("\n\n".join(tiny_texts * 6))
    trained = root / "trained"
    main(
        [
            "codebook",
            "train",
            "--model",
            str(folder),
            "--data",
            str(text),
            "--seq_len",
            "16",
            "--seed",
            "1",
            "--sites",
            "attn_heads.1,mlp_out.*",
            "--num_codes",
            "24",
            "--k",
            "2",
            "--similarity",
            "cosine",
            "--loss",
            "fullaeloss",
            "--beta",
            "0.5",
            "--steps",
            "4",
            "--batch_size",
            "4",
            "--lr",
            "2e-3",
            "--code_lr",
            "3e-3",
            "--weight_decay",
            "0.05",
            "--warmup_steps",
            "1",
            "--schedule",
            "constant",
            "--kmeans_init",
            "--kmeans_tokens",
            "40",
            "--kmeans_calibrate",
            "--snap_after",
            "1",
            "--replace_dead_every",
            "2",
            "--log_every",
            "2",
            "--checkpoint_every",
            "2",
            "--eval_sequences",
            "4",
            "--out",
            str(trained),
        ]
    )
    cache = root / "cache"
    main(
        [
            "codebook",
            "cache",
            "--model",
            str(trained),
            "--data",
            str(text),
            "--seq_len",
            "16",
            "--seed",
            "2",
            "--n_sequences",
            "12",
            "--batch_size",
            "5",
            "--neurons",
            "--copy_model",
            "--out",
            str(cache),
        ]
    )
    return {"root": root, "folder": folder, "text": text, "trained": trained, "cache": cache}


def test_train_wrote_a_model_with_the_settings(setup) -> None:
    from tyche.codebook.model import CodebookModel
    from tyche.codebook.train import TrainResult

    model = CodebookModel.from_pretrained(setup["trained"])
    assert model.sites == ["mlp_out.0", "attn_heads.1", "mlp_out.1"]
    layer = model.codebook("attn_heads.1")
    assert (layer.num_codes, layer.k, layer.similarity, layer.loss, layer.beta) == (
        24,
        2,
        "cosine",
        "fullaeloss",
        0.5,
    )
    result = TrainResult.load(setup["trained"] / "train_result")
    cfg = result.config
    assert (cfg["steps"], cfg["batch_size"], cfg["lr"], cfg["code_lr"]) == (4, 4, 2e-3, 3e-3)
    assert (cfg["weight_decay"], cfg["warmup_steps"], cfg["schedule"]) == (0.05, 1, "constant")
    assert cfg["kmeans_init"] and cfg["replace_dead_every"] == 2 and cfg["seed"] == 1
    assert cfg["kmeans_tokens"] == 40 and cfg["snap_after"] == 1
    assert cfg["kmeans_calibrate"] is True
    assert [h["step"] for h in result.history] == [2, 4]
    assert result.evaluation["n_tokens"] == 4 * 15  # --eval_sequences 4 of --seq_len 16
    assert (setup["trained"] / "checkpoint" / "trainer_state.json").is_file()


def test_train_resume_and_freeze(setup, tmp_path) -> None:
    from tyche.codebook.model import CodebookModel

    args = [
        "codebook",
        "train",
        "--model",
        str(setup["folder"]),
        "--data",
        str(setup["text"]),
        "--seq_len",
        "16",
        "--sites",
        "mlp_out.0",
        "--num_codes",
        "8",
        "--steps",
        "2",
        "--batch_size",
        "2",
        "--eval_sequences",
        "2",
        "--restore_scale",
        "--freeze_base",
        "--out",
        str(tmp_path / "run"),
    ]
    main(args)
    # resumed with a flag that changes neither the model nor its data (--steps would)
    main([*args[:-2], "--log_every", "1", "--resume", "--out", str(tmp_path / "run")])
    model = CodebookModel.from_pretrained(tmp_path / "run")
    assert model.codebook("mlp_out.0").restore_scale
    from conftest import build_neox

    for (name, p), q in zip(model.base.named_parameters(), build_neox().parameters()):
        assert torch.equal(p, q), name  # --freeze_base: the base did not move
    scratch = tmp_path / "scratch"
    main([*args[:-3], "--steps", "1", "--from_scratch", "--seed", "5", "--out", str(scratch)])
    fresh = CodebookModel.from_pretrained(scratch).base.get_input_embeddings().weight
    # a fresh init (seed 5) is O(0.02) (the init's std) away from the seed-0 base (measured
    # up to 0.12), far beyond atol 1e-3; reloading the base would be exactly equal
    assert not torch.allclose(fresh, build_neox().get_input_embeddings().weight, atol=1e-3)
    with pytest.raises(ValueError, match="--from_scratch with --freeze_base"):
        codebook_main([*args[1:-2], "--from_scratch", "--out", str(tmp_path / "y")])
    with pytest.raises(ValueError, match="no checkpoint"):
        codebook_main([*args[1:-2], "--resume", "--out", str(tmp_path / "nothing")])
    with pytest.raises(ValueError, match="--sites is empty"):
        codebook_main([*args[1:-2], "--sites", " ", "--out", str(tmp_path / "x")])


def test_search_and_contexts(setup, capsys, tmp_path) -> None:
    from tyche.codebook.code_search import SearchResult

    main(
        [
            "codebook",
            "search",
            "--cache",
            str(setup["cache"]),
            "--pattern",
            "(king)",
            "--sites",
            "mlp_out.0,attn_heads.1",
            "--min_recall",
            "0.0",
            "--min_precision",
            "0.0",
            "--top",
            "3",
            "--neurons",
            "--out",
            str(tmp_path / "found"),
        ]
    )
    text = capsys.readouterr().out
    assert "matched tokens" in text and "best neuron" in text
    found = SearchResult.load(tmp_path / "found")
    assert len(found.matches) == 3
    assert {m["site"] for m in found.matches} <= {"mlp_out.0", "attn_heads.1"}
    main(
        [
            "codebook",
            "search",
            "--cache",
            str(setup["cache"]),
            "--pattern",
            "e",
            "--parity",
            "odd",
            "--no-neurons",
            "--top",
            "2",
        ]
    )
    assert "best neuron" not in capsys.readouterr().out
    top = found.matches[0]
    head = [] if top["head"] is None else ["--head", str(top["head"])]
    main(
        [
            "codebook",
            "contexts",
            "--cache",
            str(setup["cache"]),
            "--site",
            top["site"],
            "--code",
            str(top["code"]),
            *head,
            "--n",
            "2",
            "--window",
            "3",
        ]
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert "fires on" in lines[0] and 1 <= len(lines) - 1 <= 2 and "[[" in lines[1]


def test_intervene(setup, capsys) -> None:
    base = [
        "codebook",
        "intervene",
        "--cache",
        str(setup["cache"]),
        "--prompt",
        "the king",
        "--n_samples",
        "2",
        "--max_new_tokens",
        "3",
        "--temperature",
        "0.8",
        "--seed",
        "3",
    ]
    result = codebook_main(
        [
            *base[1:],
            "--force",
            "mlp_out.1:3",
            "--replace",
            "attn_heads.1/h0:2@-1",
            "--append",
            "mlp_out.0:1",
            "--block",
            "mlp_out.0:0",
        ]
    )
    out = capsys.readouterr().out
    assert "without the intervention" in out and "JSD" in out
    assert len(result["with"]) == 2 and result["jsd"] > 0
    greedy = codebook_main(
        [
            "intervene",
            "--model",
            str(setup["trained"]),
            "--prompt",
            "the",
            "--force",
            "mlp_out.1:3",
            "--temperature",
            "0",
            "--n_samples",
            "1",
            "--max_new_tokens",
            "2",
        ]
    )
    assert len(greedy["without"]) == 1
    with pytest.raises(ValueError, match="at least one of --force"):
        codebook_main(base[1:])
    with pytest.raises(ValueError, match="out of range"):
        codebook_main([*base[1:], "--force", "mlp_out.1:999"])


def test_intervene_refuses_a_position_no_forward_pass_has(setup, capsys) -> None:
    """A forced code past the prompt and the generated tokens is an error, not JSD 0."""
    from conftest import cli

    base = ["codebook", "intervene", "--cache", str(setup["cache"]), "--prompt", "the king"]
    base += ["--temperature", "0", "--n_samples", "1", "--max_new_tokens", "3"]
    for spec in ("mlp_out.1:3@99", "mlp_out.1:3@-99", "mlp_out.1:3@1;4"):
        run = cli(capsys, *base, "--force", spec)
        assert run.code == 2 and run.err.count("error:") == 1 and "Traceback" not in run.err
        p = spec.split("@")[1].split(";")[-1]
        assert f"--force {spec}: position {p} can never apply" in run.err, run.err
        assert "the prompt has 2 tokens and --max_new_tokens 3" in run.err, run.err
    # positions 2 and 3 are generated tokens that are fed back: they apply (JSD after the
    # prompt is then that of the prompt positions only)
    run = cli(capsys, *base, "--force", "mlp_out.1:3@3")
    assert run.code == 0 and "JSD of the next-token distribution" in run.out, run.err


def test_errors_say_the_flags_not_the_library_keywords(setup, capsys, tmp_path) -> None:
    """A per-head codebook without --head, a cache built with --no-copy_model, prompts too
    short for --prompt_tokens: each error names the command's flags (not head=H,
    copy_model=False or max_seq_len=)."""
    from conftest import cli

    cache = str(setup["cache"])
    for head, got in (([], "not no --head"), (["--head", "4"], "not --head 4")):
        run = cli(capsys, "codebook", "contexts", "--cache", cache, "--site", "attn_heads.1",
                  "--code", "0", *head)  # fmt: skip
        assert run.code == 2 and run.err.count("\n") == 1 and "head=H" not in run.err, run.err
        assert "--site attn_heads.1 has one codebook per head (4 heads" in run.err, run.err
        assert f"give --head 0 to 3, {got}" in run.err, run.err
    bare = tmp_path / "bare-cache"
    run = cli(capsys, "codebook", "cache", "--model", str(setup["trained"]), "--data",
              str(setup["text"]), "--seq_len", "16", "--n_sequences", "2", "--no-copy_model",
              "--out", str(bare))  # fmt: skip
    assert run.code == 0, run.err
    for command in (["intervene", "--prompt", "the king", "--force", "mlp_out.1:3"],
                    ["steer", "--prompts", str(setup["text"])]):  # fmt: skip
        run = cli(capsys, "codebook", *command, "--cache", str(bare))
        assert run.code == 2 and "tyche codebook cache --no-copy_model" in run.err, run.err
        assert "(the command's default, --copy_model)" in run.err, run.err
    run = cli(capsys, "codebook", "steer", "--cache", cache, "--prompts", str(setup["text"]),
              "--prompt_tokens", "100000")  # fmt: skip
    assert run.code == 2 and "max_seq_len=" not in run.err, run.err
    assert f"--prompts {setup['text']} has only " in run.err, run.err
    assert "one sequence of --prompt_tokens 100000; give a smaller --prompt_tokens" in run.err


def test_steer(setup, capsys, tmp_path) -> None:
    from conftest import cli, one_line_error

    table = codebook_main(
        [
            "steer",
            "--cache",
            str(setup["cache"]),
            "--words",
            "king,zzz",
            "--prompts",
            str(setup["text"]),
            "--n_prompts",
            "2",
            "--prompt_tokens",
            "4",
            "--samples_per_prompt",
            "2",
            "--max_new_tokens",
            "4",
            "--target",
            "word",
            "--max_codes",
            "2",
            "--min_precision",
            "0.0",
            "--min_recall",
            "0.0",
            "--sites",
            "mlp_out.1",
            "--seed",
            "1",
            "--out",
            str(tmp_path / "steer.json"),
        ]
    )
    out = capsys.readouterr().out
    assert "zzz: no code" in out and "king" in out
    saved = json.loads((tmp_path / "steer.json").read_text())
    assert [row["word"] for row in saved] == ["king"] and saved[0]["n"] == 4
    assert all(code.startswith("mlp_out.1:") for code in saved[0]["codes"])
    assert len(table) == 1
    # no word qualifies: a one-line refusal saying what to change, exit 2, nothing written
    run = cli(capsys, "codebook", "steer", "--cache", str(setup["cache"]), "--words", "zzz",
              "--prompts", str(setup["text"]), "--n_prompts", "1", "--prompt_tokens", "4",
              "--sites", "mlp_out.1", "--out", str(tmp_path / "none.json"))  # fmt: skip
    one_line_error(run, "codebook", "nothing was steered; lower them")
    assert not (tmp_path / "none.json").exists()


def test_tokfsm_command(tmp_path, capsys) -> None:
    from tyche.zoo.tokfsm import TokFSMConfig, train_tokfsm

    cfg = TokFSMConfig(
        n_states=20,
        n_edges=3,
        n_layers=1,
        hidden=32,
        n_heads=2,
        mlp=64,
        seq_len=17,
        batch_size=4,
        steps=2,
        warmup_steps=1,
        snap_after=1,
        num_codes=8,
        eval_samples=4,
        eval_sequences=4,
        threads=None,
        parallel=False,
        forcing_trials=3,
    )
    metrics = train_tokfsm(tmp_path / "tokfsm", cfg, progress=False)
    assert {"codebooks", "baseline", "transition_ratio"} <= set(metrics)
    for name in (
        "fsm.json",
        "codebooks.json",
        "config.json",
        "tokenizer.json",
        "baseline/config.json",
        "baseline/fsm.json",
        "zoo.json",
    ):
        assert (tmp_path / "tokfsm" / name).is_file(), name
    report = codebook_main(
        [
            "tokfsm",
            "--model",
            str(tmp_path / "tokfsm"),
            "--n_samples",
            "3",
            "--seq_len",
            "9",
            "--n_trials",
            "2",
            "--seed",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert "first-transition accuracy" in out and "forcing another state" in out
    assert "whole next state" in out and "codes of that state's run also" in out
    assert report["state_forcing"]["n_trials"] == 2  # --n_trials reaches the measurement
    assert report["state_forcing"]["sites"] == ["mlp_out.0"]
    folder = str(tmp_path / "tokfsm")
    short = ["tokfsm", "--model", folder, "--n_samples", "2", "--seq_len", "9", "--n_trials", "2"]
    with pytest.raises(ValueError, match="no codebook"):  # heads hold one codebook each
        codebook_main([*short, "--forcing_sites", "attn_out.0"])
    with pytest.raises(ValueError, match="state_codes needs single codebooks"):
        codebook_main([*short, "--forcing_sites", "attn_heads.0"])
    # GPT-2's learned position table has no row past 128: refused, even when allowed
    for allow in ([], ["--allow_long_context"]):
        with pytest.raises(ValueError, match=r"--seq_len 129 is past the 128 positions .* cannot"):
            codebook_main([*short[:-4], "--seq_len", "129", *allow])
    report = codebook_main([*short, "--forcing_sites", "mlp_out.0"])
    assert report["state_forcing"]["sites"] == ["mlp_out.0"]
    assert "codes at mlp_out.0 (2 trials)" in capsys.readouterr().out
    assert 0 <= report["first_transition_accuracy"] <= 1
    main(
        [
            "codebook",
            "cache",
            "--model",
            str(tmp_path / "tokfsm"),
            "--data",
            f"fsm:{tmp_path / 'tokfsm'}",
            "--seq_len",
            "9",
            "--n_sequences",
            "3",
            "--no-neurons",
            "--no-copy_model",
            "--out",
            str(tmp_path / "c"),
        ]
    )
    assert (
        not (tmp_path / "c" / "model").exists()
        and not (tmp_path / "c" / "neurons.safetensors").exists()
    )


def test_errors_before_loading(tmp_path, capsys) -> None:
    with pytest.raises(ValueError, match="not a codebook cache"):
        codebook_main(["app", "--cache", str(tmp_path), "--port", "8999", "--headless"])
    with pytest.raises(ValueError, match="--model: no folder"):
        codebook_main(["cache", "--model", str(tmp_path / "none")])
    with pytest.raises(ValueError, match="not a language model"):
        codebook_main(["cache", "--model", "zoo:digits-mlp"])
    with pytest.raises(ValueError, match="--n_sequences must be at least 1"):
        codebook_main(["cache", "--n_sequences", "0"])
    with pytest.raises(ValueError, match="--k 9 > --num_codes 8"):
        codebook_main(["train", "--num_codes", "8", "--k", "9"])
    with pytest.raises(ValueError, match="unknown sub-command"):
        codebook_main(["nonsense"])
    # through `tyche`: one line on stderr, exit code 2, before any model is loaded
    with pytest.raises(SystemExit) as exit_info:
        main(["codebook", "search", "--cache", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tyche codebook: error: --cache") and "\n" not in err
    main(["codebook", "--help"])
    for name in ("train", "cache", "search", "contexts", "intervene", "steer", "tokfsm", "app"):
        with pytest.raises(SystemExit) as exit_info:
            codebook_main([name, "--help"])
        assert exit_info.value.code == 0
        text = capsys.readouterr().out
        assert "--" in text and "(default: None)" not in text

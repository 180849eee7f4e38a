"""Shared fixtures: tiny random GPT-2, GPT-NeoX and Llama models, a tiny tokenizer, a batch.

Every model is built from a config (no hub access), has vocab 512, 2 layers, width 64 and
4 heads, and its parameter count is asserted so a silent config change is caught.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

#: the test workers (torchrun scripts) and helpers shared by several test folders
SUPPORT = Path(__file__).resolve().parent / "support"
sys.path.insert(0, str(SUPPORT))
# a test module may import another folder's helpers (test_distributed reuses test_causal's),
# whichever folders a run selects: every test folder is importable (their names are unique)
for _folder in sorted(SUPPORT.parent.iterdir()):
    if _folder.is_dir() and _folder.name not in ("support", "__pycache__"):
        sys.path.append(str(_folder))

# Threads follow OMP_NUM_THREADS unless TYCHE_TEST_THREADS says otherwise, so the portable
# runs (`make test-portable`) really change how reductions are split across threads.
if os.environ.get("TYCHE_TEST_THREADS"):
    torch.set_num_threads(int(os.environ["TYCHE_TEST_THREADS"]))

# TYCHE_TOLERANCE_REPORT=file.jsonl records how much of its tolerance every comparison uses
# (tests/support/tolerance_report.py); the comparisons are wrapped before any test module
# imports them.
if os.environ.get("TYCHE_TOLERANCE_REPORT"):
    import tolerance_report  # noqa: E402

    _TOLERANCE_RECORDER = tolerance_report.install(os.environ["TYCHE_TOLERANCE_REPORT"])

    def pytest_configure(config: pytest.Config) -> None:
        config.pluginmanager.register(_TOLERANCE_RECORDER, "tyche-tolerance-report")

VOCAB = 512
WIDTH = 64
LAYERS = 2
HEADS = 4

#: expected parameter counts, asserted by the fixtures
PARAM_COUNTS = {"gpt2": 103_936, "neox": 132_608, "llama": 139_584}

WORDS = (
    "the a of and to in is was that he she it his her for on with as at by this be "
    "king queen lord lady love death night day sword crown blood heart fair sweet "
    "come go speak hear see know think make take give stand fall rise"
).split()


@pytest.fixture(scope="session", autouse=True)
def _tyche_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Point the zoo cache at a per-session folder, whatever ``TYCHE_CACHE`` says (the user's
    own cache is never written by the suite). ``TYCHE_TEST_CACHE=~/.cache/tyche`` (read by the
    suite only) opts in to a cache of already trained zoo models, for the slow tests."""
    chosen = os.environ.get("TYCHE_TEST_CACHE")
    folder = Path(chosen).expanduser() if chosen else tmp_path_factory.mktemp("tyche-cache")
    os.environ["TYCHE_CACHE"] = str(folder)


def _finish(model: torch.nn.Module, family: str) -> torch.nn.Module:
    n = sum(p.numel() for p in model.parameters())
    assert n == PARAM_COUNTS[family], f"{family}: {n} parameters"
    return model.eval()


def build_gpt2(seed: int = 0) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=WIDTH,
        n_layer=LAYERS,
        n_head=HEADS,
        n_inner=2 * WIDTH,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    return _finish(GPT2LMHeadModel(cfg), "gpt2")


def build_neox(seed: int = 0) -> torch.nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=2 * WIDTH,
        max_position_embeddings=64,
        rotary_pct=0.25,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    return _finish(GPTNeoXForCausalLM(cfg), "neox")


def build_llama(seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        intermediate_size=2 * WIDTH,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    return _finish(LlamaForCausalLM(cfg), "llama")


BUILDERS = {"gpt2": build_gpt2, "neox": build_neox, "llama": build_llama}


@pytest.fixture(scope="session")
def gpt2_model() -> torch.nn.Module:
    return build_gpt2()


@pytest.fixture(scope="session")
def neox_model() -> torch.nn.Module:
    return build_neox()


@pytest.fixture(scope="session")
def llama_model() -> torch.nn.Module:
    return build_llama()


@pytest.fixture(params=["gpt2", "neox", "llama"])
def hf_model(request: pytest.FixtureRequest) -> torch.nn.Module:
    """Each of the three families in turn (session-cached builds; do not mutate)."""
    return request.getfixturevalue(f"{request.param}_model")


def make_tiny_tokenizer():
    """A word-level fast tokenizer: ids 0 = <|endoftext|> (eos, bos), 1 = <|pad|>, 2 = <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<|pad|>": 1, "<unk>": 2}
    for w in WORDS + [".", ",", "!", "?"]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|pad|>",
        unk_token="<unk>",
        padding_side="right",
    )
    assert len(fast) <= VOCAB
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The word-level tokenizer of :func:`make_tiny_tokenizer`, built once per session."""
    return make_tiny_tokenizer()


def tiny_text_list() -> list[str]:
    """Twenty deterministic pseudo-sentences over the tiny tokenizer's words."""
    g = torch.Generator().manual_seed(0)
    texts = []
    for i in range(20):
        n = 6 + i % 9
        idx = torch.randint(len(WORDS), (n,), generator=g).tolist()
        texts.append(" ".join(WORDS[j] for j in idx) + ".")
    return texts


@pytest.fixture(scope="session")
def tiny_texts() -> list[str]:
    """:func:`tiny_text_list`, once per session."""
    return tiny_text_list()


@pytest.fixture()
def token_batch() -> dict[str, torch.Tensor]:
    """input_ids (4, 16) over ids 3..511 and attention_mask with row 1's last 3 positions off."""
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (4, 16), generator=g)
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[1, -3:] = 0
    input_ids[1, -3:] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def run_torchrun(
    script: str | os.PathLike, *args: str, nproc: int = 2, timeout: float = 120, check: bool = True
):
    """Run ``script`` under ``torchrun`` with ``nproc`` gloo ranks on the CPU; assert success
    (unless ``check=False``).

    Returns the CompletedProcess (stdout/stderr as text).
    """
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    if sys.platform.startswith("linux"):  # containers whose hostname does not resolve
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        str(script),
        *map(str, args),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0 or not check, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@dataclass
class Run:
    """One in-process ``tyche`` call: exit code, stdout, stderr and wall seconds."""

    code: int
    out: str
    err: str
    seconds: float


def cli(capsys: pytest.CaptureFixture, *args: str) -> Run:
    """``tyche ARGS`` in-process, as the console script runs it."""
    import time

    from tyche.__main__ import main

    capsys.readouterr()
    start = time.perf_counter()
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    seconds = time.perf_counter() - start
    captured = capsys.readouterr()
    return Run(code, captured.out, captured.err, seconds)


def one_line_error(run: Run, command: str, pattern: str) -> str:
    """The single stderr line of a refused ``tyche COMMAND`` run (exit 2, no traceback),
    matching ``pattern``."""
    import re

    assert run.code == 2, (run.code, run.err)
    assert "Traceback" not in run.err
    lines = [line for line in run.err.splitlines() if line.strip() and "it/s]" not in line]
    assert len(lines) == 1, run.err
    assert lines[0].startswith(f"tyche {command}: error: "), lines[0]
    assert re.search(pattern, lines[0]), (pattern, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-NeoX with its tokenizer, saved as a local model folder."""
    folder = tmp_path_factory.mktemp("lm")
    build_neox().save_pretrained(folder)
    make_tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small text corpus (the tiny texts, paragraphs split by blank lines)."""
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text("\n\n".join(tiny_text_list() * 6))
    return path


@pytest.fixture(scope="module")
def hooked() -> torch.nn.Module:
    """A tiny random TransformerLens HookedTransformer (2 layers, width 64, 4 heads, vocab
    512; skips without the [interop] extra): see tests/interop/interop_support.py."""
    from interop_support import build_hooked

    return build_hooked()

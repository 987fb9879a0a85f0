"""Saves a GGUF model as a Hugging Face folder (config.json with architectures, safetensors, tokenizer),
weights dequantized to fp32: what engines that cannot load GGUF (`transformers serve`, vLLM) serve.

    python scripts/gguf_to_hf.py MODEL.gguf OUT_DIR      (default model: the shipped SmolLM2)
"""

from __future__ import annotations

import sys
from pathlib import Path


def save(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config   # saved dequantized, as a plain checkpoint
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__)
    if len(sys.argv) == 2:
        from workers.loader import default_model_path
        source = default_model_path()
    else:
        source = Path(sys.argv[1])
    save(source, Path(sys.argv[-1]))

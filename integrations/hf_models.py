"""Loading transformers models from local folders for analysis (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch

from integrations._requires import require


def load_local_model(path: str | Path) -> tuple[torch.nn.Module, str]:
    """A transformers model from a local folder or ``config.json``: trained weights when the folder
    has them, random weights from the config otherwise. Attention runs in eager mode so the attention
    matrices exist. Returns ``(model, "weights" | "random weights from config")``."""
    transformers = require("transformers", "hf")
    path = Path(path)
    folder = path.parent if path.is_file() else path
    if not (folder / "config.json").exists():
        raise ValueError(f"no config.json in {folder}; pass a local model folder or its config.json")
    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))
    if has_weights:
        model = transformers.AutoModel.from_pretrained(
            str(folder), local_files_only=True, attn_implementation="eager")
        source = "weights"
    else:
        model = transformers.AutoModel.from_config(config, attn_implementation="eager")
        source = "random weights from config"
    return model.eval(), source


def tokenize(path: str | Path, text_file: str | Path) -> torch.Tensor:
    """Token ids ``[1, L]`` of a text file, with the tokenizer saved in the model folder."""
    transformers = require("transformers", "hf")
    path = Path(path)
    folder = path.parent if path.is_file() else path
    text = Path(text_file).read_text()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"--text needs a tokenizer saved in {folder} ({error}); pass --ids instead") from None
    return tokenizer(text, return_tensors="pt")["input_ids"]

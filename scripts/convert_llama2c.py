#!/usr/bin/env python
"""Convert a llama2.c legacy checkpoint and its tokenizer to a Hugging Face LlamaForCausalLM folder.

    python scripts/convert_llama2c.py --output_dir outputs/stories260K-hf

The defaults read the staged stories260K model (../shared/data/models/stories260K beside the
checkout). The folder written holds config.json, model.safetensors, generation_config.json and
tokenizer.json, and loads with AutoModelForCausalLM / AutoTokenizer under transformers 4.57 and 5.x.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

try:
    import hf_distill  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from hf_distill.llama2c import convert_llama2c  # noqa: E402

DEFAULT_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "models" / "stories260K"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_DIR / "stories260K.bin",
                        help="llama2.c legacy checkpoint (.bin, 7-int32 header + float32 weights)")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_DIR / "tok512.model",
                        help="SentencePiece BPE .model, or llama2.c's tokenizer .bin export")
    parser.add_argument("--output_dir", type=Path, default=Path("outputs") / "stories260K-hf",
                        help="folder to write the converted model and tokenizer to")
    parser.add_argument("--sample_tokens", type=int, default=32,
                        help="print a greedy sample of this many tokens from BOS as a check (0: none)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Convert, save, and print a short summary (and a greedy sample)."""
    args = parse_args(argv)
    try:
        model, tokenizer = convert_llama2c(args.checkpoint, args.tokenizer, args.output_dir)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    n_params = sum(p.numel() for p in model.parameters())
    cfg = model.config
    print(
        f"saved to {args.output_dir}: LlamaForCausalLM with {n_params:,} parameters "
        f"(hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads, "
        f"{cfg.num_key_value_heads} kv heads, vocab {cfg.vocab_size}, context {cfg.max_position_embeddings}, "
        f"tied embeddings: {cfg.tie_word_embeddings})"
    )
    if args.sample_tokens > 0:
        start = torch.tensor([[tokenizer.bos_token_id]])
        with torch.no_grad():
            out = model.generate(
                start, attention_mask=torch.ones_like(start), do_sample=False,
                max_new_tokens=args.sample_tokens, pad_token_id=tokenizer.eos_token_id,
            )
        print("greedy sample:", tokenizer.decode(out[0], skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

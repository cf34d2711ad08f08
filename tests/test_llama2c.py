"""The llama2.c converter: the real stories260K checkpoint, its tokenizer, and malformed files."""

from __future__ import annotations

import json
import struct
from dataclasses import astuple
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_distill.llama2c import (
    Llama2cHeader,
    convert_llama2c,
    convert_llama2c_checkpoint,
    convert_llama2c_tokenizer,
    read_llama2c_header,
)

# llama2.c doc/stories260K.md: the temperature-0 sample of stories260K starts like this.
REFERENCE_OPENING = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park."
)
# The same sentence encoded by the `sentencepiece` library with tok512.model (no BOS).
REFERENCE_IDS = [403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338,
                 401, 396, 267, 337, 410, 408, 419, 292, 411, 322, 265, 282, 295, 433, 426]


@lru_cache(maxsize=None)
def _converted(folder: Path):
    return convert_llama2c(folder / "stories260K.bin", folder / "tok512.model")


@pytest.fixture
def stories260k(shared_data: Path) -> Path:
    folder = shared_data / "models" / "stories260K"
    if not (folder / "stories260K.bin").is_file():
        pytest.skip(f"stories260K not staged under {folder}")
    return folder


def test_header_and_config(stories260k: Path) -> None:
    header = read_llama2c_header(stories260k / "stories260K.bin")
    assert header == Llama2cHeader(64, 172, 5, 8, 4, 512, 512)
    model, _ = _converted(stories260k)
    cfg = model.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 172, 5)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (8, 4, 512)
    assert cfg.tie_word_embeddings and model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert cfg.rms_norm_eps == 1e-5
    assert sum(p.numel() for p in model.parameters()) == 260_032  # 264,128 floats minus the freq_cis tables


def test_greedy_generation_reproduces_llama2c_sample(stories260k: Path) -> None:
    model, tokenizer = _converted(stories260k)
    start = torch.tensor([[1]])  # BOS
    with torch.no_grad():
        out = model.generate(start, attention_mask=torch.ones_like(start), do_sample=False,
                             max_new_tokens=len(REFERENCE_IDS) + 2, pad_token_id=2)
    assert out[0, 1 : 1 + len(REFERENCE_IDS)].tolist() == REFERENCE_IDS
    assert tokenizer.decode(out[0], skip_special_tokens=True).startswith(REFERENCE_OPENING)


def test_tokenizer_matches_sentencepiece_and_round_trips(stories260k: Path) -> None:
    _, tokenizer = _converted(stories260k)
    assert len(tokenizer) == 512 and tokenizer.vocab_size == 512
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    ids = tokenizer(REFERENCE_OPENING).input_ids
    assert ids == [1] + REFERENCE_IDS  # BOS prepended, pieces as sentencepiece encodes them
    assert tokenizer.convert_ids_to_tokens(ids[1:3]) == ["\u2581Once", "\u2581upon"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == REFERENCE_OPENING
    # Characters outside the 512 pieces go through byte fallback and come back intact.
    text = "Tom said: \"naïve café 你好\"\n\tThe end."
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
    # llama2.c's own tokenizer export holds the same vocabulary and gives the same tokenizer.
    from_bin = convert_llama2c_tokenizer(stories260k / "tok512.bin")
    assert from_bin.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_saved_folder_reloads_with_auto_classes(stories260k: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, _ = convert_llama2c(stories260k / "stories260K.bin", stories260k / "tok512.model", tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "tokenizer.json").is_file()
    # A class name that both transformers 4.57 and 5.x can load.
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    ids = torch.tensor([tokenizer(REFERENCE_OPENING).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


# --------------------------------------------------------------------------------------------
# Synthetic checkpoints: an untied classifier checked against a NumPy llama2.c forward pass,
# and malformed files.
# --------------------------------------------------------------------------------------------


def _rope_tables(seq_len: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    inv_freq = 10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)
    angles = np.arange(seq_len)[:, None] * inv_freq[None, :]
    return np.cos(angles), np.sin(angles)


def _write_checkpoint(path: Path, header: Llama2cHeader, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in header.tensor_shapes():
        tensors[name] = rng.normal(0.0, 0.3, size=shape).astype(np.float32)
    tensors["freq_cis_real"], tensors["freq_cis_imag"] = _rope_tables(header.seq_len, header.head_dim)
    with path.open("wb") as f:
        f.write(struct.pack("<7i", *astuple(header)))
        for name, _ in header.tensor_shapes():
            f.write(tensors[name].astype("<f4").tobytes())
    return tensors


def _llama2c_logits(t: dict[str, np.ndarray], h: Llama2cHeader, tokens: list[int]) -> np.ndarray:
    """llama2.c's forward pass (interleaved RoPE pairs) for a whole sequence, in float64."""
    def rmsnorm(x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * w

    hd, n = h.head_dim, len(tokens)
    cos, sin = (a[:n, None, :] for a in _rope_tables(n, hd))  # (n, 1, hd/2)

    def rope(x: np.ndarray, heads: int) -> np.ndarray:
        x = x.reshape(n, heads, hd // 2, 2)
        even, odd = x[..., 0], x[..., 1]
        return np.stack([even * cos - odd * sin, even * sin + odd * cos], -1).reshape(n, heads, hd)

    x = t["token_embedding"].astype(np.float64)[tokens]
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for layer in range(h.n_layers):
        xb = rmsnorm(x, t["rms_att"][layer])
        q = rope(xb @ t["wq"][layer].T, h.n_heads)
        k = np.repeat(rope(xb @ t["wk"][layer].T, h.n_kv_heads), h.n_heads // h.n_kv_heads, axis=1)
        v = np.repeat((xb @ t["wv"][layer].T).reshape(n, h.n_kv_heads, hd), h.n_heads // h.n_kv_heads, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + mask
        att = np.exp(scores - scores.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", att, v).reshape(n, h.dim) @ t["wo"][layer].T
        xb = rmsnorm(x, t["rms_ffn"][layer])
        gate = xb @ t["w1"][layer].T
        x = x + (gate / (1 + np.exp(-gate)) * (xb @ t["w3"][layer].T)) @ t["w2"][layer].T
    return rmsnorm(x, t["rms_final"]) @ t["wcls"].T


def test_untied_gqa_checkpoint_matches_llama2c_forward(tmp_path: Path) -> None:
    header = Llama2cHeader(dim=32, hidden_dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=-40, seq_len=16)
    tensors = _write_checkpoint(tmp_path / "tiny.bin", header)
    model = convert_llama2c_checkpoint(tmp_path / "tiny.bin")
    assert not model.config.tie_word_embeddings and model.config.vocab_size == 40
    tokens = [1, 5, 9, 33, 2, 17, 17, 8, 39, 0]
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].double().numpy()
    np.testing.assert_allclose(logits, _llama2c_logits(tensors, header, tokens), atol=1e-4, rtol=1e-4)


def test_malformed_files_raise_clear_errors(tmp_path: Path) -> None:
    header = Llama2cHeader(dim=16, hidden_dim=24, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=8, seq_len=4)
    good = tmp_path / "good.bin"
    _write_checkpoint(good, header)
    data = good.read_bytes()

    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        read_llama2c_header(tmp_path / "missing.bin")
    cases = {
        "short.bin": (b"\x01\x00\x00\x00" * 3, "too small for a llama2.c header"),
        "truncated.bin": (data[:-4], "truncated"),
        "trailing.bin": (data + b"\x00" * 4, "trailing data"),
        "zero_dim.bin": (struct.pack("<7i", 0, 24, 1, 2, 1, 8, 4) + data[28:], "dim=0 must be positive"),
        "heads.bin": (struct.pack("<7i", 16, 24, 1, 3, 1, 8, 4) + data[28:], "not divisible by n_heads"),
        "versioned.bin": (struct.pack("<Ii", 0x616B3432, 1) + data[8:], "versioned llama2.c export"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=message):
            convert_llama2c_checkpoint(tmp_path / name)

    # Right size, wrong RoPE tables: not a llama2.c legacy export.
    n_rope = 2 * header.seq_len * header.head_dim // 2
    (tmp_path / "rope.bin").write_bytes(data[: -4 * n_rope] + np.zeros(n_rope, "<f4").tobytes())
    with pytest.raises(ValueError, match="RoPE tables"):
        convert_llama2c_checkpoint(tmp_path / "rope.bin")

    (tmp_path / "tok.bin").write_bytes(struct.pack("<i", 16) + struct.pack("<fi", 0.0, 5) + b"ab")
    with pytest.raises(ValueError, match="bad length|truncated"):
        convert_llama2c_tokenizer(tmp_path / "tok.bin")
    (tmp_path / "tok.model").write_bytes(b"\x0a\xff\xff")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        convert_llama2c_tokenizer(tmp_path / "tok.model")

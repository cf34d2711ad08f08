"""Convert a llama2.c checkpoint (legacy export) and its tokenizer to Hugging Face Transformers.

llama2.c (https://github.com/karpathy/llama2.c) stores a model as a raw little-endian file: a
header of 7 int32 values ``(dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len)``
followed by float32 tensors in a fixed order. A positive ``vocab_size`` means the classifier
shares the token embedding; a negative one means a separate classifier is stored at the end.

llama2.c rotates interleaved pairs ``(2i, 2i + 1)`` of each head with RoPE, while
``LlamaForCausalLM`` rotates the pairs ``(i, i + head_dim / 2)`` (``rotate_half``). The rows of
``wq`` and ``wk`` are therefore permuted per head so that both models compute the same function.

The tokenizer is a SentencePiece BPE model, given either as the SentencePiece ``.model`` file
(needs ``sentencepiece`` or ``protobuf``) or as llama2.c's ``tokenizer.bin`` export (no extra
dependency). It is rebuilt with the ``tokenizers`` library alone (BPE with byte fallback, merges
ranked by piece score), so the same code works under transformers 4.57 and 5.x.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

__all__ = [
    "Llama2cHeader",
    "SentencePiece",
    "build_sentencepiece_bpe_tokenizer",
    "convert_llama2c",
    "convert_llama2c_checkpoint",
    "convert_llama2c_tokenizer",
    "llama2c_config",
    "load_llama2c_state_dict",
    "read_llama2c_header",
    "read_sentencepiece_pieces",
    "save_portable_tokenizer",
]

_HEADER = struct.Struct("<7i")
_FLOAT_BYTES = 4
# Versioned llama2.c exports (export.py --version 1/2) start with the uint32 magic "ak42".
_VERSIONED_MAGIC = 0x616B3432
_ROPE_THETA = 10000.0
_RMS_NORM_EPS = 1e-5

# SentencePiece piece types (sentencepiece_model.proto).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
_SPACE = "\u2581"  # "▁", SentencePiece's whitespace symbol


def _existing_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Llama2cHeader:
    """The 7 int32 values at the start of a legacy llama2.c checkpoint."""

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int  # negative: the classifier is stored separately (not tied)
    seq_len: int

    @property
    def shared_classifier(self) -> bool:
        """Whether the output classifier is the token embedding (``tie_word_embeddings``)."""
        return self.vocab_size > 0

    @property
    def n_vocab(self) -> int:
        """The vocabulary size, whatever the sign convention."""
        return abs(self.vocab_size)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes of the float32 tensors that follow the header, in file order."""
        d, h, n_layers, v = self.dim, self.hidden_dim, self.n_layers, self.n_vocab
        kv_dim = self.n_kv_heads * self.head_dim
        shapes = [
            ("token_embedding", (v, d)),
            ("rms_att", (n_layers, d)),
            ("wq", (n_layers, d, d)),
            ("wk", (n_layers, kv_dim, d)),
            ("wv", (n_layers, kv_dim, d)),
            ("wo", (n_layers, d, d)),
            ("rms_ffn", (n_layers, d)),
            ("w1", (n_layers, h, d)),
            ("w2", (n_layers, d, h)),
            ("w3", (n_layers, h, d)),
            ("rms_final", (d,)),
            ("freq_cis_real", (self.seq_len, self.head_dim // 2)),
            ("freq_cis_imag", (self.seq_len, self.head_dim // 2)),
        ]
        if not self.shared_classifier:
            shapes.append(("wcls", (v, d)))
        return shapes

    def expected_file_size(self) -> int:
        """The exact size in bytes of a legacy checkpoint with this header."""
        n_floats = sum(math.prod(shape) for _, shape in self.tensor_shapes())
        return _HEADER.size + _FLOAT_BYTES * n_floats

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent header value."""
        fields = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "seq_len")
        for name in fields:
            if getattr(self, name) <= 0:
                raise ValueError(f"bad llama2.c header: {name}={getattr(self, name)} must be positive ({self})")
        if self.vocab_size == 0:
            raise ValueError(f"bad llama2.c header: vocab_size=0 ({self})")
        if self.dim % self.n_heads:
            raise ValueError(f"bad llama2.c header: dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"bad llama2.c header: n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"bad llama2.c header: head dimension {self.head_dim} is odd, RoPE needs pairs")


def read_llama2c_header(checkpoint_path: str | Path) -> Llama2cHeader:
    """Read and check the header of a legacy llama2.c checkpoint, including the file size."""
    path = _existing_file(checkpoint_path, "llama2.c checkpoint")
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(_HEADER.size)
    if len(raw) < _HEADER.size:
        raise ValueError(f"{path} is too small for a llama2.c header: {size} bytes, need at least {_HEADER.size}")
    values = _HEADER.unpack(raw)
    if values[0] == _VERSIONED_MAGIC:
        raise ValueError(
            f"{path} is a versioned llama2.c export (version {values[1]}); only the legacy format "
            "(export.py --version 0, a bare 7-int32 header) is supported"
        )
    header = Llama2cHeader(*values)
    header.validate()
    expected = header.expected_file_size()
    if size != expected:
        raise ValueError(
            f"{path} has {size} bytes but the header {header} implies {expected} bytes "
            f"({'truncated' if size < expected else 'trailing data'}, or not a legacy llama2.c checkpoint)"
        )
    return header


def llama2c_config(header: Llama2cHeader) -> LlamaConfig:
    """The ``LlamaConfig`` equivalent to a llama2.c header (SiLU MLP, RMSNorm eps 1e-5, RoPE base 1e4)."""
    return LlamaConfig(
        vocab_size=header.n_vocab,
        hidden_size=header.dim,
        intermediate_size=header.hidden_dim,
        num_hidden_layers=header.n_layers,
        num_attention_heads=header.n_heads,
        num_key_value_heads=header.n_kv_heads,
        head_dim=header.head_dim,
        hidden_act="silu",
        max_position_embeddings=header.seq_len,
        rms_norm_eps=_RMS_NORM_EPS,
        rope_theta=_ROPE_THETA,
        tie_word_embeddings=header.shared_classifier,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=1,
        eos_token_id=2,
    )


def _interleaved_to_half_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the output rows of a q/k projection from interleaved RoPE pairs to ``rotate_half`` halves.

    Within each head, new row ``k * head_dim / 2 + j`` is old row ``2 * j + k``.
    """
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    return (
        weight.reshape(n_heads, head_dim // 2, 2, in_features)
        .transpose(1, 2)
        .reshape(out_features, in_features)
        .contiguous()
    )


def _check_rope_tables(header: Llama2cHeader, real: torch.Tensor, imag: torch.Tensor, path: Path) -> None:
    """Check that the stored RoPE tables use base 1e4, as ``llama2c_config`` assumes."""
    positions = torch.arange(header.seq_len, dtype=torch.float64)[:, None]
    inv_freq = _ROPE_THETA ** (-torch.arange(0, header.head_dim, 2, dtype=torch.float64) / header.head_dim)
    angles = positions * inv_freq[None, :]
    error = max(
        (real.double() - torch.cos(angles)).abs().max().item(),
        (imag.double() - torch.sin(angles)).abs().max().item(),
    )
    if error > 1e-3:
        raise ValueError(
            f"{path}: the stored RoPE tables do not match base {_ROPE_THETA:g} (max error {error:.3g}); "
            "this checkpoint is not a standard llama2.c legacy export"
        )


def load_llama2c_state_dict(checkpoint_path: str | Path) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """Read a legacy llama2.c checkpoint into a ``LlamaConfig`` and a ``LlamaForCausalLM`` state dict.

    The raw float32 data is read with NumPy (no pickle). ``lm_head.weight`` is the embedding
    tensor itself when the classifier is shared.
    """
    path = Path(checkpoint_path)
    header = read_llama2c_header(path)
    flat = torch.from_numpy(np.fromfile(path, dtype="<f4", offset=_HEADER.size).astype(np.float32, copy=False))
    tensors: dict[str, torch.Tensor] = {}
    offset = 0
    for name, shape in header.tensor_shapes():
        count = math.prod(shape)
        tensors[name] = flat[offset : offset + count].reshape(shape)
        offset += count
    _check_rope_tables(header, tensors["freq_cis_real"], tensors["freq_cis_imag"], path)

    embedding = tensors["token_embedding"].clone()
    state: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": embedding,
        "model.norm.weight": tensors["rms_final"].clone(),
        "lm_head.weight": embedding if header.shared_classifier else tensors["wcls"].clone(),
    }
    per_layer = {
        "input_layernorm.weight": "rms_att",
        "self_attn.v_proj.weight": "wv",
        "self_attn.o_proj.weight": "wo",
        "post_attention_layernorm.weight": "rms_ffn",
        "mlp.gate_proj.weight": "w1",
        "mlp.down_proj.weight": "w2",
        "mlp.up_proj.weight": "w3",
    }
    for layer in range(header.n_layers):
        prefix = f"model.layers.{layer}."
        for hf_name, llama2c_name in per_layer.items():
            state[prefix + hf_name] = tensors[llama2c_name][layer].clone()
        state[prefix + "self_attn.q_proj.weight"] = _interleaved_to_half_rotary(tensors["wq"][layer], header.n_heads)
        state[prefix + "self_attn.k_proj.weight"] = _interleaved_to_half_rotary(
            tensors["wk"][layer], header.n_kv_heads
        )
    return llama2c_config(header), state


def convert_llama2c_checkpoint(checkpoint_path: str | Path) -> LlamaForCausalLM:
    """Build a float32 ``LlamaForCausalLM`` (eval mode) from a legacy llama2.c checkpoint."""
    config, state = load_llama2c_state_dict(checkpoint_path)
    model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True)
    if config.tie_word_embeddings and model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to the token embedding after loading")  # pragma: no cover
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    return model.eval()


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SentencePiece:
    """One vocabulary entry: text (with "▁" for spaces), score and SentencePiece type."""

    piece: str
    score: float
    type: int = _NORMAL


def _read_sentencepiece_model(path: Path) -> list[SentencePiece]:
    try:
        from transformers.convert_slow_tokenizer import import_protobuf

        model_pb2 = import_protobuf()
    except ImportError as err:
        raise ImportError(
            f"reading {path} needs `sentencepiece` or `protobuf`; install one, or pass llama2.c's "
            "tokenizer .bin export instead"
        ) from err
    proto = model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as err:  # protobuf raises its own DecodeError
        raise ValueError(f"{path} is not a SentencePiece model: {err}") from err
    if not proto.pieces:
        raise ValueError(f"{path} is not a SentencePiece model: it has no pieces")
    if proto.trainer_spec.model_type != 2:  # BPE
        raise ValueError(
            f"{path} is a SentencePiece model of type {proto.trainer_spec.model_type}; only BPE (2) is supported"
        )
    return [SentencePiece(p.piece, float(p.score), int(p.type)) for p in proto.pieces]


def _read_llama2c_tokenizer_bin(path: Path) -> list[SentencePiece]:
    """Parse llama2.c's tokenizer export: int32 max_token_length, then (float32 score, int32 len, bytes)."""
    data = path.read_bytes()
    if len(data) < 4:
        raise ValueError(f"{path} is too small for a llama2.c tokenizer file ({len(data)} bytes)")
    (max_len,) = struct.unpack_from("<i", data, 0)
    if not 0 < max_len <= 1024:
        raise ValueError(f"{path} is not a llama2.c tokenizer file: max_token_length={max_len}")
    pieces: list[SentencePiece] = []
    offset = 4
    while offset < len(data):
        if offset + 8 > len(data):
            raise ValueError(f"{path} is truncated inside the entry of token {len(pieces)}")
        score, length = struct.unpack_from("<fi", data, offset)
        offset += 8
        if not 0 < length <= max_len or offset + length > len(data):
            raise ValueError(f"{path}: token {len(pieces)} has a bad length {length} (or the file is truncated)")
        try:
            text = data[offset : offset + length].decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: token {len(pieces)} is not valid UTF-8") from err
        offset += length
        index = len(pieces)
        # The exporter writes ids 1/2 as "\n<s>\n" and "\n</s>\n" and spaces for "▁".
        if index < 3 and text.strip() in ("<unk>", "<s>", "</s>"):
            kind = _UNKNOWN if text.strip() == "<unk>" else _CONTROL
            pieces.append(SentencePiece(text.strip(), score, kind))
        elif _BYTE_PIECE.fullmatch(text):
            pieces.append(SentencePiece(text, score, _BYTE))
        else:
            pieces.append(SentencePiece(text.replace(" ", _SPACE), score, _NORMAL))
    return pieces


def read_sentencepiece_pieces(tokenizer_path: str | Path) -> list[SentencePiece]:
    """Read the vocabulary of a SentencePiece BPE ``.model`` or of a llama2.c tokenizer ``.bin``.

    The format follows the file suffix; for any other suffix it is recognised from the first byte.
    """
    path = _existing_file(tokenizer_path, "tokenizer file")
    if path.suffix == ".model":
        is_proto = True
    elif path.suffix == ".bin":
        is_proto = False
    else:  # A SentencePiece ModelProto starts with field 1 (pieces), wire type 2: byte 0x0A.
        with path.open("rb") as f:
            is_proto = f.read(1) == b"\n"
    pieces = _read_sentencepiece_model(path) if is_proto else _read_llama2c_tokenizer_bin(path)
    seen: set[str] = set()
    for index, entry in enumerate(pieces):
        if entry.piece in seen:
            raise ValueError(f"{path}: piece {entry.piece!r} (id {index}) appears twice")
        seen.add(entry.piece)
    return pieces


def _bpe_merges(pieces: list[SentencePiece]) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, best merged-piece score first.

    SentencePiece BPE encodes by repeatedly joining the adjacent pair whose concatenation is the
    highest-scoring piece; ranking merges by that score makes ``tokenizers`` BPE do the same.
    """
    mergeable = {p.piece: i for i, p in enumerate(pieces) if p.type in (_NORMAL, _USER_DEFINED)}
    ranked: list[tuple[float, int, int, str, str]] = []
    for piece, index in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-pieces[index].score, index, mergeable[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def build_sentencepiece_bpe_tokenizer(
    pieces: list[SentencePiece], model_max_length: int | None = None
) -> PreTrainedTokenizerFast:
    """Build a Llama-style fast tokenizer (BOS prepended, byte fallback) from SentencePiece BPE pieces.

    Like llama2.c's ``encode`` (and unlike ``spm_encode``), runs of spaces are kept, not collapsed.
    """
    by_type = {kind: [p.piece for p in pieces if p.type == kind] for kind in (_UNKNOWN, _CONTROL, _USER_DEFINED)}
    if len(by_type[_UNKNOWN]) != 1 or len(by_type[_CONTROL]) < 2:
        raise ValueError("the vocabulary needs one unknown piece and BOS/EOS control pieces")
    unk = by_type[_UNKNOWN][0]
    bos, eos = "<s>", "</s>"
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    if bos not in vocab or eos not in vocab:
        raise ValueError(f"the vocabulary has no {bos!r} / {eos!r} pieces")

    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=_bpe_merges(pieces), unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in [unk, *by_type[_CONTROL]]])
    if by_type[_USER_DEFINED]:
        tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in by_type[_USER_DEFINED]])

    kwargs = {"model_max_length": model_max_length} if model_max_length else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=unk, clean_up_tokenization_spaces=False, **kwargs
    )


def convert_llama2c_tokenizer(
    tokenizer_path: str | Path, model_max_length: int | None = None
) -> PreTrainedTokenizerFast:
    """Convert a SentencePiece BPE ``.model`` or a llama2.c tokenizer ``.bin`` to a fast tokenizer."""
    return build_sentencepiece_bpe_tokenizer(read_sentencepiece_pieces(tokenizer_path), model_max_length)


def save_portable_tokenizer(tokenizer: PreTrainedTokenizerFast, output_dir: str | Path) -> None:
    """``save_pretrained`` that transformers 4.57 can load back as well.

    transformers 5 records the generic fast tokenizer as ``"TokenizersBackend"``, a class 4.x
    does not have; both versions load ``"PreTrainedTokenizerFast"`` from ``tokenizer.json``.
    """
    tokenizer.save_pretrained(output_dir)
    config_path = Path(output_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_llama2c(
    checkpoint_path: str | Path, tokenizer_path: str | Path, output_dir: str | Path | None = None
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Convert a legacy llama2.c checkpoint and its tokenizer to ``LlamaForCausalLM`` + fast tokenizer.

    When ``output_dir`` is given, both are saved there with ``save_pretrained`` (safetensors).
    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for a malformed one.
    """
    model = convert_llama2c_checkpoint(checkpoint_path)
    tokenizer = convert_llama2c_tokenizer(tokenizer_path, model_max_length=model.config.max_position_embeddings)
    if len(tokenizer) != model.config.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer_path} has {len(tokenizer)} tokens but checkpoint {checkpoint_path} "
            f"has a vocabulary of {model.config.vocab_size}"
        )
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(output_dir, safe_serialization=True)
        save_portable_tokenizer(tokenizer, output_dir)
    return model, tokenizer

"""Vocabulary trimming: keep only the tokens a corpus uses, in the embedding, the output layer and the tokenizer.

`trim_vocabulary(model, tokenizer, texts)` keeps the special and added tokens and every token the texts use
(`min_frequency` times or more), in their original relative order, and rewrites the fast tokenizer's
`tokenizer.json` (model vocabulary, merges, added tokens, post-processor and padding ids) with the new ids.

Why text made only of kept tokens tokenizes exactly as before:

* **WordPiece** takes, at each position of a word, the longest vocabulary entry that is a prefix. Removing
  entries a word's tokenization does not use leaves that entry the longest match, so the result is unchanged; a
  word that needs a dropped piece becomes the unknown token, as WordPiece does for any unknown word.
* **BPE** applies, step by step, the applicable merge of lowest rank. Keeping every merge whose result is kept is
  *not* enough: the intermediate tokens of a kept token (``"He"`` on the way to ``"Hello"``) may never appear
  in the texts, and dropping them drops the merges that build the kept token. So the kept set is closed first:
  for every kept token, the two parts of every merge that produces it are kept too, recursively down to single
  characters. Then a merge is kept when its two parts and its result are kept. Every merge the original
  tokenizer applies to kept text is kept, with the same relative rank; at each step the lowest-ranked
  applicable merge among the kept ones is the one the original applied (a minimum over a subset containing the
  minimum), so the sequence of merges, and the output, are the same.
* **Byte-level BPE** (GPT-2) has no unknown token: the 256 byte tokens are always kept (with the rest of the
  base alphabet, i.e. every token no merge produces), so any text still encodes and decodes losslessly;
  text outside the kept vocabulary just takes more, shorter tokens. The same holds for any BPE without an unknown
  token, and `byte_fallback` models keep their 256 ``<0x..>`` tokens.
* **Unigram** (SentencePiece) picks the segmentation of highest total score; a character with no
  single-character piece gets an unknown node scored (lowest piece score) - 10. The lowest-scored piece is always
  kept, so that score does not change. Then every segmentation of the trimmed vocabulary is an original one with
  some single-character pieces replaced by unknown nodes, which score lower than any piece: none beats the
  original best segmentation, which is still available, so it stays the best (up to exact score ties). Without
  that piece the unknown node gets cheaper and can win (tested). The single-character piece of every character of
  a kept piece is kept too, so unseen words made of known characters do not become unknown.

`trim_vocabulary` checks this on the given texts: the rewritten tokenizer must give the remapped ids of the
original on every text whose tokens are all kept, or it raises.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn

logger = logging.getLogger(__name__)

UNK_SHARE_LIMIT = 0.05
"""Default largest share of the texts' tokens that may be the unknown token before `trim_vocabulary` refuses."""

SPECIAL_ID_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id", "sep_token_id",
                     "cls_token_id", "mask_token_id", "decoder_start_token_id")
BYTE_FALLBACK_TOKENS = tuple(f"<0x{i:02X}>" for i in range(256))


@dataclass
class TrimReport:
    """What `trim_vocabulary(..., return_report=True)` kept and measured."""

    original_size: int  # rows of the input embedding before trimming
    kept_size: int  # rows after (= new config.vocab_size)
    kept_ids: list[int]  # kept_ids[new_id] = old id
    min_frequency: int
    texts_unk_rate: float  # unknown-token share of `texts` with the original tokenizer
    held_out_unk_rate: float | None  # unknown-token share of `held_out_texts` with the trimmed tokenizer
    held_out_token_ratio: float | None  # tokens of `held_out_texts`, trimmed / original tokenizer
    parameters_before: int
    parameters_after: int
    # share of `held_out_texts` whose tokens differ from the original tokenizer's: unknown, or (WordPiece, BPE) a
    # word whose token was dropped, split into kept pieces ("cooking" -> "cook ##ing"), which the unknown-token
    # rate does not count
    held_out_changed_share: float | None = None


def trim_vocabulary(
    model: Any,
    tokenizer: Any,
    texts: Iterable[str],
    min_frequency: int = 1,
    unk_share_limit: float = UNK_SHARE_LIMIT,
    *,
    held_out_texts: Iterable[str] | None = None,
    return_report: bool = False,
) -> tuple[Any, Any] | tuple[Any, Any, TrimReport]:
    """Trim `model`'s vocabulary to the special tokens and the tokens `texts` use; returns `(model, tokenizer)`.

    The model is changed in place (input embedding, a tied or untied output layer and its bias,
    `config.vocab_size`, the special token ids of its config and generation config); the tokenizer is a new
    fast tokenizer of the same class. On text whose tokens are all kept, ids are the remapped original ids and
    the model's outputs are unchanged (LM logits: the kept columns). Other text is split into kept pieces where
    it can be (WordPiece sub-words, shorter byte-level BPE tokens), else maps to the unknown token. With
    `return_report=True` a third value, a `TrimReport`, gives the kept size, parameter counts, and on
    `held_out_texts` the unknown-token rate and the share of texts tokenized otherwise than before.
    Raises ValueError for a slow tokenizer, or when more than `unk_share_limit` of the texts' tokens are unknown.
    """
    backend = _fast_backend(tokenizer)
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1 (got {min_frequency})")
    texts = _as_texts(texts, "texts")
    state = json.loads(backend.to_str())
    embedding = _input_embedding(model)
    rows = embedding.num_embeddings
    encodings = _encode(backend, texts, add_special_tokens=True)
    counts = Counter(i for ids in encodings for i in ids)
    special = _special_ids(state, tokenizer)
    texts_unk = _check_known_share(counts, special, _model_unk_id(state), rows, unk_share_limit)
    kept = _kept_ids(state, counts, min_frequency, special | _model_special_ids(model, embedding, rows), rows)
    remap = {old: new for new, old in enumerate(kept)}
    trimmed = _rebuild_tokenizer(tokenizer, _rewrite_state(json.loads(backend.to_str()), remap))
    _check_same_ids(trimmed.backend_tokenizer, texts, encodings, remap)
    parameters_before = model.num_parameters()
    _trim_model(model, kept, remap)
    logger.info("vocabulary trimmed from %d to %d tokens (%d -> %d parameters)", rows, len(kept),
                parameters_before, model.num_parameters())
    if not return_report:
        return model, trimmed
    held_unk = held_ratio = held_changed = None
    if held_out_texts is not None:
        held = _as_texts(held_out_texts, "held_out_texts")
        held_unk = unk_rate(trimmed, held)
        held_ratio = _token_count(trimmed, held) / max(_token_count(tokenizer, held), 1)
        held_changed = changed_share(tokenizer, trimmed, held)
    report = TrimReport(rows, len(kept), kept, min_frequency, texts_unk, held_unk, held_ratio,
                        parameters_before, model.num_parameters(), held_changed)
    return model, trimmed, report


def changed_share(original: Any, trimmed: Any, texts: Iterable[str]) -> float:
    """Share of `texts` whose token strings under `trimmed` differ from those under `original` (0.0 for none)."""
    texts = _as_texts(texts, "texts")
    before, after = (_fast_backend(t).encode_batch(texts, add_special_tokens=False) for t in (original, trimmed))
    return sum(a.tokens != b.tokens for a, b in zip(before, after)) / max(len(texts), 1)


def unk_rate(tokenizer: Any, texts: Iterable[str]) -> float:
    """Share of the tokens of `texts` (template special tokens excluded) that are the tokenizer model's unknown
    token; 0.0 for a tokenizer that has none (byte-level BPE) or for texts without tokens."""
    backend = _fast_backend(tokenizer)
    unk = _model_unk_id(json.loads(backend.to_str()))
    encodings = _encode(backend, _as_texts(texts, "texts"), add_special_tokens=False)
    total = sum(len(ids) for ids in encodings)
    if unk is None or total == 0:
        return 0.0
    return sum(ids.count(unk) for ids in encodings) / total


# --- inputs -------------------------------------------------------------------------------------------------

def _fast_backend(tokenizer: Any) -> Any:
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None:
        raise ValueError(
            f"{type(tokenizer).__name__} is a slow (Python) tokenizer; vocabulary trimming rewrites the fast "
            "tokenizer's tokenizer.json. Load the fast one: AutoTokenizer.from_pretrained(<folder>, use_fast=True) "
            "(the folder needs a tokenizer.json, or a vocabulary that transformers can convert)."
        )
    return backend


def _as_texts(texts: Iterable[str], name: str) -> list[str]:
    if isinstance(texts, str):
        raise ValueError(f"{name} must be a list of strings, not one string")
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{name} must be a non-empty list of strings (e.g. the training set's text column)")
    return texts


def _input_embedding(model: Any) -> nn.Embedding:
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(embedding, nn.Embedding):
        raise ValueError(f"{type(model).__name__} has no nn.Embedding input embedding to trim "
                         f"(get_input_embeddings() gave {type(embedding).__name__})")
    return embedding


def _encode(backend: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """Ids of each text, without the truncation or padding the tokenizer may carry."""
    plain = backend
    if backend.truncation is not None or backend.padding is not None:
        plain = Tokenizer.from_str(backend.to_str())
        plain.no_truncation()
        plain.no_padding()
    return [e.ids for e in plain.encode_batch(texts, add_special_tokens=add_special_tokens)]


def _token_count(tokenizer: Any, texts: list[str]) -> int:
    return sum(len(ids) for ids in _encode(tokenizer.backend_tokenizer, texts, add_special_tokens=False))


def _model_unk_id(state: dict) -> int | None:
    """The id the tokenizer model emits for unknown text (None for byte-level BPE)."""
    model = state["model"]
    if model.get("type") == "Unigram":
        return model.get("unk_id")
    token = model.get("unk_token")
    vocab = model.get("vocab", {})
    if token is None or token not in vocab:
        return next((t["id"] for t in state.get("added_tokens", []) if t["content"] == token), None)
    return vocab[token]


def _special_ids(state: dict, tokenizer: Any) -> set[int]:
    """Ids of the added tokens, the wrapper's special tokens, the post-processor's and padding's tokens, and the
    unknown token."""
    ids = {t["id"] for t in state.get("added_tokens", [])}
    ids |= {i for i in getattr(tokenizer, "all_special_ids", []) if isinstance(i, int)}
    ids |= set(_walk_post_processor(state.get("post_processor"), None))
    ids |= {state["padding"]["pad_id"]} if state.get("padding") else set()
    unk = _model_unk_id(state)
    return ids | ({unk} if unk is not None else set())


def _model_special_ids(model: Any, embedding: nn.Embedding, rows: int) -> set[int]:
    """Special ids named by the config, the generation config and the embedding's padding index."""
    ids = {embedding.padding_idx} if embedding.padding_idx is not None else set()
    for config in (model.config, getattr(model, "generation_config", None)):
        for field in SPECIAL_ID_FIELDS:
            value = getattr(config, field, None) if config is not None else None
            values = value if isinstance(value, (list, tuple)) else [value]
            ids |= {v for v in values if isinstance(v, int) and 0 <= v < rows}
    return ids


def _wrong_tokenizer(token_id: int, rows: int) -> ValueError:
    return ValueError(
        f"the tokenizer gives id {token_id} but the model's input embedding has {rows} rows: it is not this "
        "model's tokenizer. Pass the tokenizer saved with the model (AutoTokenizer.from_pretrained(<model folder>))."
    )


def _check_known_share(counts: Counter, special: set[int], unk: int | None, rows: int, limit: float) -> float:
    """Refuse ids past the embedding, or more than `limit` unknown tokens: the tokenizer is not the model's."""
    highest = max(set(counts) | special)
    if highest >= rows:
        raise _wrong_tokenizer(highest, rows)
    content = sum(c for i, c in counts.items() if i not in special or i == unk)
    share = counts.get(unk, 0) / content if unk is not None and content else 0.0
    if share > limit:
        raise ValueError(
            f"{share:.1%} of the tokens of the texts are the unknown token (id {unk}), above "
            f"unk_share_limit={limit}: the tokenizer does not fit these texts. Pass the tokenizer saved with the "
            "model (AutoTokenizer.from_pretrained(<model folder>)), or raise unk_share_limit if these texts really "
            "are mostly unknown to it."
        )
    return share


# --- which ids to keep --------------------------------------------------------------------------------------

def _kept_ids(state: dict, counts: Counter, min_frequency: int, forced: set[int], rows: int) -> list[int]:
    """Old ids to keep, ascending: frequent ids, forced ids and what the tokenizer model needs to stay exact."""
    kept = {i for i, c in counts.items() if c >= min_frequency} | forced
    kind = state["model"].get("type")
    if kind == "BPE":
        kept = _bpe_closure(state, kept)
    elif kind == "Unigram":
        kept = _unigram_closure(state["model"], kept)
    if max(kept) >= rows:
        raise _wrong_tokenizer(max(kept), rows)
    return sorted(kept)


def _merge_pairs(merges: list) -> list[tuple[str, str]]:
    """Merges as (left, right) pairs, from either serialization ("a b" strings or [a, b] lists)."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in merges]


def _merge_result(model: dict, left: str, right: str) -> str:
    """The token a merge produces; the right part loses the continuing-subword prefix, as in `tokenizers`."""
    return left + right[len(model.get("continuing_subword_prefix") or ""):]


def _is_byte_level(node: Any) -> bool:
    if isinstance(node, list):
        return any(_is_byte_level(n) for n in node)
    return isinstance(node, dict) and (node.get("type") == "ByteLevel" or _is_byte_level(node.get("pretokenizers")))


def _bpe_closure(state: dict, kept: set[int]) -> set[int]:
    """Add, recursively, the parts of every merge producing a kept token (BPE's intermediate tokens), the base
    alphabet when there is no unknown token or the model is byte-level, and the byte-fallback tokens."""
    model = state["model"]
    vocab = model["vocab"]
    producers: dict[str, list[tuple[str, str]]] = {}
    for left, right in _merge_pairs(model["merges"]):
        producers.setdefault(_merge_result(model, left, right), []).append((left, right))
    keep = set(kept)
    if model.get("unk_token") is None or _is_byte_level(state.get("pre_tokenizer")):
        keep |= {i for token, i in vocab.items() if token not in producers}
    if model.get("byte_fallback"):
        keep |= {vocab[t] for t in BYTE_FALLBACK_TOKENS if t in vocab}
    tokens = {i: token for token, i in vocab.items()}
    stack = [tokens[i] for i in keep if i in tokens]
    seen = set(stack)
    while stack:
        for pair in producers.get(stack.pop(), ()):
            for part in pair:
                if part not in seen:
                    seen.add(part)
                    stack.append(part)
    return keep | {vocab[t] for t in seen if t in vocab}


def _unigram_closure(model: dict, kept: set[int]) -> set[int]:
    """Add the single-character piece of every character of a kept piece, the lowest-scored piece (it sets the
    unknown node's score) and the byte-fallback pieces."""
    vocab = model["vocab"]
    index = {piece: i for i, (piece, _) in enumerate(vocab)}
    keep = set(kept) | {min(range(len(vocab)), key=lambda i: vocab[i][1])}
    if model.get("byte_fallback"):
        keep |= {index[t] for t in BYTE_FALLBACK_TOKENS if t in index}
    characters = {c for i in keep if i < len(vocab) for c in vocab[i][0]}
    return keep | {index[c] for c in characters if c in index}


# --- the tokenizer ------------------------------------------------------------------------------------------

def _walk_post_processor(node: Any, remap: dict[int, int] | None) -> list[int]:
    """The token ids a post-processor's JSON holds; with `remap`, they are also rewritten in place."""
    found: list[int] = []
    if isinstance(node, list):
        for item in node:
            found += _walk_post_processor(item, remap)
    elif isinstance(node, dict):
        if node.get("type") in ("BertProcessing", "RobertaProcessing"):
            for key in ("sep", "cls"):
                found.append(node[key][1])
                node[key][1] = remap[node[key][1]] if remap is not None else node[key][1]
        for entry in (node.get("special_tokens") or {}).values():
            found += entry["ids"]
            entry["ids"] = [remap[i] for i in entry["ids"]] if remap is not None else entry["ids"]
        found += _walk_post_processor(node.get("processors"), remap)
    return found


def _rewrite_state(state: dict, remap: dict[int, int]) -> dict:
    """tokenizer.json (`state`, changed in place) with only the kept tokens, under their new ids."""
    model = state["model"]
    if model.get("type") == "Unigram":
        pieces = len(model["vocab"])
        model["vocab"] = [piece for i, piece in enumerate(model["vocab"]) if i in remap]
        if [remap[i] for i in sorted(remap) if i < pieces] != list(range(len(model["vocab"]))):
            raise ValueError("this Unigram tokenizer has added tokens inside its piece list; it cannot be trimmed")
        if model.get("unk_id") is not None:
            model["unk_id"] = remap[model["unk_id"]]
    else:
        model["vocab"] = {token: remap[i] for token, i in model["vocab"].items() if i in remap}
    if "merges" in model:
        vocab = model["vocab"]
        model["merges"] = [m for m, (a, b) in zip(model["merges"], _merge_pairs(model["merges"]))
                           if a in vocab and b in vocab and _merge_result(model, a, b) in vocab]
    state["added_tokens"] = [dict(t, id=remap[t["id"]]) for t in state.get("added_tokens", [])]
    _walk_post_processor(state.get("post_processor"), remap)
    if state.get("padding"):
        state["padding"]["pad_id"] = remap[state["padding"]["pad_id"]]
    return state


def _rebuild_tokenizer(tokenizer: Any, state: dict) -> Any:
    """A tokenizer of the same class from the rewritten tokenizer.json, loaded as `from_pretrained` would."""
    ids = {t["content"]: t["id"] for t in state["added_tokens"]}
    stale = {name for name in tokenizer.vocab_files_names.values() if name != "tokenizer.json"}
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        for name in stale | {"added_tokens.json"}:
            if os.path.isfile(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name))
        with open(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as handle:
            json.dump(state, handle, ensure_ascii=False)
        config_path = os.path.join(folder, "tokenizer_config.json")
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
        if "added_tokens_decoder" in config:
            config["added_tokens_decoder"] = {str(ids[entry["content"]]): entry
                                              for entry in config["added_tokens_decoder"].values()}
        with open(config_path, "w", encoding="utf-8") as handle:
            json.dump(config, handle, ensure_ascii=False, indent=2)
        return type(tokenizer).from_pretrained(folder)


def _check_same_ids(backend: Any, texts: list[str], encodings: list[list[int]], remap: dict[int, int]) -> None:
    """The rewritten tokenizer must give the remapped original ids on every text whose tokens are all kept."""
    for text, old, new in zip(texts, encodings, _encode(backend, texts, add_special_tokens=True)):
        if all(i in remap for i in old) and new != [remap[i] for i in old]:
            raise RuntimeError(f"the trimmed tokenizer splits {text[:80]!r} differently from the original "
                               f"({new[:12]} vs {[remap[i] for i in old][:12]}); please report this tokenizer type")


# --- the model ----------------------------------------------------------------------------------------------

def _vocabulary_tensors(model: Any, embedding: nn.Embedding, rows: int) -> list[tuple[nn.Module, str, bool]]:
    """(module, attribute, is_buffer) of every tensor with a row per token: the input embedding, the output
    layer's weight and bias, a vocabulary-sized bias beside the output layer, and `final_logits_bias` buffers."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is not None and not isinstance(output, nn.Linear):
        raise ValueError(f"cannot trim an output layer of type {type(output).__name__} (only nn.Linear)")
    targets = {id(embedding.weight)}
    if output is not None:
        targets |= {id(p) for p in (output.weight, output.bias) if p is not None}
        for module in model.modules():
            if any(child is output for child in module.children()):
                targets |= {id(p) for p in module.parameters(recurse=False) if p.dim() == 1 and p.shape[0] == rows}
    slots = []
    for module in model.modules():
        slots += [(module, name, False) for name, p in module._parameters.items() if p is not None and id(p) in targets]
        slots += [(module, name, True) for name, b in module._buffers.items()
                  if name == "final_logits_bias" and b is not None and b.shape[-1] == rows]
    return slots


def _trim_model(model: Any, kept: list[int], remap: dict[int, int]) -> None:
    """Keep the rows of `kept` in every vocabulary tensor (tied tensors stay one tensor), and remap the config."""
    embedding = _input_embedding(model)
    rows = embedding.num_embeddings
    replaced: dict[int, torch.Tensor] = {}
    for module, name, is_buffer in _vocabulary_tensors(model, embedding, rows):
        tensor = getattr(module, name)
        if id(tensor) not in replaced:
            dim = 0 if tensor.shape[0] == rows else tensor.dim() - 1
            index = torch.tensor(kept, dtype=torch.long, device=tensor.device)
            sliced = tensor.detach().index_select(dim, index).clone()
            replaced[id(tensor)] = sliced if is_buffer else nn.Parameter(sliced, requires_grad=tensor.requires_grad)
        if is_buffer:
            persistent = name not in module._non_persistent_buffers_set
            module.register_buffer(name, replaced[id(tensor)], persistent=persistent)
        else:
            setattr(module, name, replaced[id(tensor)])
    embedding.num_embeddings = len(kept)
    embedding.padding_idx = remap.get(embedding.padding_idx) if embedding.padding_idx is not None else None
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(output, nn.Linear):
        output.out_features = len(kept)
    _remap_config(model, remap, len(kept))


def _remap_config(model: Any, remap: dict[int, int], size: int) -> None:
    """New vocab_size; special ids of the config and generation config under their new ids."""
    model.config.vocab_size = size
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if text_config is not model.config and hasattr(text_config, "vocab_size"):
        text_config.vocab_size = size
    for config in (model.config, getattr(model, "generation_config", None)):
        for field in SPECIAL_ID_FIELDS if config is not None else ():
            value = getattr(config, field, None)
            if isinstance(value, int) and value in remap:
                setattr(config, field, remap[value])
            elif isinstance(value, (list, tuple)):
                setattr(config, field, [remap.get(v, v) for v in value])

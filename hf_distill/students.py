"""Students built from their teacher: fewer layers copied from it, and BERT -> DistilBERT conversion.

Layer indices here are 0-based positions in the teacher's list of transformer blocks
(``teacher.bert.encoder.layer[i]``, ``teacher.transformer.h[i]``, ``teacher.model.layers[i]``); block i
produces hidden state i + 1 in the ``output_hidden_states`` convention of :mod:`hf_distill.layer_map`.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Optional

import torch
from transformers import PreTrainedModel

# model_type -> path of the list of transformer blocks inside the base model (``model.base_model``).
LAYER_LISTS = {
    "bert": "encoder.layer",
    "roberta": "encoder.layer",
    "distilbert": "transformer.layer",
    "gpt2": "h",
    "llama": "layers",
}


def select_layers(num_teacher_layers: int, num_layers: int) -> list[int]:
    """Evenly spread 0-based teacher blocks, first and last included (DistilBERT-style).

    ``round_half_up(j * (Lt - 1) / (n - 1))`` for j = 0..n-1: 12 -> 6 gives [0, 2, 4, 7, 9, 11] (DistilBERT's
    choice), 12 -> 4 gives [0, 4, 7, 11], 6 -> 4 gives [0, 2, 3, 5]. One layer gives [0].
    """
    if not 1 <= num_layers <= num_teacher_layers:
        raise ValueError(f"num_layers must be in 1..{num_teacher_layers} (the teacher's layer count), got {num_layers}")
    if num_layers == 1:
        return [0]
    span, gaps = num_teacher_layers - 1, num_layers - 1
    return [(2 * j * span + gaps) // (2 * gaps) for j in range(num_layers)]


def check_layer_choice(num_teacher_layers: int, num_layers: int, layers: Optional[list[int]] = None,
                       student: Optional[str] = None, student_hidden_size: Optional[int] = None) -> None:
    """Refuse the scripts' layer flags when the teacher cannot give them, before anything trains:
    ``--student_layers`` (a count) or ``--student_layer_indices`` (0-based teacher blocks), neither checked
    against the teacher when ``--student`` or ``--student_hidden_size`` gives a student not built from its layers,
    and the indices refused beside those two."""
    own_student_flag = "--student" if student else "--student_hidden_size" if student_hidden_size else None
    if own_student_flag:
        if layers:
            raise ValueError(f"--student_layer_indices copies the teacher's layers into the student; {own_student_flag} "
                             "gives a student of its own. Pass one of them.")
        return
    if layers and any(not 0 <= int(i) < num_teacher_layers for i in layers):
        raise ValueError(f"--student_layer_indices {' '.join(map(str, layers))}: the teacher has {num_teacher_layers} "
                         f"layers, numbered 0 to {num_teacher_layers - 1}.")
    if not layers and not 1 <= num_layers <= num_teacher_layers:
        raise ValueError(f"--student_layers {num_layers}: a student built from the teacher has 1 to "
                         f"{num_teacher_layers} layers (the teacher's count); choose which with --student_layer_indices.")


def _layer_list_name(model: PreTrainedModel) -> str:
    """Full state-dict prefix of the model's block list, e.g. ``bert.encoder.layer``."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in LAYER_LISTS:
        raise ValueError(
            f"create_student supports model types {sorted(LAYER_LISTS)}; got {model_type!r} ({type(model).__name__})"
        )
    blocks = model.base_model.get_submodule(LAYER_LISTS[model_type])
    return next(name for name, module in model.named_modules() if module is blocks)


def _copy_matching(source: dict[str, torch.Tensor], target: torch.nn.Module, rename) -> None:
    """Load into ``target`` every tensor ``source[rename(key)]``; ValueError listing what does not fit."""
    state, problems = {}, []
    for key, value in target.state_dict().items():
        source_key = rename(key)
        tensor = source.get(source_key)
        if tensor is None:
            problems.append(f"{key}: no {source_key} in the source")
        elif tensor.shape != value.shape:
            problems.append(f"{key}: shape {tuple(value.shape)} vs source {tuple(tensor.shape)}")
        else:
            state[key] = tensor
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} in all)" if len(problems) > 5 else "")
        raise ValueError(f"cannot copy the weights ({shown}); a config override may have changed parameter shapes")
    target.load_state_dict(state, strict=True)


def create_student(
    teacher: PreTrainedModel,
    num_layers: int | None = None,
    layers: list[int] | None = None,
    **config_overrides,
) -> PreTrainedModel:
    """A model of the teacher's class with fewer blocks, every weight copied from the teacher.

    Embeddings, the chosen blocks (``layers``: 0-based teacher block indices, in order; default
    :func:`select_layers`) and the heads (pooler, classifier, lm_head, ...) are copied; the config,
    label maps included, is the teacher's with the new layer count and ``config_overrides`` applied
    (overrides that change parameter shapes raise ValueError). With every layer kept the student
    computes exactly what the teacher computes. Supports BERT, RoBERTa, DistilBERT, GPT-2 and Llama.
    """
    list_name = _layer_list_name(teacher)
    total = teacher.config.num_hidden_layers
    if layers is None:
        layers = select_layers(total, total if num_layers is None else num_layers)
    layers = [int(i) for i in layers]
    if not layers or any(not 0 <= i < total for i in layers):
        raise ValueError(f"layers must be a non-empty list of teacher block indices in 0..{total - 1}, got {layers}")
    if num_layers is not None and num_layers != len(layers):
        raise ValueError(f"num_layers={num_layers} but {len(layers)} layers were given: {layers}")
    if layers == list(range(total)) and not config_overrides:
        warnings.warn(f"create_student keeps all {total} of the teacher's blocks: the student is a copy of the teacher, "
                      "not smaller; pass num_layers < the teacher's layer count to shrink it.", stacklevel=2)

    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == total:
        config.layer_types = [layer_types[i] for i in layers]
    for name, value in config_overrides.items():
        setattr(config, name, value)
    student = type(teacher)(config)

    prefix = list_name + "."

    def source_key(key: str) -> str:
        if not key.startswith(prefix):
            return key
        index, rest = key[len(prefix) :].split(".", 1)
        return f"{prefix}{layers[int(index)]}.{rest}"

    _copy_matching(teacher.state_dict(), student, source_key)
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)
    parameter = next(teacher.parameters())
    return student.to(device=parameter.device, dtype=parameter.dtype).train(teacher.training)


# BERT head class -> (DistilBERT class name, head key renames {distilbert key: bert key}).
_BERT_HEADS = {
    "BertModel": ("DistilBertModel", {}),
    "BertForSequenceClassification": (
        "DistilBertForSequenceClassification",
        {"pre_classifier": "bert.pooler.dense", "classifier": "classifier"},
    ),
    "BertForMultipleChoice": (
        "DistilBertForMultipleChoice",
        {"pre_classifier": "bert.pooler.dense", "classifier": "classifier"},
    ),
    "BertForTokenClassification": ("DistilBertForTokenClassification", {"classifier": "classifier"}),
    "BertForQuestionAnswering": ("DistilBertForQuestionAnswering", {"qa_outputs": "qa_outputs"}),
    "BertForMaskedLM": (
        "DistilBertForMaskedLM",
        {
            "vocab_transform": "cls.predictions.transform.dense",
            "vocab_layer_norm": "cls.predictions.transform.LayerNorm",
            "vocab_projector": "cls.predictions.decoder",
        },
    ),
}

# DistilBERT block module -> BERT block module.
_BLOCK_RENAMES = {
    "attention.q_lin": "attention.self.query",
    "attention.k_lin": "attention.self.key",
    "attention.v_lin": "attention.self.value",
    "attention.out_lin": "attention.output.dense",
    "sa_layer_norm": "attention.output.LayerNorm",
    "ffn.lin1": "intermediate.dense",
    "ffn.lin2": "output.dense",
    "output_layer_norm": "output.LayerNorm",
}


def _distilbert_config(config):
    """The DistilBERT config equivalent to a BERT config (label maps and attention implementation kept)."""
    from transformers import DistilBertConfig

    if getattr(config, "position_embedding_type", None) not in (None, "absolute"):
        raise ValueError(f"bert_to_distilbert needs absolute position embeddings, got {config.position_embedding_type!r}")
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ValueError("bert_to_distilbert supports encoder-only BERT (no is_decoder, no cross-attention)")
    if abs(config.layer_norm_eps - 1e-12) > 1e-15:
        warnings.warn(
            f"DistilBERT's layer norms use eps=1e-12; this BERT uses {config.layer_norm_eps}: outputs will differ slightly",
            stacklevel=3,
        )
    dropout = config.hidden_dropout_prob
    return DistilBertConfig(
        vocab_size=config.vocab_size,
        max_position_embeddings=config.max_position_embeddings,
        sinusoidal_pos_embds=False,
        n_layers=config.num_hidden_layers,
        n_heads=config.num_attention_heads,
        dim=config.hidden_size,
        hidden_dim=config.intermediate_size,
        dropout=dropout,
        attention_dropout=config.attention_probs_dropout_prob,
        activation=config.hidden_act,
        initializer_range=config.initializer_range,
        qa_dropout=0.0,  # BertForQuestionAnswering applies no dropout before qa_outputs
        seq_classif_dropout=getattr(config, "classifier_dropout", None) or dropout,
        pad_token_id=config.pad_token_id,
        tie_word_embeddings=getattr(config, "tie_word_embeddings", True),
        id2label=dict(config.id2label),
        label2id=dict(config.label2id),
        problem_type=config.problem_type,
        attn_implementation=getattr(config, "_attn_implementation", None),
    )


def bert_to_distilbert(model: PreTrainedModel) -> PreTrainedModel:
    """Convert a BERT model (e.g. a :func:`create_student` of one) to the ``DistilBertFor*`` of the same head.

    Keys are mapped one to one (q/k/v/out, FFN, layer norms, heads). DistilBERT has no token types, so
    ``token_type_embeddings[0]`` is added to every position embedding: outputs match BERT's for
    ``token_type_ids = 0`` (drop ``token_type_ids`` from the inputs). What is equal, up to float rounding:
    the hidden states of every layer, and the logits of the token-classification, question-answering and
    masked-LM heads. What is not: for sequence classification and multiple choice, BERT's pooler
    (``tanh(W h_cls + b)``) becomes DistilBERT's ``pre_classifier`` with the same weights but a ReLU,
    so the logits differ until the student is trained. ``BertModel``'s pooler is dropped.
    """
    import transformers

    name = type(model).__name__
    if getattr(model.config, "model_type", None) != "bert" or name not in _BERT_HEADS:
        raise ValueError(f"bert_to_distilbert supports BERT models {sorted(_BERT_HEADS)}; got {name}")
    target_name, head_renames = _BERT_HEADS[name]
    student = getattr(transformers, target_name)(_distilbert_config(model.config))

    source = dict(model.state_dict())
    bert = "" if name == "BertModel" else "bert."
    distil = "" if name == "BertModel" else "distilbert."
    token_type_zero = source[f"{bert}embeddings.token_type_embeddings.weight"][0]
    source["folded_position_embeddings"] = source[f"{bert}embeddings.position_embeddings.weight"] + token_type_zero
    if "cls.predictions.decoder.bias" not in source and "cls.predictions.bias" in source:
        source["cls.predictions.decoder.bias"] = source["cls.predictions.bias"]

    def bert_key(key: str) -> str:
        if not key.startswith(distil):  # a head
            module, leaf = key.rsplit(".", 1)
            return f"{head_renames.get(module, module)}.{leaf}"
        inner = key[len(distil) :]
        if inner == "embeddings.position_embeddings.weight":
            return "folded_position_embeddings"
        if inner.startswith("embeddings."):
            return bert + inner
        index, rest = inner[len("transformer.layer.") :].split(".", 1)
        module, leaf = rest.rsplit(".", 1)
        return f"{bert}encoder.layer.{index}.{_BLOCK_RENAMES.get(module, module)}.{leaf}"

    _copy_matching(source, student, bert_key)
    parameter = next(model.parameters())
    return student.to(device=parameter.device, dtype=parameter.dtype).train(model.training)


def narrow_causal_student(teacher: Any, hidden_size: int, num_layers: int, intermediate_size: Optional[int] = None,
                          num_heads: Optional[int] = None, seed: int = 0) -> Any:
    """A randomly initialised model of the teacher's class and vocabulary, narrower (``hidden_size``) and shallower."""
    config = copy.deepcopy(teacher.config)
    t_hidden = config.hidden_size
    t_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or t_hidden // t_heads
    heads = num_heads or max(1, hidden_size // head_dim)
    if hidden_size % heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by {heads} attention heads; "
                         "pass num_heads (--student_num_heads).")
    group = t_heads // (getattr(config, "num_key_value_heads", None) or t_heads)  # query heads per kv head
    kv = heads // group if group > 1 and heads % group == 0 else heads
    t_inter = getattr(config, "intermediate_size", None)
    updates = {"hidden_size": hidden_size, "num_hidden_layers": num_layers, "num_attention_heads": heads}
    if hasattr(config, "num_key_value_heads"):
        updates["num_key_value_heads"] = kv
    if hasattr(config, "head_dim"):
        updates["head_dim"] = hidden_size // heads
    if t_inter is not None:
        updates["intermediate_size"] = intermediate_size or max(1, round(t_inter * hidden_size / t_hidden))
    if isinstance(getattr(config, "layer_types", None), list):
        updates["layer_types"] = config.layer_types[:num_layers]
    for name, value in updates.items():
        setattr(config, name, value)
    torch.manual_seed(seed)
    student = type(teacher)(config)
    if getattr(teacher, "generation_config", None) is not None:
        student.generation_config = copy.deepcopy(teacher.generation_config)
    return student

"""Data helpers that work offline: a synthetic sentiment task, tokenizers from local files, JSONL loading,
and loaders whose errors name the file and the flag to fix."""

from __future__ import annotations

import contextlib
import json
import os
import random
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from transformers import PreTrainedTokenizerFast

POSITIVE = ["good", "great", "wonderful", "excellent", "lovely", "brilliant", "superb", "fun", "moving", "clever"]
NEGATIVE = ["bad", "awful", "terrible", "boring", "dull", "poor", "weak", "ugly", "clumsy", "tedious"]
NOUNS = ["movie", "film", "plot", "acting", "story", "cast", "music", "ending", "script", "camera", "pace", "dialogue"]
INTENSIFIERS = ["", "", "very", "really", "quite", "truly"]
NEGATORS = ["not", "never", "hardly"]
CONNECTIVES = ["and", "but", "while", "although"]
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SYNTHETIC_LABELS = ["negative", "positive"]


def _clause(rng: random.Random) -> tuple[str, int]:
    positive = rng.random() < 0.5
    negated = rng.random() < 0.35
    words = ["the", rng.choice(NOUNS), "was"]
    if negated:
        words.append(rng.choice(NEGATORS))
    intensifier = rng.choice(INTENSIFIERS)
    if intensifier:
        words.append(intensifier)
    words.append(rng.choice(POSITIVE if positive else NEGATIVE))
    return " ".join(words), 1 if positive != negated else -1


def synthetic_sentiment(
    num_examples: int, *, label_noise: float = 0.0, seed: int = 0, num_clauses: int = 3
) -> list[dict[str, Union[str, int]]]:
    """Sentences of ``num_clauses`` clauses ("the plot was not very good but ..."), label = majority sentiment.

    Negation flips a clause. ``label_noise`` flips that fraction of labels at random (the clean label
    is kept in ``clean_label``), which is where soft teacher targets help a student most.
    """
    if num_clauses % 2 == 0:
        raise ValueError("num_clauses must be odd so that the majority is defined.")
    rng = random.Random(seed)
    rows = []
    for _ in range(num_examples):
        clauses, score = [], 0
        for _ in range(num_clauses):
            text, polarity = _clause(rng)
            clauses.append(text)
            score += polarity
        sentence = clauses[0]
        for clause in clauses[1:]:
            sentence += f" {rng.choice(CONNECTIVES)} {clause}"
        clean = int(score > 0)
        label = 1 - clean if rng.random() < label_noise else clean
        rows.append({"text": sentence, "label": label, "clean_label": clean})
    return rows


def synthetic_tokenizer() -> PreTrainedTokenizerFast:
    """A BERT-style word-level tokenizer over the synthetic task's vocabulary."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = sorted(set(POSITIVE + NEGATIVE + NOUNS + NEGATORS + CONNECTIVES + [w for w in INTENSIFIERS if w] + ["the", "was"]))
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return _wrap_bert_style(tokenizer)


def _wrap_bert_style(tokenizer: "tokenizers.Tokenizer") -> PreTrainedTokenizerFast:  # noqa: F821
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def bert_tokenizer_from_vocab(vocab_file: Union[str, Path], lowercase: bool = True) -> PreTrainedTokenizerFast:
    """A BERT WordPiece tokenizer built from a local ``vocab.txt`` with the `tokenizers` library.

    (transformers 5's ``BertTokenizerFast(vocab_file=...)`` silently ignores the file; see STACK.md.)
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab_path = Path(vocab_file)
    if not vocab_path.is_file():
        raise FileNotFoundError(f"vocab file not found: {vocab_path}")
    vocab = {line.rstrip("\n"): i for i, line in enumerate(vocab_path.read_text(encoding="utf-8").splitlines())}
    tokenizer = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=None, clean_text=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    from tokenizers import decoders

    tokenizer.decoder = decoders.WordPiece(prefix="##")
    wrapped = _wrap_bert_style(tokenizer)
    if len(wrapped) != len(vocab):
        raise ValueError(f"tokenizer has {len(wrapped)} tokens but {vocab_path} lists {len(vocab)}.")
    return wrapped


def load_jsonl(path: Union[str, Path], limit: Optional[int] = None) -> list[dict]:
    """Read a JSON-lines file (one object per line)."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    return rows


#: File suffixes that mark a dataset argument as a local path, never a Hub id.
LOCAL_DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt", ".arrow")


def looks_like_local_path(name: str) -> bool:
    """True when ``name`` can only be a local path: it starts with ``.``, ``/`` or ``~``, has a data-file
    suffix, or has more than one ``/`` (a Hub id is ``name`` or ``owner/name``)."""
    return name.startswith((".", "/", "~")) or name.endswith(LOCAL_DATA_SUFFIXES) or name.count("/") > 1


def missing_local_data(name: str, flag: str = "--dataset") -> FileNotFoundError:
    """The error for a local dataset path that does not exist, with the absolute path that was tried."""
    tried = Path(name).expanduser().resolve()
    return FileNotFoundError(
        f"{flag} {name!r}: no such file or folder (looked for {tried}; relative paths start at the current "
        f"directory {Path.cwd()}). Pass an existing .jsonl file or folder, or a Hub dataset id such as 'glue'."
    )


def load_hub_dataset(path: str, flag: str = "--dataset", **kwargs: Any) -> Any:
    """``datasets.load_dataset(path, **kwargs)`` for a Hub name that is not a local path; a failure says that
    ``path`` is neither a local path nor reachable on the Hub, and what to pass instead."""
    import datasets

    if looks_like_local_path(path):
        raise missing_local_data(path, flag)
    try:
        return datasets.load_dataset(path, **kwargs)
    except (ConnectionError, FileNotFoundError, OSError, ValueError) as error:
        offline = " (the Hub is off: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set)" if _hub_offline() else ""
        raise FileNotFoundError(
            f"{flag} {path!r} is not a local file or folder (looked for {Path(path).expanduser().resolve()}) and "
            f"could not be loaded from the Hub{offline}: {error}. Check the path, or pass a folder of "
            "{train,validation,test}.jsonl files or a .jsonl file."
        ) from error


def _hub_offline() -> bool:
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def check_json_rows(path: Union[str, Path], flag: str = "--dataset", example: str = '{"text": ..., "label": 0}') -> None:
    """Refuse a JSON / JSON-lines file that does not exist or holds no rows, naming the file and the row format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag}: {path} does not exist.")
    with open(path, encoding="utf-8") as handle:
        if not any(line.strip() for line in handle):
            raise ValueError(
                f"{flag}: {path} is empty. Write one JSON object per line ({example})."
            )


def load_json_dataset(data_files: Union[str, Path, dict], flag: str = "--dataset",
                      example: str = '{"text": ..., "label": 0}') -> Any:
    """``datasets.load_dataset("json", ...)`` after checking that every file exists and has rows (an empty
    file otherwise ends in a bare ``StopIteration`` inside `datasets`). A str/Path gives a Dataset, a dict of
    split -> file a DatasetDict."""
    import datasets

    files = data_files if isinstance(data_files, dict) else {"train": data_files}
    for file in files.values():
        check_json_rows(file, flag, example)
    loaded = datasets.load_dataset("json", data_files={k: str(v) for k, v in files.items()})
    return loaded if isinstance(data_files, dict) else loaded["train"]


@contextlib.contextmanager
def explain_model_load_errors(name_or_path: Union[str, Path], flag: str) -> Iterator[None]:
    """Turn the opaque error of a damaged weights file (``SafetensorError: header too small``) into one that
    names the file, the flag it came from and the fix."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - re-raised unchanged unless it is a damaged weights file
        if not _is_damaged_weights(error):
            raise
        folder = Path(name_or_path).expanduser()
        files = sorted(p.name for p in folder.glob("*.safetensors")) if folder.is_dir() else []
        where = f"{folder}/{files[0] if len(files) == 1 else '*.safetensors'}" if folder.is_dir() else str(name_or_path)
        raise ValueError(
            f"{flag} {name_or_path}: the weights file {where} cannot be read ({type(error).__name__}: {error}). It is "
            "damaged or incomplete (an interrupted copy or download?): save the model again with save_pretrained() "
            "or download it again."
        ) from error


def _is_damaged_weights(error: BaseException) -> bool:
    if type(error).__name__ == "SafetensorError":
        return True
    text = str(error).lower()
    return "deserializing header" in text or "incomplete metadata" in text


def resume_argument(value: Optional[str]) -> Union[None, bool, str]:
    """The scripts' ``--resume_from_checkpoint``: None (start afresh), True (``true``: the last complete
    checkpoint in ``output_dir``) or the path of a checkpoint folder, which must exist."""
    if value is None or str(value).strip().lower() in ("", "false", "no", "0", "none"):
        return None
    if str(value).strip().lower() in ("true", "yes", "1", "last"):
        return True
    if not Path(value).expanduser().is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: no such checkpoint folder. Pass an "
                                "<output_dir>/checkpoint-N folder, or `true` for the last complete one.")
    return str(Path(value).expanduser())

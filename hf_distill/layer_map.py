"""Which student layer is matched to which teacher layer, and the projections between their widths.

Index convention (hidden states): index 0 is the embedding output and index i (1..L) the output of
transformer layer i, exactly the positions of the ``output_hidden_states`` tuple (length L + 1).
Attention maps have one entry per layer, so :func:`resolve_attention_layer_map` uses 0..L-1
(``output_attentions`` positions: index i is the attention of layer i + 1).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

STRATEGIES = ("uniform", "last", "skip")

LayerMapSpec = str | Mapping[int, int] | Mapping[str, int]


def _parse_explicit(spec: str | Mapping) -> dict[int, int] | None:
    """A dict (or a JSON object string) -> {int: int}; None when ``spec`` is a strategy name."""
    if isinstance(spec, str):
        if not spec.strip().startswith("{"):
            return None
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as err:
            raise ValueError(f"layer map {spec!r} is not valid JSON: {err}") from None
    try:
        return {int(s): int(t) for s, t in spec.items()}
    except (TypeError, ValueError, AttributeError):
        raise ValueError(f"an explicit layer map must map integers to integers, got {spec!r}") from None


def parse_layer_map_spec(spec: LayerMapSpec, flag: str = "layer map") -> tuple[LayerMapSpec, int | None]:
    """Check a layer-map spec's syntax (no model needed) and split off a strategy's count.

    ``"last:1"`` -> ("last", 1), ``"skip:2"`` -> ("skip", 2), ``"uniform"`` -> ("uniform", None); an explicit
    map (a dict or a JSON object string) is checked to map integers >= 0 to integers >= 0 and returned as
    given. Anything else raises ValueError naming ``flag`` and the accepted forms.
    """
    accepted = "uniform, last, last:N, skip, skip:N, or a JSON object such as '{\"2\": 4}'"
    if isinstance(spec, Mapping) or (isinstance(spec, str) and spec.strip().startswith("{")):
        try:
            explicit = _parse_explicit(spec)
        except ValueError as error:
            raise ValueError(f"{flag} {spec!r}: {error}; accepted: {accepted}") from None
        if not explicit or any(s < 0 or t < 0 for s, t in explicit.items()):
            raise ValueError(f"{flag} {spec!r}: an explicit map must be non-empty, with indices >= 0")
        return spec, None
    if not isinstance(spec, str):
        raise ValueError(f"{flag} must be a string or a dict, got {type(spec).__name__}; accepted: {accepted}")
    name, sep, count = spec.strip().lower().partition(":")
    if name not in STRATEGIES or (sep and name == "uniform"):
        raise ValueError(f"{flag} {spec!r} is not a layer map; accepted: {accepted}")
    if not sep:
        return name, None
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"{flag} {spec!r}: the count after ':' must be a positive integer (e.g. {name}:1)")
    return name, int(count)


def _check_range(layer_map: Mapping[int, int], max_student: int, max_teacher: int, what: str) -> None:
    """Every student index must lie in 0..max_student and every teacher index in 0..max_teacher."""
    if not layer_map:
        raise ValueError("the layer map is empty")
    for s, t in layer_map.items():
        if not 0 <= s <= max_student:
            raise ValueError(f"student {what} index {s} is out of range: valid indices are 0..{max_student}")
        if not 0 <= t <= max_teacher:
            raise ValueError(f"teacher {what} index {t} is out of range: valid indices are 0..{max_teacher}")


def _check_counts(num_student_layers: int, num_teacher_layers: int) -> None:
    if num_student_layers < 1 or num_teacher_layers < 1:
        raise ValueError(f"layer counts must be >= 1, got student {num_student_layers}, teacher {num_teacher_layers}")


def _strategy_map(strategy: str, ls: int, lt: int, num_layers: int | None, step: int | None) -> dict[int, int]:
    """Student layer (1..ls) -> teacher layer (1..lt) for a named strategy."""
    name = strategy.strip().lower()
    if name == "uniform":
        # round half up of i * lt / ls, at least 1; the last student layer always meets the last teacher layer.
        return {i: max(1, (2 * i * lt + ls) // (2 * ls)) for i in range(1, ls + 1)}
    if name == "last":
        k = min(ls, lt) if num_layers is None else num_layers
        if not 1 <= k <= min(ls, lt):
            raise ValueError(f"'last' needs 1 <= num_layers <= {min(ls, lt)}, got {k}")
        return {ls - k + j: lt - k + j for j in range(1, k + 1)}
    if name == "skip":
        k = lt // ls if step is None else step
        if k < 1 or k * ls > lt:
            raise ValueError(f"'skip' needs a step k >= 1 with k * {ls} student layers <= {lt} teacher layers, got k={k}")
        return {i: i * k for i in range(1, ls + 1)}
    raise ValueError(f"unknown layer-map strategy {strategy!r}: use one of {STRATEGIES} or a {{student: teacher}} dict")


def resolve_layer_map(
    strategy: LayerMapSpec,
    num_student_layers: int,
    num_teacher_layers: int,
    include_embeddings: bool = False,
    num_layers: int | None = None,
    step: int | None = None,
) -> dict[int, int]:
    """Resolve a strategy to ``{student hidden-state index: teacher hidden-state index}`` (0 = embeddings).

    With Ls student and Lt teacher layers, student layer i (1..Ls) maps to:
    - ``"uniform"``: ``max(1, round_half_up(i * Lt / Ls))``; works for any counts (12->6: 2,4,..,12;
      6->4: 2,3,5,6; 5->2: 3,5). Several student layers may share a teacher layer when Ls > Lt.
    - ``"last"``: the student's last k layers to the teacher's last k, ``Ls-k+j -> Lt-k+j``
      (k = ``num_layers``, default min(Ls, Lt)).
    - ``"skip"`` (PKD-skip): ``i -> i * k``, every k-th teacher layer (k = ``step``, default Lt // Ls).
    - an explicit dict ``{student: teacher}`` or its JSON string ``'{"1": 3}'``, taken as given.
    ``include_embeddings`` adds ``0 -> 0`` to the named strategies. Out-of-range indices raise ValueError.
    """
    _check_counts(num_student_layers, num_teacher_layers)
    explicit = _parse_explicit(strategy) if isinstance(strategy, str | Mapping) else None
    if explicit is None and not isinstance(strategy, str):
        raise ValueError(f"a layer map must be a strategy name or a dict, got {type(strategy).__name__}")
    if explicit is None:
        layer_map = _strategy_map(strategy, num_student_layers, num_teacher_layers, num_layers, step)
        if include_embeddings:
            layer_map = {0: 0, **layer_map}
    else:
        layer_map = explicit
    _check_range(layer_map, num_student_layers, num_teacher_layers, "hidden-state")
    return dict(sorted(layer_map.items()))


def resolve_attention_layer_map(
    strategy: LayerMapSpec,
    num_student_layers: int,
    num_teacher_layers: int,
    num_layers: int | None = None,
    step: int | None = None,
) -> dict[int, int]:
    """Like :func:`resolve_layer_map` for attention maps: ``{student: teacher}`` indices in 0..L-1.

    A named strategy pairs the same layers as for hidden states, shifted down by one (hidden state i is
    produced by the layer whose attention is at index i - 1). An explicit dict is read in 0..L-1.
    """
    _check_counts(num_student_layers, num_teacher_layers)
    explicit = _parse_explicit(strategy) if isinstance(strategy, str | Mapping) else None
    if explicit is None:
        hidden = resolve_layer_map(strategy, num_student_layers, num_teacher_layers, False, num_layers, step)
        return {s - 1: t - 1 for s, t in hidden.items()}
    _check_range(explicit, num_student_layers - 1, num_teacher_layers - 1, "attention")
    return dict(sorted(explicit.items()))


def check_widths(student_width: int, teacher_width: int, use_projection: bool) -> bool:
    """Return True when the widths differ (a projection is needed); ValueError if it is then disabled."""
    if student_width != teacher_width and not use_projection:
        raise ValueError(
            f"student width {student_width} differs from teacher width {teacher_width} and projections are "
            "disabled: enable the learned projections, or use a relation loss (MiniLM, RKD), which needs none"
        )
    return student_width != teacher_width


class FeatureProjections(torch.nn.Module):
    """Learned linear maps from the student's width to the teacher's, one per mapped student layer.

    ``shared=True`` uses one map for all layers (as TinyBERT's W_h). When the widths are equal the maps
    start as the identity, so enabling them changes nothing at step 0. They are trained with the student
    but saved on their own (:meth:`save` / :meth:`load`, a safetensors file), never in the student.
    """

    def __init__(
        self, student_width: int, teacher_width: int, layers: Iterable[int], shared: bool = False, bias: bool = True
    ) -> None:
        super().__init__()
        self.student_width, self.teacher_width = int(student_width), int(teacher_width)
        self.layers = sorted({int(i) for i in layers})
        self.shared, self.bias = bool(shared), bool(bias)
        if not self.layers:
            raise ValueError("FeatureProjections needs at least one layer")
        keys = ["shared"] if self.shared else [str(i) for i in self.layers]
        self.projections = torch.nn.ModuleDict(
            {key: torch.nn.Linear(self.student_width, self.teacher_width, bias=self.bias) for key in keys}
        )
        if self.student_width == self.teacher_width:
            with torch.no_grad():
                for linear in self.projections.values():
                    linear.weight.copy_(torch.eye(self.student_width))
                    if linear.bias is not None:
                        linear.bias.zero_()

    def forward(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        """Project ``[..., student_width]`` hidden states of student ``layer`` to ``[..., teacher_width]``."""
        if layer not in self.layers:
            raise KeyError(f"no projection for student layer {layer}; mapped layers are {self.layers}")
        return self.projections["shared" if self.shared else str(layer)](hidden)

    def _metadata(self) -> dict[str, str]:
        return {
            "student_width": str(self.student_width),
            "teacher_width": str(self.teacher_width),
            "layers": json.dumps(self.layers),
            "shared": json.dumps(self.shared),
            "bias": json.dumps(self.bias),
        }

    def save(self, path: str | Path) -> None:
        """Write the weights and the constructor arguments (as metadata) to a safetensors file."""
        from safetensors.torch import save_file

        tensors = {key: value.detach().cpu().contiguous() for key, value in self.state_dict().items()}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=self._metadata())

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> FeatureProjections:
        """Rebuild the projections saved by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            meta = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        missing = {"student_width", "teacher_width", "layers", "shared", "bias"} - set(meta)
        if missing:
            raise ValueError(f"{path} is not a FeatureProjections file (metadata lacks {sorted(missing)})")
        module = cls(
            int(meta["student_width"]),
            int(meta["teacher_width"]),
            json.loads(meta["layers"]),
            shared=json.loads(meta["shared"]),
            bias=json.loads(meta["bias"]),
        )
        module.load_state_dict(tensors)
        return module.to(device)

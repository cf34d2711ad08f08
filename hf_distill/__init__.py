"""hf_distill: knowledge distillation for Hugging Face Transformers on the stock Trainer."""

__version__ = "0.1.0"

from .arguments import DistillationArguments  # noqa: E402
from .collator import TeacherColumnsCollator  # noqa: E402
from .metrics import classification_metrics, load_metric, token_classification_metrics  # noqa: E402
from .tasks import detect_task  # noqa: E402
from .teacher_cache import cache_teacher_outputs, model_fingerprint  # noqa: E402
from .trainer import DistillationTrainer, load_teacher  # noqa: E402

__all__ = [
    "DistillationArguments",
    "DistillationTrainer",
    "TeacherColumnsCollator",
    "cache_teacher_outputs",
    "classification_metrics",
    "detect_task",
    "load_metric",
    "load_teacher",
    "model_fingerprint",
    "token_classification_metrics",
]

"""hf_distill: knowledge distillation for Hugging Face Transformers on the stock Trainer."""

__version__ = "0.1.0"

"""Multi-Cost KD: knowledge distillation for LLMs across tokenizers (MCW-KD and its baselines)."""

__version__ = "0.1.0"

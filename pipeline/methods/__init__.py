"""The registry of fine-tuning methods: one module per method, each registering itself.

A method turns a freshly loaded base model into the model the Trainer optimises (adapter layers
added, the right parameters trainable) and says whether its result can be merged into the base.
Heavy imports (peft) happen inside ``apply`` so listing methods and validating configs stays fast.
"""

from __future__ import annotations

from pipeline.methods.registry import METHODS, Method, TrainingPlan, register

__all__ = ["METHODS", "Method", "TrainingPlan", "get_method", "register"]


def get_method(name: str) -> Method:
    """Look a method up by name; unknown names raise ConfigError listing the available ones."""
    from pipeline.errors import ConfigError

    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]


# Each import registers one method.
from pipeline.methods import lora  # noqa: E402,F401,I001  (lora first: the listing's order)
from pipeline.methods import dora, full, ia3, pir, prefix, prompt, ptuning, qlora, ulmfit  # noqa: E402,F401

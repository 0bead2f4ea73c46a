"""Experiment tracking (``tune.report_to``): the Trainer's own integrations, kept offline.

Each tracker is an optional extra (``pip install 'edgetune[tensorboard]'``, ``[wandb]``, ``[mlflow]``) and
writes under ``runs/<run>/tracking/``: TensorBoard event files in ``tensorboard/<task>/``, wandb in offline
mode (``wandb sync`` uploads later), mlflow to a file store. A variable the user set (``WANDB_MODE``,
``MLFLOW_TRACKING_URI``) wins, so pointing at a server is one export away; nothing here needs the network.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

from pipeline.config import Config, TaskConfig
from pipeline.errors import ConfigError

# tracker -> the module that must import for the Trainer's integration to run
_NEEDS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def trainer_args(cfg: Config, task: TaskConfig) -> dict[str, Any]:
    """``TrainingArguments`` for ``tune.report_to``; sets the offline defaults in the environment.

    Raises ConfigError, before any training, when the tracker's package is not installed."""
    tracker = cfg.tune.report_to
    if tracker == "none":
        return {"report_to": "none"}
    if importlib.util.find_spec(_NEEDS[tracker]) is None:
        raise ConfigError(f"tune.report_to={tracker}: the {_NEEDS[tracker]!r} package is not installed; "
                          f"pip install 'edgetune[{tracker}]' (or set tune.report_to: none)")
    folder = (cfg.run_dir / "tracking").resolve()
    if tracker == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_DIR", str(folder))
        os.environ.setdefault("WANDB_PROJECT", "edgetune")
    if tracker == "mlflow":
        os.environ.setdefault("MLFLOW_TRACKING_URI", (folder / "mlruns").as_uri())
        os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", f"edgetune-{cfg.run}")
    folder.mkdir(parents=True, exist_ok=True)
    return {"report_to": [tracker], "run_name": f"{cfg.run}/{task.name}",
            "logging_dir": str(folder / "tensorboard" / task.name)}

"""A run's state on disk and the rules for resuming it.

`state.safetensors` holds all a run needs to continue: weights (model.*), Adam moments and step counts
(optim.{i}.*), the EMA (ema.*), and as metadata the step, the config and the options. A run that is
stopped and resumed ends bit-identical to an uninterrupted one on CPU.

What a resumed run may change: the settings in KEPT_ON_RESUME fix what it computes and must stay; the
rest of RESUMABLE are restored from the run unless given again (a longer `steps`, another `precision`
or `grad_accum` on another machine); the model fields (MODEL_FIELDS) must give the run's config. The
precision is restored as it was asked: a run started with "auto" picks again for the device it resumes on.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from jetcli import checkpoints
from jetcli.checkpoints import CheckpointError
from jetcli.config import JetConfig
from jetcli.errors import SettingError, SettingWarning
from jetcli.fileio import check_writable, remove_partial_writes
from jetcli.model import Jet
from jetcli.train.metrics import CURVES_NAME, METRICS_NAME, SAMPLES_NAME, truncate_metrics
from jetcli.train.options import RunSettings, absolute_source

from jetcli.train.sharding import gathered, is_sharded, like, load_weights

if TYPE_CHECKING:
    from jetcli.train.loop import Trainer

STATE_NAME = "state.safetensors"
EMA_DIR = "ema"
KEPT_ON_RESUME = ("data", "val", "val_fraction", "crop", "flip", "batch_size", "lr", "weight_decay",
                  "warmup", "clip", "ema", "seed")
RESUMABLE = KEPT_ON_RESUME + ("steps", "grad_accum", "eval_every", "ckpt_every", "precision", "compile", "shard")
DATA_KEYS = ("data", "val", "val_fraction", "crop", "flip")  # kept in the options' `extra`, with the command
# Also in `extra`: the precision as asked ("auto"), where `precision` is what it resolved to on the device
# of the session that saved. Runs saved before it was kept resume with their resolved precision.
ASKED_PRECISION = "asked_precision"
MODEL_FIELDS = ("preset_name", "couplings", "block_depth", "width", "heads", "patch_size", "kinds",
                "spatial_patterns")
# Everything a run writes in its folder (and ema/): a new run refuses a folder holding any of the outputs.
OUTPUT_NAMES = (checkpoints.WEIGHTS_NAME, checkpoints.CONFIG_NAME, EMA_DIR, CURVES_NAME, SAMPLES_NAME)
WRITTEN_NAMES = (STATE_NAME, METRICS_NAME, checkpoints.WEIGHTS_NAME, checkpoints.CONFIG_NAME, CURVES_NAME,
                 SAMPLES_NAME)


# --------------------------------------------------------------------------- writing and reading
def save_run(trainer: Trainer) -> None:
    """The weights (and EMA) in the format every command loads, then the resumable state.

    The state goes last: it is what resuming continues from, so a run killed in between has weights
    one step ahead of its state (which resuming recomputes identically), never weights left behind."""
    out, main = trainer.opts.out, trainer.processes.main
    # Whole tensors on rank 0 (a sharded model's are gathered: every process takes part).
    weights = gathered(trainer.model.state_dict(), main)
    ema = gathered(trainer.ema, main) if trainer.ema is not None else None
    moments = {i: gathered(state, main) for i, state in trainer.optimizer.state_dict()["state"].items()}
    if not main:
        return
    extra = {"step": str(trainer.step), "train": json.dumps(trainer.opts.extra, default=str)}
    checkpoints.save(filled(trainer.config, weights) if is_sharded(trainer.model) else trainer.model, out,
                     extra_metadata=extra)
    if ema is not None:
        checkpoints.save(filled(trainer.config, ema), out / EMA_DIR, extra_metadata=extra)
    tensors = {f"model.{k}": v for k, v in weights.items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.items()})
    for i, state in moments.items():
        tensors.update({f"optim.{i}.{k}": v for k, v in state.items()})
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta = {"step": str(trainer.step), "config": trainer.config.to_json(),
            "options": json.dumps(asdict(trainer.opts), default=str)}
    checkpoints.write_safetensors(out / STATE_NAME, tensors, meta)


def restore_run(trainer: Trainer) -> int:
    """Load the state of the run in `trainer.opts.out` into the trainer: weights, Adam state and EMA;
    returns the step. The schedule and the data position follow from the step. (States written before
    the data randomness was keyed by position also hold rng.* tensors; they are not needed.)"""
    path, meta, config = run_state(trainer.opts.out)
    try:
        step = int(meta["step"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: not a jet train state ({e})") from None
    tensors = checkpoints.load_state(path)
    if step < 0:
        raise CheckpointError(f"{path}: not a jet train state (step {step})")
    if config != trainer.config:
        raise CheckpointError(f"{path}: was trained with another model config")
    group = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    load_weights(trainer.model, group("model."), str(path))  # refuses missing, misshapen or NaN
    try:
        optim = trainer.optimizer.state_dict()
        optim["state"] = {}
        for key, value in group("optim.").items():
            index, name = key.split(".", 1)
            optim["state"].setdefault(int(index), {})[name] = value
        parameters = list(trainer.model.parameters())
        check_adam_state(optim["state"], [p.shape for p in parameters], step)
        optim["state"] = {i: {k: v if k == "step" else like(v, parameters[i]) for k, v in moments.items()}
                          for i, moments in optim["state"].items()}  # this process's shards, if sharded
        trainer.optimizer.load_state_dict(optim)
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: does not match the model ({str(e).splitlines()[0]})") from None
    if trainer.ema is not None:  # a run that had no EMA starts one from the current weights
        saved = group("ema.")
        own = trainer.model.state_dict()
        trainer.ema = {k: like(v, own[k]) for k, v in saved.items()} if saved else trainer.fresh_ema()
    return step


def filled(config: JetConfig, weights: dict[str, torch.Tensor]) -> Jet:
    """A model holding these weights, built without a random init that they would replace."""
    model = checkpoints.empty_model(config)
    model.load_state_dict(weights)
    return model


def tidy_run_folder(out: Path, step: int) -> None:
    """Before a resumed run writes again: drop the metrics past its step (it writes those again) and
    the temporary files of the writes a killed run was making (nothing reads them)."""
    truncate_metrics(out, step)
    for folder in (out, out / EMA_DIR):
        remove_partial_writes(folder, WRITTEN_NAMES)


def check_adam_state(state: dict[int, dict[str, torch.Tensor]], shapes: list[torch.Size], step: int) -> None:
    """torch loads optimiser state without checking it; a damaged one would fail (or train on NaN) later."""
    for index, moments in state.items():
        if not 0 <= index < len(shapes):
            raise ValueError(f"optimiser state for parameter {index}, the model has {len(shapes)}")
        for name, value in moments.items():
            if name != "step" and value.shape != shapes[index]:
                raise ValueError(f"optim.{index}.{name} has shape {tuple(value.shape)}, the parameter "
                                 f"{tuple(shapes[index])}")
            if not torch.isfinite(value).all():
                raise ValueError(f"optim.{index}.{name} holds NaN or Inf")
    if step and len(state) != len(shapes):
        raise ValueError(f"optimiser state for {len(state)} of the {len(shapes)} parameters at step {step}")


def checkpoint_step(out: Path) -> int | None:
    """The step of the run's last checkpoint on disk (its state is written last, so weights at least as
    recent are there too); None if there is none or it cannot be read."""
    try:
        return int(checkpoints.read_metadata(Path(out) / STATE_NAME)["step"])
    except (CheckpointError, KeyError, ValueError):
        return None


def run_state(out: Path) -> tuple[Path, dict[str, str], JetConfig]:
    """The state file of the run in `out`, its metadata and the config stored there."""
    path = Path(out) / STATE_NAME
    if not path.exists():
        raise CheckpointError(f"{path}: no such file: nothing to resume")
    meta = checkpoints.read_metadata(path)
    try:
        return path, meta, JetConfig.from_json(meta["config"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: not a jet train state ({e})") from None


def saved_run(out: Path) -> tuple[JetConfig, dict]:
    """The config and the settings (flat, by field: data sources included) of the run in `out`."""
    path, meta, config = run_state(out)
    try:
        options = json.loads(meta["options"])
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: not a jet train state ({e})") from None
    if not isinstance(options, dict) or not isinstance(options.get("extra") or {}, dict):
        raise CheckpointError(f"{path}: not a jet train state (its options are not a JSON object)")
    # The run's model is built from this config: a damaged one must not allocate a huge model first.
    shapes = checkpoints.read_shapes(path)
    checkpoints.check_size(config, {k[len("model."):]: v for k, v in shapes.items() if k.startswith("model.")},
                           str(path))
    extra = options.get("extra") or {}
    flat = {k: options[k] for k in RESUMABLE if k in options}
    flat.update({k: extra.get(k) for k in DATA_KEYS})
    flat.update({k: absolute_source(flat[k]) for k in ("data", "val")})  # runs saved before: relative paths
    if extra.get(ASKED_PRECISION) is not None:
        flat["precision"] = extra[ASKED_PRECISION]
    flat["val_fraction"] = flat["val_fraction"] or 0.0
    return config, flat


# --------------------------------------------------------------------------- the rules
def check_new_run_folder(out: Path) -> None:
    """A new run needs a folder that holds no run and none of the files it would write, in a place where
    files can be made."""
    if (out / STATE_NAME).exists():
        raise SettingError("{path} already holds a run: pass {resume} to continue it, or choose another {out}",
                           path=out)
    if out.exists() and not out.is_dir():
        raise SettingError("{out} {path}: is a file, not a folder", path=out)
    taken = [name for name in OUTPUT_NAMES if (out / name).exists()]
    if taken:
        raise SettingError("{path} holds {names}, which training would overwrite: choose another {out}",
                           path=out, names=", ".join(taken))
    check_writable(out / STATE_NAME)  # a place no file can be made in: refused now, not at the first checkpoint


def resume_settings(settings: RunSettings, given: set[str]) -> tuple[JetConfig, RunSettings]:
    """The saved run's config, and its settings with those in `given` (the fields asked for again)
    applied where a resumed run may change them. Refuses a change to the others."""
    config, saved = saved_run(settings.out)
    if saved["flip"] is None:  # saved before flips were a setting: they were always on
        saved["flip"] = True
        warnings.warn("this run was saved before the data stream was hashed by position: it keeps its random "
                      "flips, and from here on its crops, flips and noise follow the new stream (the same "
                      "distributions, other draws)", stacklevel=2)
    changed = [k for k in KEPT_ON_RESUME if k in given and getattr(settings, k) != saved[k]]
    if changed:
        parts = [f"{{{k}}} {{new_{i}!r}} (the run has {{old_{i}!r}})" for i, k in enumerate(changed)]
        values = {f"new_{i}": getattr(settings, k) for i, k in enumerate(changed)}
        values.update({f"old_{i}": saved[k] for i, k in enumerate(changed)})
        raise SettingError("a resumed run keeps its data and optimisation settings: " + ", ".join(parts), **values)
    if "steps" in given and saved.get("steps") not in (None, settings.steps):
        warnings.warn(SettingWarning(
            "{steps} {new} (the run had {old}): the learning-rate schedule (warmup, then cosine decay) now spans "
            "{new} steps, so the steps from here on follow another schedule than the run's first ones did",
            new=settings.steps, old=saved["steps"]), stacklevel=2)
    return config, replace(settings, **{k: v for k, v in saved.items() if k not in given})


def resumed_config(saved: JetConfig, asked: JetConfig, given: set[str], image_size: tuple[int, int]) -> JetConfig:
    """The config a resumed run continues with: its own, if the model fields given agree with it and
    the data has its image size."""
    if given & set(MODEL_FIELDS) and asked != saved:
        raise SettingError("a resumed run keeps its model: drop the model options, or choose another {out}")
    if saved.image_size != image_size:
        raise SettingError("the run trained on {saved} images, the data gives {data}", saved=saved.image_size,
                           data=image_size)
    return saved

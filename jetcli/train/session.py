"""A whole training run from its settings: check the run folder, reconcile a resume, load the data,
build the config and the Trainer; at the end, draw the curves and the samples."""

from __future__ import annotations

from dataclasses import dataclass, replace

from jetcli.config import JetConfig, preset, preset_for
from jetcli.data import ImageSet, load_datasets
from jetcli.devices import resolve_device
from jetcli.errors import SettingError
from jetcli.precision import CHOICES, resolve
from jetcli.train.distributed import Distributed, init_distributed
from jetcli.train.loop import Trainer
from jetcli.train.metrics import CURVES_NAME, SAMPLES_NAME, plot_curves, read_metrics, save_samples
from jetcli.train.schedule import epoch_steps
from jetcli.train.options import RunSettings, TrainOptions, absolute_source
from jetcli.train.state import (ASKED_PRECISION, DATA_KEYS, check_new_run_folder, resume_settings,
                                resumed_config)


@dataclass
class Run:
    trainer: Trainer
    train_set: ImageSet
    val_set: ImageSet | None
    resumed: bool

    @property
    def processes(self) -> Distributed:
        return self.trainer.processes

    @property
    def finished(self) -> bool:
        return self.trainer.step >= self.trainer.opts.steps


def start_run(settings: RunSettings, given: set[str] = frozenset(), command: str = "") -> Run:
    """A Trainer ready to run: a new run in an unused `settings.out`, or (`settings.resume`) the run
    there, continued with its own settings except those named in `given` that a resume may change."""
    saved_config = None
    settings = replace(settings, data=absolute_source(settings.data), val=absolute_source(settings.val))
    if settings.resume:
        saved_config, settings = resume_settings(settings, given)
    else:
        check_new_run_folder(settings.out)
    if settings.precision not in CHOICES:
        raise SettingError("{precision} {value!r}: expected {choices}", value=settings.precision,
                           choices=", ".join(CHOICES))
    processes, device = init_distributed(resolve_device(settings.device))
    train_set, val_set = load_datasets(settings.data, settings.val, settings.val_fraction, settings.crop,
                                       settings.seed, settings.flip)
    if settings.epochs is not None:
        if "steps" in given:
            raise SettingError("give {steps} or {epochs}, not both")
        settings = replace(settings, steps=epoch_steps(settings.epochs, len(train_set), settings.batch_size))
    config = model_config(settings, train_set.image_size)
    if saved_config is not None:
        config = resumed_config(saved_config, config, given, train_set.image_size)
    opts = train_options(settings, device, {"train_images": len(train_set),
                                            "val_images": len(val_set) if val_set is not None else 0,
                                            "command": command})
    try:
        trainer = Trainer(config, train_set, val_set, opts, processes)
    except SettingError:
        raise
    except ValueError as e:  # torch's refusals of optimiser settings (a negative weight decay)
        raise SettingError.of(e) from None
    if settings.resume:
        trainer.resume()
    return Run(trainer, train_set, val_set, settings.resume)


def model_config(settings: RunSettings, image_size: tuple[int, int]) -> JetConfig:
    """The preset with the model fields that were set, for images of `image_size`."""
    overrides = {k: getattr(settings, k) for k in ("couplings", "block_depth", "width", "heads", "patch_size")
                 if getattr(settings, k) is not None}
    if settings.kinds:
        overrides["kinds"] = tuple(k.strip() for k in settings.kinds.split(","))
    if settings.spatial_patterns:
        overrides["spatial_projs"] = tuple(k.strip() for k in settings.spatial_patterns.split(","))
    try:
        if settings.patch_size is None:  # the paper's presets choose the patch size that gives 256 patches
            return preset_for(settings.preset_name, image_size).replace(**overrides)
        return preset(settings.preset_name).replace(image_size=image_size, **overrides)
    except SettingError:
        raise
    except ValueError as e:
        raise SettingError.of(e) from None


def train_options(settings: RunSettings, device, about_run: dict) -> TrainOptions:
    """The loop's options; `extra` keeps the data sources and the precision as asked (for resuming: "auto"
    is resolved again for the device of each session) and `about_run` (image counts and the command, for
    the model card)."""
    names = ("steps", "batch_size", "grad_accum", "lr", "weight_decay", "warmup", "clip", "ema", "seed",
             "eval_every", "ckpt_every", "compile", "shard")
    extra = {**{k: getattr(settings, k) for k in DATA_KEYS}, ASKED_PRECISION: settings.precision, **about_run}
    return TrainOptions(out=settings.out, precision=resolve(settings.precision, device), device=str(device),
                        extra=extra, **{k: getattr(settings, k) for k in names})


def write_pictures(run: Run) -> float | None:
    """The curves, and once the run is finished a grid of samples; returns the last val bpd, if any."""
    out = run.trainer.opts.out
    records = read_metrics(out)
    plot_curves(records, out / CURVES_NAME)
    if run.finished:
        save_samples(run.trainer.model, out / SAMPLES_NAME, run.trainer.opts.seed)
    vals = [r["val_bpd"] for r in records if "val_bpd" in r]
    return vals[-1] if vals else None

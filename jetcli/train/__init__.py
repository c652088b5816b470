"""Training Jet by maximum likelihood, as the paper and big_vision's Jet trainer do.

| module | holds |
|---|---|
| `schedule` | big_vision's warmup + cosine schedule and its AdamW |
| `options` | `TrainOptions` (what the loop needs) and `RunSettings` (what a run is asked for) |
| `loop` | the `Trainer`: data positions, one step, evaluation, the loop with checkpoints and signals |
| `distributed` | torchrun's process group |
| `state` | `state.safetensors` and every rule of resuming |
| `metrics` | metrics.jsonl, the curves and the samples grid |
| `session` | a whole run from its settings, as `jet train` does it |
"""

from jetcli.train.distributed import Distributed, finish_distributed, init_distributed
from jetcli.train.loop import Trainer
from jetcli.train.metrics import METRICS_NAME, plot_curves, read_metrics
from jetcli.train.options import RunSettings, TrainOptions
from jetcli.train.schedule import lr_factor, make_optimizer, warmup_steps
from jetcli.train.session import Run, start_run, write_pictures
from jetcli.train.state import EMA_DIR, STATE_NAME, resume_settings, saved_run

__all__ = ["Distributed", "EMA_DIR", "METRICS_NAME", "STATE_NAME", "Run", "RunSettings", "TrainOptions",
           "Trainer", "finish_distributed", "init_distributed", "lr_factor", "make_optimizer", "plot_curves",
           "read_metrics", "resume_settings", "saved_run", "start_run", "warmup_steps", "write_pictures"]

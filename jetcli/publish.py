"""`jet train --push-to-hub OWNER/NAME`: what a finished run puts on the Hugging Face Hub, and the upload.

The repo gets the weights and config.json in jetcli's own format (the EMA weights in ema/ when the run
kept them), the metrics and plots, and a generated model card stating the data, the config, the steps
and the validation bits/dim that training measured.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id

from jetcli import checkpoints
from jetcli.errors import SettingError
from jetcli.train import EMA_DIR, METRICS_NAME, STATE_NAME, read_metrics
from jetcli.train.metrics import CURVES_NAME, SAMPLES_NAME

CARD_NAME = "README.md"
RUN_FILES = (checkpoints.WEIGHTS_NAME, checkpoints.CONFIG_NAME, f"{EMA_DIR}/{checkpoints.WEIGHTS_NAME}",
             f"{EMA_DIR}/{checkpoints.CONFIG_NAME}", METRICS_NAME, CURVES_NAME, SAMPLES_NAME)


def check_destination(repo_id: str) -> None:
    """Fail before training, not after it: a well-formed OWNER/NAME and a token to upload with."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise SettingError("{push_to_hub} {repo!r}: not a Hub repo id ({reason})", repo=repo_id, reason=e) from None
    if repo_id.count("/") != 1:
        raise SettingError("{push_to_hub} {repo!r}: expected OWNER/NAME", repo=repo_id)
    if get_token() is None:
        raise SettingError("{push_to_hub} needs a Hugging Face token: run `hf auth login` or set HF_TOKEN")


def model_card(run: Path, repo_id: str) -> str:  # long: most of it is the card's Markdown template
    """A README.md for the run in `run`, from its weights' metadata and its metrics."""
    run = Path(run)
    weights = run / checkpoints.WEIGHTS_NAME
    meta = checkpoints.read_metadata(weights)
    model = checkpoints.load_own(run)
    train = json.loads(meta.get("train", "{}"))
    options = json.loads(checkpoints.read_metadata(run / STATE_NAME).get("options", "{}")) \
        if (run / STATE_NAME).exists() else {}
    records = read_metrics(run)
    vals = [r for r in records if "val_bpd" in r]
    h, w = model.config.image_size
    val_line = (f"{vals[-1]['val_bpd']:.4f} bits/dim on `{train.get('val') or 'a held-out fraction'}` "
                f"({train.get('val_images', '?')} images), measured at step {vals[-1]['step']}"
                if vals else "not measured (the run had no validation set)")
    rows = [
        ("training data", f"`{train.get('data')}` ({train.get('train_images', '?')} images"
                          + (f", random {train['crop']}x{train['crop']} crops with flips)" if train.get("crop")
                             else f" of {h}x{w})")),
        ("validation", val_line),
        ("last training batch", f"{records[-1]['bpd']:.4f} bits/dim" if records else "-"),
        ("steps", f"{meta.get('step', '?')} of {options.get('steps', '?')}, global batch "
                  f"{options.get('batch_size', '?')}"),
        ("optimiser", f"AdamW betas {tuple(options.get('betas', ()))}, lr {options.get('lr')}, weight decay "
                      f"{options.get('weight_decay')} (big_vision semantics), warmup {options.get('warmup')} "
                      f"then cosine, clip {options.get('clip')}, "
                      + (f"EMA {options['ema']} (in ema/)" if options.get("ema") else "no EMA")),
        ("parameters", f"{model.num_params() / 1e6:.2f}M"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    extras = "".join(f"\n![{name}]({name})\n" for name in ("curves.png", "samples.png") if (run / name).exists())
    return f"""---
library_name: jetcli
tags:
- normalizing-flow
- jet
- density-estimation
- image-generation
---

# {repo_id.split('/')[-1]}

A [Jet](https://arxiv.org/abs/2412.15129) normalizing flow (Kolesnikov, Susano Pinto and Tschannen)
for {h}x{w} RGB images, trained with jetcli's `jet train`.

| | |
|---|---|
{table}
{extras}
## Config

```json
{model.config.to_json()}
```

## Use

```
jet bpd --model {repo_id} photos/          # bits/dim of your images
jet sample --model {repo_id} -o samples.png
```

Trained with: `{train.get('command')}`
"""


def upload_plan(run: Path, repo_id: str) -> list[CommitOperationAdd]:
    """The files of one commit: the run's weights, config, EMA, metrics and plots, and the model card."""
    run = Path(run)
    if not (run / checkpoints.WEIGHTS_NAME).is_file():
        raise checkpoints.CheckpointError(f"{run}: no {checkpoints.WEIGHTS_NAME} to upload")
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(run / name))
                  for name in RUN_FILES if (run / name).is_file()]
    card = model_card(run, repo_id).encode()
    return operations + [CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card)]


def push(run: Path, repo_id: str, token: str | None = None) -> str:
    """Create the repo if needed and upload the run in one commit; returns the commit's URL."""
    api = HfApi(token=token)
    operations = upload_plan(run, repo_id)
    api.create_repo(repo_id, exist_ok=True)
    commit = api.create_commit(repo_id, operations=operations, commit_message="Upload a Jet trained with jetcli")
    return commit.commit_url

"""Checkpoints: jetcli's own format, and adapters from the two public Jet layouts.

Every layout ends in the one parameter layout of `jetcli.model.Jet`; the adapters only rename, reshape
and turn stored projection matrices into the `order` index buffers. `load(path)` tells them apart.

| module | holds |
|---|---|
| `own` | the own format (save, load_own, safetensors readers) and the checked model building all share |
| `detect` | `identify` (which layout a path holds) and `load` (any of them) |
| `layouts` | what the foreign layouts share: projection matrices <-> orders, configs from shapes |
| `jet_pytorch` | jet-pytorch 0.0.2 state dicts, both ways |
| `big_vision` | big_vision's flattened Flax param tree (.npz), both ways |
"""

from jetcli.checkpoints.big_vision import (BIG_VISION_DEFAULTS, BV_CHANNEL_MASKS, BV_SPATIAL_MASKS, big_vision_config,
                                           from_big_vision, save_big_vision, to_big_vision)
from jetcli.checkpoints.detect import PICKLE_SUFFIXES, identify, load, read_npz, read_pickled_state
from jetcli.checkpoints.jet_pytorch import (JET_PYTORCH_DEFAULTS, from_jet_pytorch, jet_pytorch_config,
                                            jet_pytorch_name, save_jet_pytorch, to_jet_pytorch)
from jetcli.checkpoints.layouts import matrix_from_order, order_from_matrix
from jetcli.checkpoints.own import (CONFIG_NAME, FORMAT, FORMAT_VERSION, READ_BACKEND, WEIGHTS_NAME, CheckpointError,
                                    build_model, check_size, empty_model, load_own, load_state, load_weights,
                                    read_metadata, read_shapes, save, write_safetensors)

__all__ = ["BIG_VISION_DEFAULTS", "BV_CHANNEL_MASKS", "BV_SPATIAL_MASKS", "CONFIG_NAME", "FORMAT", "FORMAT_VERSION",
           "JET_PYTORCH_DEFAULTS", "PICKLE_SUFFIXES", "READ_BACKEND", "WEIGHTS_NAME", "CheckpointError",
           "big_vision_config", "build_model", "check_size", "empty_model", "from_big_vision", "from_jet_pytorch",
           "identify", "jet_pytorch_config", "jet_pytorch_name", "load", "load_own", "load_state", "load_weights",
           "matrix_from_order", "order_from_matrix", "read_metadata", "read_npz", "read_pickled_state",
           "read_shapes", "save", "save_big_vision", "save_jet_pytorch", "to_big_vision", "to_jet_pytorch",
           "write_safetensors"]

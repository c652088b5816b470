"""Checkpoints: own format, jet-pytorch and big_vision layouts, and everything that must be refused."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from jetcli import Jet, JetConfig
from jetcli import checkpoints as ck
from jetcli.checkpoints import CheckpointError
from jetcli.config import SHIFTED_PROJS, SPATIAL_PROJS
from jetcli.model import unpatchify

# 8 heads: the jet-pytorch default, so its files load without overrides.
PORT = JetConfig(image_size=(16, 16), patch_size=4, couplings=6, block_depth=2, width=32, heads=8,
                 ln_eps=1e-5, gelu="exact")
FLAX = PORT.replace(heads=2, ln_eps=1e-6, gelu="tanh", couplings=7, kinds=("channels", "spatial", "channels"))


def images(config: JetConfig, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(batch, *config.image_size, config.channels, generator=g) * 2 - 1


def assert_same_model(a: Jet, b: Jet, x: torch.Tensor | None = None) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    if x is not None:
        with torch.no_grad():
            (za, la), (zb, lb) = a(x), b(x)
        assert torch.equal(za, zb) and torch.equal(la, lb)


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("target", ["folder", "model.safetensors"])
def test_own_format_round_trip(target, tmp_path, random_jet):
    model = random_jet(PORT)
    weights = ck.save(model, tmp_path / target)
    loaded = ck.load(tmp_path / target)
    assert loaded.config == model.config
    assert_same_model(model, loaded, images(PORT))
    if target == "folder":
        assert weights == tmp_path / "folder" / "model.safetensors"
        assert JetConfig.from_json((tmp_path / "folder" / "config.json").read_text()) == model.config


def test_jet_pytorch_round_trip(tmp_path, random_jet):
    model = random_jet(PORT)
    path = ck.save_jet_pytorch(model, tmp_path / "port.safetensors")
    state = load_file(str(path))
    assert "blocks.0.dnn.encoder.blocks.1.mha.in_proj_weight" in state
    assert state["channel_projections"].shape == (5, 48, 48) and state["spatial_projections"].shape == (1, 16, 16)
    loaded = ck.load(path)
    assert loaded.config == model.config
    assert_same_model(model, loaded, images(PORT))


def test_shifted_patterns_survive_big_vision_and_jet_pytorch_layouts(tmp_path, random_jet):
    """Both layouts store a spatial split as its permutation matrix, which the name is read back from
    (jet-pytorch's stores weights only: kinds, heads and numerics are passed)."""
    config = FLAX.replace(spatial_projs=SHIFTED_PROJS)
    model = random_jet(config)
    for path, overrides in ((ck.save_big_vision(model, tmp_path / "params.npz"), {}),
                            (ck.save_jet_pytorch(model, tmp_path / "port.safetensors"), {k: getattr(config, k) for k in ("kinds", "heads", "ln_eps", "gelu")})):
        loaded = ck.load(path, **overrides)
        assert [p for k, p in loaded.config.plan() if k == "spatial"] == [p for k, p in config.plan() if k == "spatial"]
        assert_same_model(model, loaded, images(config))


def test_big_vision_round_trip(tmp_path, random_jet):
    model = random_jet(FLAX)
    path = ck.save_big_vision(model, tmp_path / "params.npz")
    with np.load(path, allow_pickle=False) as f:
        assert f["couplings/dnn/init_proj/kernel"].shape == (7, 24, 32)
        query = f["couplings/dnn/vit/encoderblock_1/MultiHeadDotProductAttention_0/query/kernel"]
        assert query.shape == (7, 32, 2, 16)
        channel, spatial = f[ck.BV_CHANNEL_MASKS], f[ck.BV_SPATIAL_MASKS]
    # Exactly one real mask per coupling; the other is big_vision's all-zero placeholder.
    assert [bool(c.any()) for c in channel] == [k == "channels" for k, _ in FLAX.plan()]
    assert [bool(s.any()) for s in spatial] == [k == "spatial" for k, _ in FLAX.plan()]
    loaded = ck.load(path)
    assert loaded.config == model.config
    assert_same_model(model, loaded, images(FLAX))


def test_all_three_formats_load_into_the_same_jet(tmp_path, random_jet):
    model = random_jet(PORT)
    ck.save(model, tmp_path / "own")
    ck.save_jet_pytorch(model, tmp_path / "port.safetensors")
    ck.save_big_vision(model, tmp_path / "params.npz")
    x = images(PORT)
    own = ck.load(tmp_path / "own")
    port = ck.load(tmp_path / "port.safetensors")
    # big_vision files carry no numerics; read them with the port's to compare like with like.
    flax = ck.load(tmp_path / "params.npz", ln_eps=1e-5, gelu="exact")
    assert own.config == port.config == flax.config == model.config
    assert_same_model(own, port, x)
    assert_same_model(own, flax, x)
    assert ck.load(tmp_path / "params.npz").config == PORT.replace(ln_eps=1e-6, gelu="tanh")


# --------------------------------------------------------------------------- against the references
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("couplings,size", [(10, (16, 16)), (40, (16, 16)), (10, (16, 32))],
                         ids=["cycled", "port-fallback", "non-square"])
def test_loads_a_state_dict_written_by_jet_pytorch(couplings, size, tmp_path):
    """The port's own state dict, not our exporter's. With 40 couplings it has 8 spatial couplings and
    fills the two beyond its list of six with "checkerboard" instead of cycling; on a non-square image
    it builds its spatial splits on the transposed grid."""
    jet_pytorch = pytest.importorskip("jet_pytorch.jet")
    torch.manual_seed(0)
    n = size[0] * size[1] // 16
    port = jet_pytorch.Jet(patch_size=4, patch_dim=48, n_patches=n, img_dims=size, coupling_layers=couplings,
                           block_depth=1, block_width=32, num_heads=8).eval()
    with torch.no_grad():
        for block in port.blocks:
            block.dnn.final_proj.weight.normal_(std=0.05)
            block.dnn.final_proj.bias.normal_(std=0.3)
    save_file({k: v.contiguous() for k, v in port.state_dict().items()}, str(tmp_path / "port.safetensors"))
    torch.save(port.state_dict(), tmp_path / "port.pt")
    x = images(PORT.replace(image_size=size))
    with torch.no_grad():
        z_port, logdet_port = port(x)
        z_port = unpatchify(z_port, 4, size)
    overrides = {} if size[0] == size[1] else {"image_size": size}
    for name in ("port.safetensors", "port.pt"):
        model = ck.load(tmp_path / name, **overrides)
        with torch.no_grad():
            z, logdet = model(x)
        assert ((z - z_port).abs().max() / z_port.abs().max()).item() <= 1e-5
        assert ((logdet - logdet_port[:, 0]).abs().max() / logdet_port.abs().max()).item() <= 1e-5
    spatial = [proj for kind, proj in model.config.plan() if kind == "spatial"]
    assert len(spatial) == couplings // 5
    assert spatial == (list(SPATIAL_PROJS) + ["checkerboard"] * 2)[: len(spatial)]
    assert (model.config.couplings, model.config.block_depth, model.config.width) == (couplings, 1, 32)


def big_vision_forward(params: dict[str, np.ndarray], x: np.ndarray, ps: int) -> tuple[np.ndarray, np.ndarray]:
    """Jet's forward transcribed from big_vision (models/proj/jet/jet.py, models/vit.py) in float64 numpy:
    projection-matrix splits, flax Dense/LayerNorm(eps 1e-6)/MultiHeadDotProductAttention/tanh GELU."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // ps, ps, w // ps, ps, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, ps * ps * c)
    cm, sm = params[ck.BV_CHANNEL_MASKS], params[ck.BV_SPATIAL_MASKS]
    depth = len({k.split("/")[3] for k in params if "encoderblock_" in k})

    def norm(y, p):
        mu, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
        return (y - mu) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]

    def dense(y, p):
        return y @ p["kernel"] + p["bias"]

    logdet = np.zeros(b)
    for i in range(len(cm)):
        p = {}
        for key, value in params.items():
            if key.startswith("couplings/dnn/"):
                *path, leaf = key[len("couplings/dnn/"):].split("/")
                p.setdefault("/".join(path), {})[leaf] = value[i].astype(np.float64)
        channels = cm[i].any()
        if channels:
            x1, x2 = np.split(x @ cm[i], 2, axis=-1)
        else:
            x1, x2 = np.split(np.einsum("ntk,tm->nmk", x, sm[i]), 2, axis=-2)
            x1, x2 = (a.reshape(b, a.shape[1] * 2, -1) for a in (x1, x2))
        y = dense(x1, p["init_proj"]) + p[""]["posemb"]
        for d in range(depth):
            blk = f"vit/encoderblock_{d}/"
            att = blk + "MultiHeadDotProductAttention_0/"
            t = norm(y, p[blk + "LayerNorm_0"])
            q, k, v = (np.einsum("bnw,whd->bnhd", t, p[att + n]["kernel"]) + p[att + n]["bias"]
                       for n in ("query", "key", "value"))
            logits = np.einsum("bqhd,bkhd->bhqk", q / math.sqrt(q.shape[-1]), k)
            weights = np.exp(logits - logits.max(-1, keepdims=True))
            weights /= weights.sum(-1, keepdims=True)
            o = np.einsum("bhqk,bkhd->bqhd", weights, v)
            y = y + np.einsum("bqhd,hdw->bqw", o, p[att + "out"]["kernel"]) + p[att + "out"]["bias"]
            t = dense(norm(y, p[blk + "LayerNorm_1"]), p[blk + "MlpBlock_0/Dense_0"])
            t = 0.5 * t * (1 + np.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t**3)))
            y = y + dense(t, p[blk + "MlpBlock_0/Dense_1"])
        bias, raw = np.split(dense(norm(y, p["vit/encoder_norm"]), p["final_proj"]), 2, axis=-1)
        x2 = (x2 + bias) * (2.0 / (1 + np.exp(-raw)))
        logdet += (-np.logaddexp(0, -raw) + math.log(2.0)).sum(axis=(1, 2))
        if channels:
            x = np.concatenate([x1, x2], -1) @ cm[i].T
        else:
            x1, x2 = (a.reshape(b, a.shape[1] // 2, -1) for a in (x1, x2))
            x = np.einsum("ntk,tm->nmk", np.concatenate([x1, x2], -2), sm[i].T)
    x = x.reshape(b, h // ps, w // ps, ps, ps, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
    return x, logdet


def test_big_vision_layout_matches_a_transcription_of_big_vision(tmp_path, random_jet):
    model = random_jet(FLAX, strength=0.5)
    path = ck.save_big_vision(model, tmp_path / "params.npz")
    params = ck.read_npz(path)
    x = images(FLAX)
    z_ref, logdet_ref = big_vision_forward(params, x.double().numpy(), FLAX.patch_size)
    loaded = ck.load(path).double()
    with torch.no_grad():
        z, logdet = loaded(x.double())
    assert np.abs(z_ref - x.numpy()).max() > 0.1
    np.testing.assert_allclose(z.numpy(), z_ref, rtol=0, atol=1e-10)
    np.testing.assert_allclose(logdet.numpy(), logdet_ref, rtol=1e-12)


def test_big_vision_tree_with_params_prefix_loads(tmp_path, random_jet):
    model = random_jet(FLAX)
    params = {f"params/{k}": v for k, v in ck.to_big_vision(model).items()}
    np.savez(tmp_path / "tree.npz", **params)
    assert_same_model(model, ck.load(tmp_path / "tree.npz"))


# --------------------------------------------------------------------------- what must be refused
def refuses(path, match: str | None = None, **overrides) -> str:
    with pytest.raises(CheckpointError, match=match) as info:
        ck.load(path, **overrides)
    message = str(info.value)
    assert "\n" not in message and str(Path(path).name) in message
    return message


@pytest.fixture
def saved(tmp_path, random_jet) -> dict[str, Path]:
    model = random_jet(PORT)
    return {"own": ck.save(model, tmp_path / "own"),
            "port": ck.save_jet_pytorch(model, tmp_path / "port.safetensors"),
            "flax": ck.save_big_vision(model, tmp_path / "params.npz")}


def rewrite(path: Path, original: dict, change, metadata: bool = True) -> Path:
    """Re-save a safetensors file as a fresh copy of `original` changed in place by `change(dict)`."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() if metadata else None
    state = {k: v.clone() for k, v in original.items()}
    change(state)
    save_file(state, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("kind", ["own", "port", "flax"])
def test_truncated_files_are_refused(kind, saved):
    path = saved[kind]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    refuses(path)
    path.write_bytes(b"")
    refuses(path)


def test_wrong_shapes_missing_extra_and_nan_tensors_are_refused(saved):
    path, key = saved["own"], "couplings.0.vit.posemb"
    original = load_file(str(path))
    rewrite(path, original, lambda s: s.__setitem__(key, torch.zeros(1, 16, 31)))
    refuses(path, "shape")
    rewrite(path, original, lambda s: s.pop(key))
    refuses(path, "missing")
    rewrite(path, original, lambda s: s.__setitem__("couplings.0.vit.extra", torch.zeros(1)))
    refuses(path, "unexpected")
    rewrite(path, original, lambda s: s[key].view(-1).__setitem__(3, float("nan")))
    refuses(path, "NaN")
    rewrite(path, original, lambda s: s["couplings.1.split.order"].__setitem__(0, 1))
    refuses(path, "not a permutation")


def test_bad_jet_pytorch_state_dicts_are_refused(saved):
    path = saved["port"]
    original = load_file(str(path))
    rewrite(path, original, lambda s: s.pop("blocks.2.dnn.encoder.ln.bias"), metadata=False)
    refuses(path, "missing tensor blocks.2.dnn.encoder.ln.bias")
    rewrite(path, original, lambda s: s.__setitem__("optimizer.step", torch.zeros(1)), metadata=False)
    refuses(path, "unexpected")
    rewrite(path, original, lambda s: s["channel_projections"][0].mul_(0.5), metadata=False)
    refuses(path, "not an exact permutation matrix")
    doubled = lambda s: s.__setitem__("spatial_projections", s["spatial_projections"].repeat(2, 1, 1))  # noqa: E731
    rewrite(path, original, doubled, metadata=False)
    refuses(path, "pass kinds=")
    rewrite(path, {"weight": torch.zeros(2)}, lambda s: None, metadata=False)
    refuses(path, "no jet-pytorch tensors")


def test_bad_big_vision_trees_are_refused(saved):
    path = saved["flax"]
    params = ck.read_npz(path)
    np.savez(path, **params, **{"couplings/dnn/extra/kernel": np.zeros((6, 2))})
    refuses(path, "unexpected")
    masks = params[ck.BV_CHANNEL_MASKS].copy()
    masks[0] = 0  # coupling 0 then has no mask at all
    np.savez(path, **{**params, ck.BV_CHANNEL_MASKS: masks})
    refuses(path, "exactly one non-zero mask")
    np.savez(path, **{**params, "couplings/dnn/posemb": params["couplings/dnn/posemb"][:, :, :8]})
    refuses(path)
    np.savez(path, **{**params, "couplings/dnn/final_proj/bias": np.array(["a"] * 6, dtype=object)})
    refuses(path, "not a readable .npz")


class Payload:
    """Unpickling this would create a file: the loader must never do it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickles_are_refused_unless_weights_only(tmp_path, saved):
    marker = tmp_path / "pwned"
    torch.save({"blocks.0.dnn.pos_emb": Payload(marker)}, tmp_path / "evil.pt")
    refuses(tmp_path / "evil.pt", "refused")
    assert not marker.exists()
    torch.save({"step": 3}, tmp_path / "plain.bin")
    refuses(tmp_path / "plain.bin", "not a plain state dict")
    torch.save(load_file(str(saved["port"])), tmp_path / "weights.pth")  # a plain state dict is fine
    assert isinstance(ck.load(tmp_path / "weights.pth"), Jet)


def test_config_json_disagreeing_is_refused(saved):
    side = saved["own"].parent / "config.json"
    side.write_text(json.dumps({**PORT.to_dict(), "scale_factor": 3.0}))
    refuses(saved["own"].parent, "disagrees")
    side.write_text("{not json")
    refuses(saved["own"].parent, "unreadable config")


def test_other_bad_paths_are_refused(tmp_path, saved):
    refuses(tmp_path / "nothing-here", "no such file")
    (tmp_path / "empty").mkdir()
    refuses(tmp_path / "empty", "has no model.safetensors")
    (tmp_path / "notes.txt").write_text("hello")
    refuses(tmp_path / "notes.txt", "unknown checkpoint format")
    refuses(saved["own"], "disagrees", heads=4)  # overrides may not contradict a stored config
    refuses(saved["port"], "invalid", heads=5)  # 32 wide is not divisible by 5 heads

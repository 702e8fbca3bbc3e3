"""Tests of pretrained.py: the paper's released CIFAR-10 weights in both public layouts (the TF-scope state dict of
model-790000.ckpt's PyTorch port, and diffusers' google/ddpm-cifar10-32 as a folder, .safetensors or .bin, with its
config checked to be the paper's network) load strictly into unet.UNet and compute what they computed there; the
safetensors reader against an independent writer; unreadable files as one clear error; and the released layouts
sampled end to end through sample.py."""
import hashlib
import json
from pathlib import Path

import pytest
import torch

import pretrained
import sample
from checkpoint import PAPER_DIFFUSION, build_diffusion
from conftest import KEYS_FILE, TINY, inputs, randomized, read_npz
from imagefiles import tensor_bytes, to_uint8
from pretrained import (convert_diffusers_state_dict, diffusers_config, identify, load_pretrained, read_safetensors,
                        to_diffusers_state_dict, write_safetensors)
from samplers import ddim_sample_loop
from unet import UNet

# google/ddpm-cifar10-32's config.json (the paper's net in diffusers terms; up blocks listed lowest resolution first)
DDPM_CIFAR10_32 = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
    norm_eps=1e-6, norm_num_groups=32, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
    act_fn="silu", center_input_sample=False, mid_block_scale_factor=1, time_embedding_type="positional")


def test_tf_scope_state_dict_roundtrip(tmp_path, cifar_net):
    """A bare TF-scope state dict (the layout of the PyTorch port of model-790000.ckpt) loads strictly into the
    CIFAR-10 config and reproduces the outputs; so do common wrappers and this project's checkpoint format."""
    x, t = inputs(1)
    with torch.no_grad():
        ref = cifar_net(x, t)
    torch.save(cifar_net.state_dict(), tmp_path / "model-790000.ckpt")
    net = load_pretrained(tmp_path / "model-790000.ckpt")
    assert not net.training and net.config["attn_resolutions"] == [16] and net.config["ch_mult"] == [1, 2, 2, 2]
    with torch.no_grad():
        torch.testing.assert_close(net(x, t), ref, atol=0, rtol=0)

    small = randomized(UNet(**dict(TINY, num_classes=4, in_channels=1)))
    x, t = inputs(2, channels=1, size=16)
    with torch.no_grad():
        ref = small(x, t, torch.tensor([0, 4]))
    files = {"wrapped.pt": {"state_dict": {"module." + k: v for k, v in small.state_dict().items()}},
             "ckpt.pt": {"model": UNet(**small.config).state_dict(), "ema": small.state_dict(), "step": 3,
                         "model_config": small.config, "format": "ddpm-checkpoint-v1"}}
    for name, obj in files.items():
        torch.save(obj, tmp_path / name)
        loaded = load_pretrained(tmp_path / name)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x, t, torch.tensor([0, 4])), ref, atol=0, rtol=0)


def _diffusers_net(**overrides):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.UNet2DModel(**dict(DDPM_CIFAR10_32, **overrides)).eval()


@pytest.fixture(scope="module")
def diffusers_cifar():
    return _diffusers_net()


def test_diffusers_keys_convert_to_released_keys(diffusers_cifar):
    """diffusers' google/ddpm-cifar10-32 layout renamed to TF scopes gives exactly the released key list."""
    expected = {k: s for k, s in (line.split() for line in KEYS_FILE.read_text().splitlines() if line.strip())}
    converted = convert_diffusers_state_dict(diffusers_cifar.state_dict())
    assert {k: "x".join(map(str, v.shape)) for k, v in converted.items()} == expected


def test_parity_with_diffusers_cifar10(tmp_path, diffusers_cifar):
    """Independent implementation: a randomly initialised diffusers UNet2DModel in the google/ddpm-cifar10-32
    configuration, saved with save_pretrained (safetensors, read here without the safetensors package), loads
    with UNet.from_pretrained and gives the same eps as diffusers on the same (x, t), in fp32."""
    diffusers_cifar.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    net = load_pretrained(tmp_path)
    assert net.config == UNet(dropout=net.config["dropout"]).config
    x, t = inputs(2)
    t[0] = 999
    with torch.no_grad():
        torch.testing.assert_close(net(x, t), diffusers_cifar(x, t).sample, atol=1e-4, rtol=1e-4)


def test_parity_with_diffusers_small_bin_and_old_names(tmp_path):
    """A smaller diffusers net (1 channel, attention at full resolution, 3 levels) saved as .bin inside a pipeline's
    unet/ folder loads and matches; the same weights under diffusers' old attention names (query/key/value/proj_attn)
    with no config.json beside them load from the shapes alone and match too."""
    d = _diffusers_net(sample_size=16, in_channels=1, out_channels=2, block_out_channels=(32, 64, 64), layers_per_block=1,
                       down_block_types=("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"))
    d.save_pretrained(tmp_path / "pipe" / "unet", safe_serialization=False)
    x, t = inputs(2, channels=1, size=16)
    with torch.no_grad():
        ref = d(x, t).sample
        torch.testing.assert_close(load_pretrained(tmp_path / "pipe")(x, t), ref, atol=1e-4, rtol=1e-4)
    old = {k.replace("to_q", "query").replace("to_k", "key").replace("to_v", "value").replace("to_out.0", "proj_attn"): v
           for k, v in d.state_dict().items()}
    torch.save(old, tmp_path / "old.bin")
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(tmp_path / "old.bin")(x, t), ref, atol=1e-4, rtol=1e-4)


def test_diffusers_config_not_the_paper_is_refused(tmp_path):
    """Multi-head attention (attention_head_dim set) or symmetric downsample padding is another network: refused."""
    d = _diffusers_net(sample_size=16, block_out_channels=(32, 64), layers_per_block=1,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    d.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for key, value in [("attention_head_dim", 8), ("downsample_padding", 1)]:
        (tmp_path / "config.json").write_text(json.dumps(dict(cfg, **{key: value})))
        with pytest.raises(ValueError, match=key):
            load_pretrained(tmp_path)


def write_safetensors_by_hand(path, state_dict):
    """A minimal safetensors writer written here from the format (8-byte little-endian header length, JSON header,
    raw data), independent of pretrained.write_safetensors."""
    names = {torch.float32: "F32", torch.int64: "I64"}
    header, blobs, offset = {}, [], 0
    for k, v in state_dict.items():
        blob = b"".join(tensor_bytes(v))  # the elements' bytes, as they lie in memory (little-endian)
        header[k] = {"dtype": names[v.dtype], "shape": list(v.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header).encode()
    Path(path).write_bytes(len(head).to_bytes(8, "little") + head + b"".join(blobs))


def test_safetensors_reader_roundtrip(tmp_path):
    """read_safetensors returns exactly the tensors written; a TF-scope .safetensors file loads with from_pretrained."""
    net = randomized(UNet(**TINY))
    sd = dict(net.state_dict(), extra=torch.arange(5))
    write_safetensors_by_hand(tmp_path / "w.safetensors", sd)
    back = read_safetensors(tmp_path / "w.safetensors")
    assert list(back) == list(sd) and all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in sd.items())
    sd.pop("extra")
    write_safetensors_by_hand(tmp_path / "tf.safetensors", sd)
    x, t = inputs(2, size=16)
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(tmp_path / "tf.safetensors")(x, t), net(x, t), atol=0, rtol=0)


def test_load_errors(tmp_path):
    """Missing, empty, truncated or foreign inputs end in FileNotFoundError/ValueError with a one-line message
    that names the file."""
    with pytest.raises(FileNotFoundError):
        load_pretrained(tmp_path / "nope.ckpt")
    with pytest.raises(FileNotFoundError):
        load_pretrained(tmp_path)  # a folder without weights
    sd = UNet(**TINY).state_dict()
    write_safetensors_by_hand(tmp_path / "good.safetensors", sd)
    torch.save(sd, tmp_path / "good.pt")
    st, pt = (tmp_path / "good.safetensors").read_bytes(), (tmp_path / "good.pt").read_bytes()
    cases = {"trunc.safetensors": st[: len(st) // 2], "header.safetensors": st[:100], "tiny.safetensors": b"abc",
             "trunc.pt": pt[: len(pt) // 2], "text.pt": b"hello"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "foreign.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    sd.pop("conv_out.bias")
    torch.save(sd, tmp_path / "incomplete.pt")
    for name in [*cases, "foreign.pt", "list.pt", "incomplete.pt"]:
        with pytest.raises(ValueError) as e:
            load_pretrained(tmp_path / name)
        assert "\n" not in str(e.value) and name in str(e.value)

# ---- the released weights, through sample.py (the full CIFAR-10 net, 2 DDIM steps, one image)


def sample_released(path, tmp_path, capsys):
    sample.main([str(path), "--n", "1", "--steps", "2", "--out", str(tmp_path / "r.png"), "--npz",
                 str(tmp_path / "r.npz"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert "released weights" in out and "35.75M params, T=1000" in out
    return read_npz(tmp_path / "r.npz")["arr_0"]


def expected_released(model):
    """The same 2 DDIM steps on the paper's diffusion, run here with the given net as eps_theta."""
    diffusion = build_diffusion(PAPER_DIFFUSION)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return to_uint8(ddim_sample_loop(diffusion, model, (1, 3, 32, 32), 2, generator=g))


def test_released_diffusers_layout(tmp_path, capsys):
    """A randomly initialised google/ddpm-cifar10-32 export (diffusers UNet2DModel, the paper's config) loads as a
    folder and as its .safetensors file (.bin: above), and sample.py's samples are those of the diffusers net itself
    (to one uint8 level, for fp32 differences between the two implementations)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    net = diffusers.UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
        norm_eps=1e-6, norm_num_groups=32, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1).eval()
    folder = tmp_path / "ddpm-cifar10-32"
    net.save_pretrained(folder)
    expected = expected_released(lambda x, t: net(x, t).sample)
    assert expected.float().std() > 10  # the random net gives varied pixels, so the comparison means something
    for path in (folder, folder / "diffusion_pytorch_model.safetensors"):
        assert (sample_released(path, tmp_path, capsys).int() - expected.int()).abs().max() <= 1


def test_released_tf_scope_state_dict(tmp_path, capsys, monkeypatch):
    """A bare state dict with the TF-scope keys (the PyTorch port of model-790000.ckpt) implies the CIFAR-10 net and
    the paper's diffusion; sample.py's samples are those of the net it holds; the file is named by its MD5 where it is
    a released one, else as the paper's network by its parameter count."""
    net = randomized(UNet())
    torch.save(net.state_dict(), tmp_path / "model-790000.ckpt")
    assert torch.equal(sample_released(tmp_path / "model-790000.ckpt", tmp_path, capsys),
                       expected_released(lambda x, t: net(x, t)))
    assert "the paper's CIFAR-10 network, MD5" in identify(tmp_path / "model-790000.ckpt", net)
    md5 = hashlib.md5((tmp_path / "model-790000.ckpt").read_bytes()).hexdigest()
    monkeypatch.setitem(pretrained.RELEASED_MD5, md5, "the released file")  # as if it were the download
    assert identify(tmp_path / "model-790000.ckpt", net) == f"MD5 {md5}: the released file"

# ---- models of this project, out to diffusers


def test_safetensors_writer_round_trips_and_the_package_reads_it(tmp_path):
    """write_safetensors: read_safetensors gives back every tensor bit for bit (float32, int64, bf16, uint8), and so
    does the safetensors package where it is installed (requirements-dev.txt)."""
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2, 2).bfloat16(),
               "d": torch.tensor([0, 255], dtype=torch.uint8), "e": torch.zeros(0, 3)}
    write_safetensors(tmp_path / "w.safetensors", tensors, {"format": "pt"})
    back = read_safetensors(tmp_path / "w.safetensors")
    assert list(back) == list(tensors) and all(torch.equal(back[k], v) for k, v in tensors.items())
    st = pytest.importorskip("safetensors.torch")
    assert all(torch.equal(st.load_file(tmp_path / "w.safetensors")[k], v) for k, v in tensors.items())


def test_names_round_trip_to_diffusers_and_back():
    """to_diffusers_state_dict is convert_diffusers_state_dict's inverse (class embedding included), and on the
    paper's net it gives diffusers' own key names and shapes (where diffusers is installed)."""
    net = randomized(UNet(**dict(TINY, num_classes=3)))
    sd = net.state_dict()
    back = convert_diffusers_state_dict(to_diffusers_state_dict(sd))
    assert list(back) == list(sd) and all(torch.equal(back[k], v) for k, v in sd.items())
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.UNet2DModel(**{k: v for k, v in diffusers_config(UNet().config).items() if k != "_class_name"})
    ours = to_diffusers_state_dict(UNet().state_dict())
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.state_dict().items()}

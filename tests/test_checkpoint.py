"""Checkpoint loading: safetensors only, clear errors for every way a file can be wrong."""

from __future__ import annotations

import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file

from export.checkpoint import CheckpointError, load_unet, load_vae, read_safetensors
from export.models import UpscalerUNet
from tests.conftest import KEYS_JSON, SHARED_KEYS_JSON, SMALL_UNET, SMALL_VAE


def _save(state: dict, path) -> str:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


def _save_with_header_length_byte(state: dict, path, low_byte: int = 0x80) -> str:
    """A real safetensors file whose first byte (the header length's low byte) is ``low_byte``,
    padded through its metadata: 0x80 is also the first byte of a pickle."""
    state = {k: v.contiguous() for k, v in state.items()}
    for pad in range(256):
        save_file(state, str(path), metadata={"pad": "x" * pad})
        with open(path, "rb") as handle:
            if struct.unpack("<Q", handle.read(8))[0] & 0xFF == low_byte:
                return str(path)
    raise AssertionError("no padding gave the wanted header length")


@pytest.fixture()
def small_state() -> dict:
    torch.manual_seed(11)
    return UpscalerUNet(**SMALL_UNET).state_dict()


def test_written_safetensors_loads_into_the_model(tmp_path, small_state):
    path = _save(small_state, tmp_path / "flow_upscaler.safetensors")
    model = load_unet(path, **SMALL_UNET)
    assert not model.training
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in small_state.items())


def test_half_precision_checkpoint_is_loaded_as_fp32(tmp_path, small_state):
    path = _save({k: v.half() for k, v in small_state.items()}, tmp_path / "half.safetensors")
    model = load_unet(path, **SMALL_UNET)
    assert model.in_conv.weight.dtype == torch.float32
    torch.testing.assert_close(model.in_conv.weight, small_state["in_conv.weight"], rtol=1e-3, atol=1e-3)


def test_missing_and_unexpected_keys_are_listed_with_counts(tmp_path, small_state):
    state = dict(small_state)
    dropped = sorted(state)[:7]
    for key in dropped:
        del state[key]
    state["extra.weight"] = torch.zeros(3)
    path = _save(state, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_unet(path, **SMALL_UNET)
    message = str(info.value)
    assert "missing:" in message and "(7 in all)" in message and dropped[0] in message
    assert "unexpected: extra.weight (1)" in message


def test_wrong_shapes_are_listed(tmp_path, small_state):
    state = dict(small_state)
    state["out_conv.weight"] = torch.zeros(32, 16, 1, 1)
    path = _save(state, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=r"wrong shape.*out_conv.weight \(32, 16, 1, 1\) != \(32, 32, 1, 1\)"):
        load_unet(path, **SMALL_UNET)


def test_full_size_config_refuses_a_small_checkpoint(tmp_path, small_state):
    path = _save(small_state, tmp_path / "small.safetensors")
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_unet(path)


def test_header_length_starting_with_0x80_loads(tmp_path, small_state):
    path = _save_with_header_length_byte(small_state, tmp_path / "flow_upscaler.safetensors")
    assert (tmp_path / "flow_upscaler.safetensors").read_bytes()[:1] == b"\x80"
    loaded = load_unet(path, **SMALL_UNET).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in small_state.items())


def test_header_length_starting_with_0x80_reaches_the_key_check(tmp_path, small_state):
    state = dict(small_state, **{"extra.weight": torch.zeros(3)})
    path = _save_with_header_length_byte(state, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected: extra.weight \(1\)"):
        load_unet(path, **SMALL_UNET)


def test_truncated_file_starting_with_0x80_is_reported_as_truncated_not_pickled(tmp_path, small_state):
    path = tmp_path / "truncated.safetensors"
    _save_with_header_length_byte(small_state, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        read_safetensors(path)
    assert str(path) in str(info.value) and "pickle" not in str(info.value)


def test_truncated_file_is_refused(tmp_path, small_state):
    path = tmp_path / "truncated.safetensors"
    _save(small_state, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_unet(str(path), **SMALL_UNET)


class _Exploit:
    """Unpickling this would create a file: proof that a pickle was (not) loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["pickle", "torch.save", "torch.save legacy"])
def test_pickle_files_are_refused_without_unpickling(tmp_path, writer):
    marker = tmp_path / "unpickled"
    path = tmp_path / "flow_upscaler.ckpt"
    payload = {"in_conv.weight": _Exploit(marker)}
    with open(path, "wb") as handle:
        if writer == "pickle":
            pickle.dump(payload, handle)
        else:
            torch.save(payload, handle, _use_new_zipfile_serialization=writer == "torch.save")
    with pytest.raises(CheckpointError, match="pickled PyTorch checkpoint") as info:
        read_safetensors(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_real_torch_save_state_dict_is_refused(tmp_path, small_state):
    path = tmp_path / "flow_upscaler.pt"
    torch.save(small_state, path)
    with pytest.raises(CheckpointError, match="pickled PyTorch checkpoint.*safetensors.torch.save_file") as info:
        load_unet(str(path), **SMALL_UNET)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "content",
    [b"", b"\x80\x01", b"not a checkpoint", struct.pack("<Q", 3) + b"[1]" + bytes(64), "header cut"],
    ids=["empty", "short", "text", "json-array-header", "header-cut"],
)
def test_other_and_broken_files_are_refused_naming_the_file(tmp_path, small_state, content):
    path = tmp_path / "weights.safetensors"
    if content == "header cut":  # a safetensors file cut inside its header
        _save(small_state, path)
        content = path.read_bytes()[:100]
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a safetensors file") as info:
        read_safetensors(path)
    assert str(path) in str(info.value)


@pytest.mark.skipif(not SHARED_KEYS_JSON.is_file(), reason="no ../shared beside the checkout")
def test_in_repo_published_keys_equal_the_shared_copy():
    assert KEYS_JSON.read_bytes() == SHARED_KEYS_JSON.read_bytes(), (
        f"{KEYS_JSON} differs from {SHARED_KEYS_JSON}: copy it again and update tests/data/README.md"
    )


def test_missing_local_file_says_how_to_proceed(tmp_path):
    with pytest.raises(CheckpointError, match="--random-weights"):
        load_unet(str(tmp_path / "nowhere.safetensors"))


def test_offline_hub_id_not_in_cache_says_how_to_proceed():
    with pytest.raises(CheckpointError, match="not in the local cache.*--checkpoint PATH.*--random-weights"):
        load_unet("flow-upscaler-tests/not-cached", offline=True)


def test_random_weights_are_deterministic_and_leave_global_rng_alone(small_state):
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = load_unet(random_weights=True, seed=5, **SMALL_UNET).state_dict()
    assert torch.equal(torch.random.get_rng_state(), before)
    b = load_unet(random_weights=True, seed=5, **SMALL_UNET).state_dict()
    c = load_unet(random_weights=True, seed=6, **SMALL_UNET).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["in_conv.weight"], c["in_conv.weight"])


def test_vae_loads_from_a_local_diffusers_folder(tmp_path, small_vae):
    small_vae.save_pretrained(tmp_path / "pipeline" / "vae")
    for source in (tmp_path / "pipeline", tmp_path / "pipeline" / "vae"):
        vae = load_vae(source)
        assert torch.equal(vae.bn.running_mean, small_vae.bn.running_mean)
        assert tuple(vae.config.block_out_channels) == SMALL_VAE["block_out_channels"]


def test_vae_folder_without_config_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="neither a diffusers VAE"):
        load_vae(tmp_path)


def test_vae_offline_hub_id_says_how_to_proceed():
    with pytest.raises(CheckpointError, match="--random-weights"):
        load_vae("flow-upscaler-tests/not-cached", offline=True)

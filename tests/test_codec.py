"""Codecs: exact round trip for SpaceToDepth; a tiny Wan2.2-layout VAE saved, reloaded (local
folder and s3:// prefix), with the latent normalisation applied inside."""

import pytest
import torch

from loomcore.models.codec import SpaceToDepth, WanVAE, latent_shape, load_codec


@pytest.fixture(scope="module")
def tiny_wan_vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(  # the Wan2.2 TI2V layout at toy width: patch 2, 16× spatial, 4× temporal, 48 ch
        base_dim=8, decoder_base_dim=8, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
        patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
        latents_mean=torch.linspace(-1, 1, 48).tolist(), latents_std=torch.linspace(0.5, 3, 48).tolist(),
    )
    path = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(path)
    return path


def test_space_to_depth_is_lossless():
    codec = SpaceToDepth(4)
    x = torch.rand(2, 3, 5, 32, 24) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (2, 48, 5, 8, 6) == (2, *latent_shape(codec, 5, 32, 24))
    assert torch.equal(codec.decode(z), x)
    # a latent channel is one pixel offset of one colour: channel (c, dy, dx)
    assert torch.equal(z[:, 0 * 16 + 1 * 4 + 2, :, 0, 0], x[:, 0, :, 1, 2])


def test_space_to_depth_saves_and_loads(tmp_path):
    SpaceToDepth(2).save_pretrained(tmp_path / "codec")
    codec = load_codec("space_to_depth", tmp_path / "codec")
    assert codec.factor == 2 and codec.latent_channels == 12


def test_wan_vae_round_trip_and_normalisation(tiny_wan_vae_dir):
    from diffusers import AutoencoderKLWan

    codec = load_codec("wan", tiny_wan_vae_dir)
    assert (codec.spatial_factor, codec.temporal_factor, codec.latent_channels) == (16, 4, 48)
    x = torch.rand(1, 3, 5, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        z = codec.encode(x)
        assert z.shape == (1, 48, 2, 2, 3) == (1, *latent_shape(codec, 5, 32, 48))
        raw = AutoencoderKLWan.from_pretrained(tiny_wan_vae_dir).encode(x).latent_dist.mode()
        mean = torch.linspace(-1, 1, 48).view(1, -1, 1, 1, 1)
        std = torch.linspace(0.5, 3, 48).view(1, -1, 1, 1, 1)
        assert torch.allclose(z, (raw - mean) / std, atol=1e-6)
        y = codec.decode(z)
        assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
        # decoding un-normalises: same as the raw VAE on the raw latent
        y_raw = AutoencoderKLWan.from_pretrained(tiny_wan_vae_dir).decode(raw).sample.clamp(-1, 1)
        assert torch.allclose(y, y_raw, atol=1e-5)


def test_wan_vae_loads_from_s3(tiny_wan_vae_dir, s3_bucket, tmp_path, monkeypatch):
    from loomcore.storage import upload_dir

    monkeypatch.setenv("LOOM_CACHE_DIR", str(tmp_path / "cache"))
    assert upload_dir(tiny_wan_vae_dir, f"s3://{s3_bucket}/models/vae") == 2
    codec = load_codec("wan", f"s3://{s3_bucket}/models/vae")
    local = WanVAE.from_pretrained(tiny_wan_vae_dir)
    x = torch.rand(1, 3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(codec.encode(x), local.encode(x))
    assert (tmp_path / "cache" / "s3" / s3_bucket / "models" / "vae" / "config.json").is_file()


@pytest.mark.parametrize(
    "shape, needle",
    [
        ((1, 4, 5, 32, 32), "expected 3 channels"),
        ((1, 3, 6, 32, 32), "6 frames; this codec takes 1 + 4·k frames (e.g. 5 or 9)"),
        ((1, 3, 5, 40, 32), "must be divisible by the codec's spatial factor 16"),
        ((3, 5, 32, 32), "expected a tensor [B, 3, F, H, W]"),
    ],
)
def test_wan_vae_refuses_bad_video(tiny_wan_vae_dir, shape, needle):
    codec = load_codec("wan", tiny_wan_vae_dir)
    with pytest.raises(ValueError) as e:
        codec.encode(torch.zeros(shape))
    assert needle in str(e.value)


def test_bad_latent_and_kind():
    with pytest.raises(ValueError, match=r"latent: expected \[B, 48, f, h, w\]"):
        SpaceToDepth(4).decode(torch.zeros(1, 12, 1, 2, 2))
    with pytest.raises(ValueError, match="codec kind 'vqgan'"):
        load_codec("vqgan", "x")
    with pytest.raises(ValueError, match="expected 3 channels"):
        SpaceToDepth(4).encode(torch.zeros(1, 1, 1, 8, 8))

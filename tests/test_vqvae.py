"""The JAX mask decoder against the same network built natively in torch.nn."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from postprocess.parse import Text, format_object, join_objects, parse
from postprocess.vqvae import (
    CODEBOOK_KEY,
    MaskDecoder,
    decode_codes,
    init_decoder_params,
    load_vqvae_params,
    mask_to_image,
    params_to_published,
    published_shapes,
)

EMBEDDING_DIM = 64  # the release uses 512; smaller keeps the test fast, the layout is the same


class _TorchResBlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 1),
        )  # fmt: skip

    def forward(self, x):
        return x + self.net(x)


def _torch_decoder(embedding_dim):
    """The published decoder as a torch.nn.Sequential: its state_dict keys are the checkpoint's."""
    return nn.Sequential(
        nn.Conv2d(embedding_dim, 128, 1), nn.ReLU(),
        _TorchResBlock(128), _TorchResBlock(128),
        nn.ConvTranspose2d(128, 128, 4, stride=2, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(128, 64, 4, stride=2, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 1, 1),
    )  # fmt: skip


@pytest.fixture(scope="module")
def torch_checkpoint():
    torch.manual_seed(0)
    decoder = _torch_decoder(EMBEDDING_DIM)
    for layer in decoder.modules():  # He-scaled weights keep outputs O(1), unlike torch's default init
        if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(layer.weight)
            nn.init.normal_(layer.bias, std=0.1)
    codebook = torch.randn(128, EMBEDDING_DIM)
    checkpoint = {f"decoder.{key}": value.numpy() for key, value in decoder.state_dict().items()}
    checkpoint[CODEBOOK_KEY] = codebook.numpy()
    checkpoint["encoder.0.weight"] = np.zeros((1, 1, 1, 1), np.float32)  # the release also holds an encoder
    return decoder, codebook, checkpoint


def _torch_decode(decoder, codebook, codes):
    grid = codebook[torch.as_tensor(codes, dtype=torch.long)].reshape(len(codes), 4, 4, -1)  # [B, 4, 4, D]
    with torch.no_grad():
        return decoder(grid.permute(0, 3, 1, 2))[:, 0].numpy()  # NCHW → [B, 64, 64]


def test_checkpoint_layout_matches_published_key_names(torch_checkpoint):
    _, _, checkpoint = torch_checkpoint
    expected = published_shapes(128, EMBEDDING_DIM)
    assert {key: checkpoint[key].shape for key in expected} == expected
    assert published_shapes()[CODEBOOK_KEY] == (128, 512)
    assert published_shapes()["decoder.0.weight"] == (128, 512, 1, 1)
    assert published_shapes()["decoder.10.weight"] == (32, 16, 4, 4)


def test_decoder_matches_torch(torch_checkpoint, tmp_path):
    decoder, codebook, checkpoint = torch_checkpoint
    path = tmp_path / "vae-oid.npz"
    np.savez(path, **checkpoint)
    codes = np.random.default_rng(0).integers(0, 128, size=(5, 16))

    expected = _torch_decode(decoder, codebook, codes)
    ours = np.asarray(decode_codes(MaskDecoder.load(path).params, jnp.asarray(codes)))

    assert ours.shape == (5, 64, 64)
    assert expected.std() > 0.1  # the comparison below is not against near-zero outputs
    np.testing.assert_array_less(np.abs(ours - expected).max(), 1e-5)


def test_mask_decoder_batches_and_clips_to_unit_range(torch_checkpoint):
    decoder, codebook, checkpoint = torch_checkpoint
    mask_decoder = MaskDecoder(load_vqvae_params(checkpoint))
    codes = np.random.default_rng(1).integers(0, 128, size=(3, 16))

    masks = mask_decoder(codes)
    raw = _torch_decode(decoder, codebook, codes)

    assert masks.shape == (3, 64, 64) and masks.dtype == np.float32
    assert masks.min() >= -1.0 and masks.max() <= 1.0
    assert np.abs(raw).max() > 1.0  # so clipping was needed, and happened
    np.testing.assert_allclose(masks, np.clip(raw, -1, 1), atol=1e-5)
    np.testing.assert_allclose(mask_decoder(codes[1:2])[0], masks[1], atol=1e-5)  # batch-size independent
    assert mask_decoder(np.zeros((0, 16), np.int64)).shape == (0, 64, 64)


@pytest.mark.parametrize(
    "codes", [np.zeros((2, 15), np.int64), np.full((1, 16), 128), np.full((1, 16), -1), np.zeros((16,), np.int64)]
)
def test_mask_decoder_rejects_bad_codes(torch_checkpoint, codes):
    mask_decoder = MaskDecoder(load_vqvae_params(torch_checkpoint[2]))
    with pytest.raises(ValueError, match="codes"):
        mask_decoder(codes)


def test_load_rejects_other_layouts(torch_checkpoint, tmp_path):
    checkpoint = dict(torch_checkpoint[2])
    del checkpoint["decoder.12.bias"]
    with pytest.raises(ValueError, match=r"decoder\.12\.bias: missing"):
        load_vqvae_params(checkpoint)
    checkpoint = dict(torch_checkpoint[2], **{"decoder.4.weight": np.zeros((128, 128, 3, 3), np.float32)})
    with pytest.raises(ValueError, match=r"decoder\.4\.weight"):
        load_vqvae_params(checkpoint)
    with pytest.raises(ValueError, match="cannot read"):
        MaskDecoder.load(tmp_path / "absent.npz")


def test_published_round_trip_and_trainable_init(tmp_path):
    params = init_decoder_params(jax.random.key(0), embedding_dim=EMBEDDING_DIM)
    path = tmp_path / "trained.npz"
    np.savez(path, **params_to_published(params))
    reloaded = MaskDecoder.load(path).params

    assert jax.tree.structure(reloaded) == jax.tree.structure(params)
    for ours, theirs in zip(jax.tree.leaves(params), jax.tree.leaves(reloaded)):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))

    codes = jnp.asarray(np.random.default_rng(2).integers(0, 128, size=(2, 16)))
    out = decode_codes(params, codes)
    assert 0.05 < np.asarray(out).std() < 20  # the init gives usable, not vanishing or exploding, outputs

    target = jnp.where(jnp.arange(64)[:, None] < 32, 1.0, -1.0) * jnp.ones((2, 64, 64))
    grads = jax.jit(jax.grad(lambda p: jnp.mean((decode_codes(p, codes) - target) ** 2)))(params)
    grad_norms = [np.abs(np.asarray(g)).sum() for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(grad_norms)) and all(norm > 0 for norm in grad_norms)


def test_params_to_published_is_torch_loadable(torch_checkpoint):
    decoder, codebook, checkpoint = torch_checkpoint
    published = params_to_published(load_vqvae_params(checkpoint))
    fresh = _torch_decoder(EMBEDDING_DIM)
    fresh.load_state_dict(
        {key.removeprefix("decoder."): torch.tensor(v) for key, v in published.items() if key != CODEBOOK_KEY}
    )
    codes = np.random.default_rng(3).integers(0, 128, size=(2, 16))
    np.testing.assert_array_equal(_torch_decode(fresh, codebook, codes), _torch_decode(decoder, codebook, codes))


def test_mask_to_image_places_the_mask_in_its_box():
    mask64 = np.full((64, 64), -1.0, np.float32)
    mask64[:, :32] = 1.0  # left half inside

    full = mask_to_image(mask64, (10, 20, 50, 40), width=80, height=60)

    assert full.shape == (60, 80) and full.dtype == bool
    assert not full[:20].any() and not full[40:].any() and not full[:, :10].any() and not full[:, 50:].any()
    assert full[20:40, 10:29].all() and not full[20:40, 31:50].any()  # the left half of the 40-px-wide box
    assert mask_to_image(mask64, (10, 20, 50, 40), 80, 60, threshold=1.5).sum() == 0  # the threshold is applied


def test_mask_to_image_rejects_bad_boxes():
    with pytest.raises(ValueError, match="box"):
        mask_to_image(np.zeros((64, 64)), (10, 10, 10, 20), 30, 30)
    with pytest.raises(ValueError, match="box"):
        mask_to_image(np.zeros((64, 64)), (0, 0, 31, 20), 30, 30)


def test_attach_masks_decodes_each_segmented_object_into_its_box(torch_checkpoint):
    decoder, codebook, checkpoint = torch_checkpoint
    mask_decoder = MaskDecoder(load_vqvae_params(checkpoint))
    codes = np.random.default_rng(4).integers(0, 128, size=(2, 16))
    text = join_objects(
        [
            format_object("a", (10, 10, 60, 40), 80, 60, seg_codes=codes[0]),
            format_object("b", (0, 0, 20, 20), 80, 60),
            format_object("c", (30, 5, 80, 60), 80, 60, seg_codes=codes[1]),
        ]
    )
    pieces = [Text("found: "), *parse(text, 80, 60)]

    attached = mask_decoder.attach_masks(pieces, 80, 60, threshold=0.0)

    assert attached[0] == pieces[0] and attached[2].mask is None
    for piece, expected in zip((attached[1], attached[3]), np.clip(_torch_decode(decoder, codebook, codes), -1, 1)):
        x1, y1, x2, y2 = piece.box
        assert piece.mask.shape == (60, 80) and piece.mask[y1:y2, x1:x2].any()
        assert piece.mask.sum() == piece.mask[y1:y2, x1:x2].sum()  # nothing outside the box
        np.testing.assert_array_equal(piece.mask, mask_to_image(expected, piece.box, 80, 60))

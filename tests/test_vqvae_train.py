"""The mask VQ-VAE: crops, encoder shapes, straight-through decoding, training, files."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from postprocess.vqvae import MaskDecoder, decode_codes, init_decoder_params, mask_to_image
from scenes import generate, vqvae_train

SHIPPED = Path(__file__).resolve().parent.parent / "assets" / "demo"
MASKS = vqvae_train.object_masks(num_scenes=8, seed=0)


@pytest.fixture(scope="module")
def random_vqvae():
    encoder = vqvae_train.init_encoder_params(np.random.default_rng(0))
    return {"encoder": encoder, "decoder": init_decoder_params(jax.random.key(0))}


def test_mask_crops_are_64x64_in_range_and_shaped_like_the_object():
    box = (30, 40, 100, 110)
    square = vqvae_train.mask_crop64(generate.shape_mask("square", box), box)
    circle = vqvae_train.mask_crop64(generate.shape_mask("circle", box), box)
    assert square.shape == circle.shape == (64, 64)
    assert (square == 1.0).all()
    assert circle[32, 32] == 1.0 and circle[0, 0] == -1.0 and circle.min() >= -1.0
    assert MASKS.shape[1:] == (64, 64) and len(MASKS) >= 8


def test_mask_to_image_undoes_the_crop():
    box = (17, 60, 117, 130)  # a wide triangle
    mask = generate.shape_mask("triangle", box)
    placed = mask_to_image(vqvae_train.mask_crop64(mask, box), box, 224, 224)
    assert (placed & mask).sum() / (placed | mask).sum() > 0.97


def test_encoder_gives_16_codes_per_mask(random_vqvae):
    latents = vqvae_train.encode(random_vqvae["encoder"], MASKS[:5])
    assert latents.shape == (5, 16, vqvae_train.EMBEDDING_DIM)
    codes = vqvae_train.encode_masks(random_vqvae, MASKS[:5])
    assert codes.shape == (5, 16) and jnp.issubdtype(codes.dtype, jnp.integer)
    assert int(codes.min()) >= 0 and int(codes.max()) < 128


def test_quantise_picks_the_nearest_codebook_row():
    codebook = jnp.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    latents = jnp.array([[[9.0, 1.0], [1.0, 1.0], [-1.0, 8.0]]])
    assert vqvae_train.quantise(latents, codebook).tolist() == [[1, 0, 2]]


def test_decoding_latents_equals_decoding_their_codes(random_vqvae):
    decoder = random_vqvae["decoder"]
    codes = jnp.array(np.random.default_rng(0).integers(0, 128, (2, 16)))
    from_latents = vqvae_train.decode_latents(decoder, decoder["codebook"][codes])
    assert from_latents.shape == (2, 64, 64)
    np.testing.assert_allclose(from_latents, decode_codes(decoder, codes), rtol=1e-5, atol=1e-5)


def test_mask_iou_on_hand_made_masks():
    a = -np.ones((2, 64, 64))
    b = a.copy()
    a[0, :32], b[0, 16:48] = 1, 1  # halves overlapping on a quarter: IoU 16/48
    assert vqvae_train.mask_iou(a, b) == pytest.approx((16 / 48 + 1.0) / 2)  # both empty → 1


@pytest.mark.slow
def test_a_few_training_steps_lower_the_loss():
    params, losses = vqvae_train.train(MASKS, steps=12, seed=0, batch_size=2)
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3])
    assert set(params) == {"encoder", "decoder"}


def test_bad_training_arguments_are_refused():
    with pytest.raises(ValueError, match="steps"):
        vqvae_train.train(MASKS, steps=0, seed=0)


def test_saved_files_load_back_and_decode_alike(random_vqvae, tmp_path):
    vqvae_train.save_vqvae(random_vqvae, tmp_path / "decoder", tmp_path / "encoder")
    assert sorted(p.name for p in tmp_path.rglob("*.npz")) == [vqvae_train.DECODER_FILE, vqvae_train.ENCODER_FILE]
    assert (tmp_path / "encoder" / vqvae_train.ENCODER_FILE).is_file()
    loaded = vqvae_train.load_vqvae(tmp_path / "decoder", tmp_path / "encoder")
    codes = vqvae_train.encode_masks(random_vqvae, MASKS[:4])
    np.testing.assert_array_equal(vqvae_train.encode_masks(loaded, MASKS[:4]), codes)
    expected = np.clip(decode_codes(random_vqvae["decoder"], codes), -1, 1)
    published = MaskDecoder.load(tmp_path / "decoder" / vqvae_train.DECODER_FILE)
    np.testing.assert_allclose(published(np.asarray(codes)), expected, rtol=1e-5, atol=1e-5)


def test_loading_a_folder_without_the_encoder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="encoder"):
        vqvae_train.load_vqvae(SHIPPED, tmp_path)


def test_the_encoder_stays_with_the_training_code_and_only_the_decoder_ships():
    assert (Path(vqvae_train.ENCODER_DIR) / vqvae_train.ENCODER_FILE).is_file()
    assert Path(vqvae_train.ENCODER_DIR).parent == Path(vqvae_train.__file__).parent
    assert (SHIPPED / vqvae_train.DECODER_FILE).is_file()
    assert not (SHIPPED / vqvae_train.ENCODER_FILE).exists()


@pytest.mark.slow
def test_shipped_vqvae_reconstructs_held_out_shapes():
    shipped = vqvae_train.load_vqvae(SHIPPED)  # the decoder the app uses + the training encoder in scenes/
    held_out = vqvae_train.object_masks(num_scenes=40, seed=12345)
    assert vqvae_train.reconstruction_iou(shipped, held_out) >= 0.9

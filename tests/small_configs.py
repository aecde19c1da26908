"""The tiny Gemma 2-style decoder several tests build models on (soft caps, grouped kv heads, post-norms)."""

from paligemma.config import TextConfig


def tiny_gemma2_text(vocab_size: int, **changes) -> TextConfig:
    """64 wide, 2 layers, 4 query heads over 2 kv heads of 16; `changes` replace any field."""
    fields = dict(
        width=64,
        depth=2,
        mlp_dim=96,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        query_scale=16**-0.5,
        attn_softcap=50.0,
        final_softcap=30.0,
        post_norms=True,
    )
    return TextConfig(vocab_size=vocab_size, **{**fields, **changes})

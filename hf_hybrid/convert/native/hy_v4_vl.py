"""``hy_v4_vl_text`` ↔ hf_hybrid: the text decoder of HY-V4-VL (the vision-language checkpoint ``hy_v4_vl``,
``HYV4VLForConditionalGeneration``; transformers has ``HYV4VLTextModel`` but no causal-LM class for it).

The decoder is HY-V4's (``hy_v4.py``: DSA on MLA with full and shared indexers, output gate, attention sinks,
clamped-SwiGLU MoE, iHC streams) with the same weights under ``model.language_model.*``. What it computes
differently (read from transformers' ``modular_hy_v4_vl.py``, 5.24 and 5.25):

- **M-RoPE** (Qwen3-VL's interleaved sections, ``rope_parameters["mrope_section"]``): frequency ``i`` takes
  its position from the temporal, height or width stream. Text tokens have the three streams equal (the model
  builds them so from ``arange`` / 2-D ``position_ids``), and then every section choice is plain RoPE: the
  import drops ``mrope_section``; the export writes ``[n - 2⌊n/3⌋, ⌊n/3⌋, ⌊n/3⌋]`` with ``n =
  qk_rope_head_dim / 2`` (transformers' default ``[12, 10, 10]`` at 64 rope dims), which only image and video
  positions would read.
- **RoPE on interleaved pairs in both releases** (5.24: GLM-style ``rotate_half`` on pairs; 5.25:
  ``apply_rotary_pos_emb_interleave``), the checkpoint's layout as for ``hy_v4``: the rope rows of
  ``q_b_proj``, ``kv_a_proj_with_mqa`` and the indexer are de-interleaved (``hy_v4.DSA_RULES``). One
  checkpoint, one function, whichever release is installed.
- the latent norms (``q_a_layernorm``, ``kv_a_layernorm``) use ``rms_norm_eps`` (HY-V4: a fixed 1e-6) →
  ``mla_norm_eps=None``. So ``--to hy_v4`` of an import is exact only where ``rms_norm_eps`` is 1e-6 (it
  refuses naming ``mla_norm_eps`` otherwise; transformers' default is 1e-5), and ``--to hy_v4_vl_text``
  writes the wrapper.

Tied embeddings: the wrapper's ``tie_word_embeddings`` decides (its text config's is not read by
transformers); the import uses the wrapper's (``native/__init__.py``), the export writes ours on both.

Import reads the text decoder and ``lm_head`` and drops ``model.vision_tower.*`` (one printed line). Export
writes ``HYV4VLForConditionalGeneration`` with a **placeholder** vision tower (one layer, zero weights; the
export's card and a printed line say so): the text function is exact, images are not understood.

Positions: a bare forward of a left-padded batch numbers positions with ``arange`` there and counts real
tokens here; RoPE depends only on position differences, so the logits agree either way.
"""

from __future__ import annotations

import dataclasses

from .base import Custom, VisionWrapperFamily, W, ours_fixed
from .hy_v4 import DSA_RULES, HY_V4

_LM = "model.language_model."


def _under_language_model(rules) -> tuple[W, ...]:
    """HY-V4's model-wide rules with the decoder's ``model.`` moved under ``model.language_model.``."""
    return tuple(
        dataclasses.replace(r, native=_LM + r.native.removeprefix("model."))
        if isinstance(r.native, str) and r.native.startswith("model.")
        else r
        for r in rules
    )


def mrope_section(qk_rope_head_dim: int) -> list[int]:
    """The sections the export writes: three summing to ``qk_rope_head_dim // 2`` (what the config class
    requires), transformers' default at 64 rope dims. Text positions give every choice the same function."""
    n = qk_rope_head_dim // 2
    return [n - 2 * (n // 3), n // 3, n // 3]


def _rope_to_ours(native) -> dict:
    rope = {k: v for k, v in (native.rope_parameters or {}).items() if k != "mrope_section"}
    return {"rope_parameters": rope}


def _rope_to_native(ours) -> dict:
    rope = dict(ours.rope_parameters or {})
    return {"rope_parameters": {**rope, "mrope_section": mrope_section(ours.qk_rope_head_dim)}}


class HYV4VLFamily(VisionWrapperFamily):
    """The text decoder lives in ``HYV4VLForConditionalGeneration``."""

    def model_config(self, text_config):
        """The wrapper config around ``text_config``, with the smallest vision tower (placeholder) whose
        output width is the decoder's."""
        from transformers import HYV4VLConfig

        vision = dict(
            hidden_size=8,
            intermediate_size=8,
            num_hidden_layers=1,
            num_attention_heads=1,
            out_hidden_size=text_config.hidden_size,
            patch_size=14,
            max_image_size=28,
            spatial_merge_size=2,
        )
        return HYV4VLConfig(
            text_config=text_config.to_dict(),
            vision_config=vision,
            tie_word_embeddings=text_config.tie_word_embeddings,  # the wrapper's flag is the one read
        )


HY_V4_VL_TEXT = HYV4VLFamily(
    model_type="hy_v4_vl_text",
    wrapper_class="HYV4VLForConditionalGeneration",
    placeholder_weights=r"model\.vision_tower\.",
    # HY-V4's rules, then what the VL decoder changes (a later rule's fields replace an earlier one's, both
    # ways)
    config_rules=[
        *HY_V4.config_rules,
        Custom(("rope_parameters",), _rope_to_ours, _rope_to_native),
        *ours_fixed(mla_norm_eps=None),  # the latent norms use rms_norm_eps
    ],
    ignored_options=HY_V4.ignored_options,
    model_rules=_under_language_model(HY_V4.model_rules),
    layer_rules=HY_V4.layer_rules,
    mixer_rules={"dsa": DSA_RULES},
    mlp_rules=HY_V4.mlp_rules,
    ignored_native_keys=(r"^model\.vision_tower\.", r"(^|\.)rotary_emb\."),
    native_layer_prefix=_LM + "layers.{i}.",
    check_ours=HY_V4.check_ours,
    tiny_config=dict(
        HY_V4.tiny_config,
        rms_norm_eps=1e-5,  # ≠ HY-V4's fixed latent eps 1e-6: the tests see the difference matter
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
    ),
    exactness=HY_V4.exactness,
    min_transformers="5.24",
    wrapper_note="model.vision_tower.* (the vision tower)",
)

FAMILIES = {HY_V4_VL_TEXT.model_type: HY_V4_VL_TEXT}

__all__ = ["FAMILIES", "HYV4VLFamily", "mrope_section"]

"""The supported model families: `--model_name` -> the module whose ModelSpec registers that name.

Light on purpose (no torch / diffusers imports): ptrain.config takes the `--model_name` choices from here, and
ptrain.models.spec.get_spec imports the module named here.
"""

from __future__ import annotations

#: --model_name -> module defining its ModelSpec (the first is the default).
MODELS = {
    "ltx_video": "ptrain.models.ltx_video",
    "cogvideox": "ptrain.models.cogvideox",
    "hunyuan_video": "ptrain.models.hunyuan_video",
    "wan": "ptrain.models.wan",
}

MODEL_NAMES = tuple(MODELS)

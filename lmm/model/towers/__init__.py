"""Vision tower kinds; importing this package registers them in ``lmm.model.vision.VISION_TOWERS``.

The heavy libraries (transformers models, open_clip, timm) are imported only when a tower of
that kind is built.
"""
from lmm.model.towers import hf, open_clip, timm  # noqa: F401

"""Qwen3-VL processor without the (torchvision-only) video processor.

transformers 5.24's ``Qwen3VLProcessor`` type-checks all three sub-processors on construction, and
the video one (``Qwen3VLVideoProcessor``) cannot exist without torchvision. This subclass declares
only image_processor + tokenizer, so ``from_pretrained`` loads exactly those two (plus the chat
template) from the checkpoint and every image/text code path is the parent's own.
"""

from __future__ import annotations

from transformers import Qwen3VLProcessor


class ImageTextQwen3VLProcessor(Qwen3VLProcessor):
    """``Qwen3VLProcessor`` for images and text; passing ``videos=`` raises ValueError."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # The parent forwards (image_processor, tokenizer, video_processor) positionally; ProcessorMixin
        # pairs them with get_attributes() == [image_processor, tokenizer], so the None is never stored.
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                         chat_template=chat_template, **kwargs)
        if getattr(self, "video_processor", None) is not None:  # guard against a transformers change
            raise RuntimeError("ImageTextQwen3VLProcessor unexpectedly holds a video processor")

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None:
            raise ValueError(
                "video input needs Qwen3VLVideoProcessor, which requires torchvision (not installed); "
                "images and text are supported"
            )
        return super().__call__(images=images, text=text, **kwargs)

"""Image input for Llama 4: media loading, prompt expansion, per-request image state and the
encoder-output cache used by the runner."""
from herd.multimodal.chat import extract_chat_images
from herd.multimodal.inputs import (EncoderCache, MultiModalInputs, MultiModalItem, MultiModalSlice,
                                    hash_pixel_values, multimodal_embeddings)
from herd.multimodal.media import MediaConnector, MediaError, decode_image
from herd.multimodal.processing import ImageTokenIds, MultiModalProcessor, image_token_layout

__all__ = ["EncoderCache", "ImageTokenIds", "MediaConnector", "MediaError", "MultiModalInputs",
           "MultiModalItem", "MultiModalProcessor", "MultiModalSlice", "decode_image",
           "extract_chat_images", "hash_pixel_values", "image_token_layout", "multimodal_embeddings"]

"""Maps the class names found in `model_index.json` to implementations.

Two kinds of entries:

* our own models (`_FASTVIDEO_MODELS`): Hugging Face class name -> (folder under
  `fastvideo/models/`, module, class), imported on first use: the DiTs and the text
  encoders (T5, UMT5, CLIP text, Llama), which shard over the tensor parallel group;
* parts we still take from their original library (`_LIBRARY_CLASSES`): tokenizers,
  image processors, the CLIP vision encoder, the VAEs and the schedulers, loaded with
  that library's own `from_pretrained`.

Importing this module imports no model code, no CUDA and no torch.distributed.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

_FASTVIDEO_MODELS: dict[str, tuple[str, str, str]] = {
    "WanTransformer3DModel": ("dits", "wanvideo", "WanTransformer3DModel"),
    "HunyuanVideoTransformer3DModel": ("dits", "hunyuanvideo", "HunyuanVideoTransformer3DModel"),
    "UMT5EncoderModel": ("encoders", "t5", "UMT5EncoderModel"),
    "T5EncoderModel": ("encoders", "t5", "T5EncoderModel"),
    "CLIPTextModel": ("encoders", "clip", "CLIPTextModel"),
    "LlamaModel": ("encoders", "llama", "LlamaModel"),
}

_LIBRARY_CLASSES: dict[str, frozenset[str]] = {
    "transformers": frozenset({
        "T5TokenizerFast", "T5Tokenizer", "AutoTokenizer", "CLIPTokenizer",
        "CLIPVisionModelWithProjection",
        # transformers without torchvision saves its CLIP processor under the Pil name.
        "CLIPImageProcessor", "CLIPImageProcessorPil",
        "LlamaTokenizerFast", "LlamaTokenizer", "CLIPTokenizerFast",
    }),
    "diffusers": frozenset({
        "AutoencoderKLWan", "AutoencoderKLHunyuanVideo", "UniPCMultistepScheduler",
        "FlowMatchEulerDiscreteScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
    }),
}


@dataclass(frozen=True)
class ModelEntry:
    """Where a component class comes from: our code (`library == "fastvideo"`) or a library."""

    class_name: str
    library: str

    def load_class(self) -> type:
        if self.library == "fastvideo":
            folder, module, attr = _FASTVIDEO_MODELS[self.class_name]
            mod = importlib.import_module(f"fastvideo.models.{folder}.{module}")
        else:
            mod = importlib.import_module(self.library)
            attr = self.class_name
        try:
            return getattr(mod, attr)
        except AttributeError:
            raise ValueError(
                f"{mod.__name__} has no class {attr!r} (installed version too old?)") from None


def _known_class_names() -> list[str]:
    names = set(_FASTVIDEO_MODELS)
    for classes in _LIBRARY_CLASSES.values():
        names |= classes
    return sorted(names)


def resolve_model(class_name: str, library: str | None = None) -> ModelEntry:
    """Find the implementation of a `model_index.json` class name.

    Our own implementation wins over the library named in `model_index.json`.
    Raises `ValueError` listing every known class name when there is none.
    """
    if class_name in _FASTVIDEO_MODELS:
        return ModelEntry(class_name, "fastvideo")
    for lib, classes in _LIBRARY_CLASSES.items():
        if class_name in classes and (library is None or library == lib):
            return ModelEntry(class_name, lib)
    raise ValueError(
        f"unknown model class {class_name!r}"
        + (f" (library {library!r})" if library else "")
        + f"; known classes: {', '.join(_known_class_names())}")

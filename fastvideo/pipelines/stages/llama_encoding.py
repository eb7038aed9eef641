"""LlamaEncodingStage: prompts -> a decoder-only LLM's hidden states, inside a template."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.forward_batch import ForwardBatch
from fastvideo.pipelines.stages.base import PipelineStage

PLACEHOLDER = "{}"


@dataclass(frozen=True, kw_only=True)
class PromptTemplate:
    """The chat text a prompt is wrapped in before a decoder-only LLM reads it."""

    template: str
    """Text with one `{}` where the prompt goes."""
    crop_start: int | None = None
    """Tokens dropped from the front of the LLM's output (the template's own, so only the
    prompt's remain); None: the number of tokens the tokenizer makes of the text before
    `{}` (with its BOS token). A pinned value may not exceed that number."""

    def __post_init__(self) -> None:
        if self.template.count(PLACEHOLDER) != 1:
            raise ValueError(f"prompt template must hold exactly one {PLACEHOLDER!r} for the "
                             f"prompt, got {self.template.count(PLACEHOLDER)}")
        if self.crop_start is not None and self.crop_start < 0:
            raise ValueError(f"crop_start must be >= 0, got {self.crop_start}")

    @property
    def prefix(self) -> str:
        return self.template.split(PLACEHOLDER)[0]

    def crop_for(self, tokenizer: Any) -> int:
        """The tokens to crop with this tokenizer; ValueError when a pinned crop would cut
        into the prompt."""
        prefix_tokens = len(tokenizer(self.prefix, add_special_tokens=True).input_ids)
        if self.crop_start is None:
            return prefix_tokens
        if self.crop_start > prefix_tokens:
            raise ValueError(
                f"prompt template crop_start={self.crop_start} exceeds the {prefix_tokens} "
                "tokens the tokenizer makes of the template before '{}', so it would crop "
                "the prompt's own tokens; use crop_start=None to count them")
        return self.crop_start


class LlamaEncodingStage(PipelineStage):
    """Encodes prompts as diffusers' HunyuanVideo `_get_llama_prompt_embeds` does.

    Each prompt is formatted into the template and tokenized, padded to
    `max_sequence_length` plus the template's crop; the encoder's hidden state
    `hidden_layers_to_skip` layers before the last (not the final, normed output) is kept,
    and the template's tokens are cropped from it and from the attention mask. The mask
    goes to the DiT, which ignores the padding. Embeddings already on the batch are kept.
    """

    reads = ("prompt",)
    writes = ("prompt_embeds", "prompt_attention_mask")

    def __init__(self, text_encoder: Any, tokenizer: Any, template: PromptTemplate,
                 hidden_layers_to_skip: int) -> None:
        if hidden_layers_to_skip < 0:
            raise ValueError(f"hidden_layers_to_skip must be >= 0, got {hidden_layers_to_skip}")
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.template = template
        self.hidden_layers_to_skip = hidden_layers_to_skip

    def forward(self, batch: ForwardBatch, fastvideo_args: FastVideoArgs) -> ForwardBatch:
        if batch.prompt_embeds is None:
            batch.prompt_embeds, batch.prompt_attention_mask = self.encode(
                batch.prompt, batch.max_sequence_length)
        if batch.do_classifier_free_guidance and batch.negative_prompt_embeds is None:
            negative = batch.negative_prompt or [""] * batch.batch_size
            batch.negative_prompt_embeds, batch.negative_prompt_attention_mask = self.encode(
                negative, batch.max_sequence_length)
        return batch

    @torch.no_grad()
    def encode(self, prompts: list[str], max_sequence_length: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """`[B, max_sequence_length, D]` embeddings (the encoder's dtype) and their mask."""
        crop = self.template.crop_for(self.tokenizer)
        tokens = self.tokenizer(
            [self.template.template.format(p) for p in prompts], padding="max_length",
            max_length=max_sequence_length + crop, truncation=True, return_tensors="pt",
            return_attention_mask=True)
        device = next(self.text_encoder.parameters()).device
        mask = tokens.attention_mask.to(device)
        outputs = self.text_encoder(input_ids=tokens.input_ids.to(device), attention_mask=mask,
                                    output_hidden_states=True)
        num_states = len(outputs.hidden_states)
        if self.hidden_layers_to_skip >= num_states:
            raise ValueError(f"hidden_layers_to_skip={self.hidden_layers_to_skip} needs more "
                             f"than the encoder's {num_states} hidden states")
        hidden = outputs.hidden_states[-(self.hidden_layers_to_skip + 1)]
        return hidden[:, crop:], mask[:, crop:]

"""T5EncodingStage: prompt (and, under guidance, negative prompt) -> UMT5 embeddings."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.forward_batch import ForwardBatch
from fastvideo.pipelines.stages.base import PipelineStage


class T5EncodingStage(PipelineStage):
    """Encodes prompts with a T5-family encoder.

    Each prompt's embedding is cut to its true token count and zero-padded back to
    `max_sequence_length`: the padded rows take part in cross-attention, so this must
    match the reference exactly. Embeddings already on the batch are kept (a bulk run
    encodes its shared negative prompt once).
    """

    reads = ("prompt",)
    writes = ("prompt_embeds",)

    def __init__(self, text_encoder: Any, tokenizer: Any,
                 clean: Callable[[str], str] = str.strip) -> None:
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.clean = clean
        """The family's prompt cleaning, applied before tokenizing."""

    def forward(self, batch: ForwardBatch, fastvideo_args: FastVideoArgs) -> ForwardBatch:
        if batch.prompt_embeds is None:
            batch.prompt_embeds = self.encode(batch.prompt, batch.max_sequence_length, fastvideo_args)
        if batch.do_classifier_free_guidance and batch.negative_prompt_embeds is None:
            negative = batch.negative_prompt or [""] * batch.batch_size
            batch.negative_prompt_embeds = self.encode(negative, batch.max_sequence_length,
                                                       fastvideo_args)
        return batch

    @torch.no_grad()
    def encode(self, prompts: list[str], max_sequence_length: int,
               fastvideo_args: FastVideoArgs) -> torch.Tensor:
        tokens = self.tokenizer(
            [self.clean(p) for p in prompts], padding="max_length",
            max_length=max_sequence_length, truncation=True, add_special_tokens=True,
            return_attention_mask=True, return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        mask = tokens.attention_mask.to(device)
        hidden = self.text_encoder(tokens.input_ids.to(device), mask).last_hidden_state
        lengths = mask.gt(0).sum(dim=1)
        # Zero every position past each prompt's length (same as trim + zero-pad).
        keep = torch.arange(hidden.shape[1], device=device)[None, :] < lengths[:, None]
        hidden = hidden.masked_fill(~keep[:, :, None], 0.0)
        return hidden.to(dtype=fastvideo_args.torch_dtype)

"""CLIPTextEncodingStage: prompts -> a CLIP text encoder's pooled embedding."""

from __future__ import annotations

from typing import Any

import torch

from fastvideo.fastvideo_args import FastVideoArgs
from fastvideo.forward_batch import ForwardBatch
from fastvideo.pipelines.stages.base import PipelineStage


class CLIPTextEncodingStage(PipelineStage):
    """One `[D]` vector per prompt (CLIP's `pooler_output`: the EOS token's final state), as
    diffusers' HunyuanVideo `_get_clip_prompt_embeds` computes it: padded to `max_length`
    and encoded without an attention mask (CLIP's causal mask keeps the padding after EOS
    from reaching it). Embeddings already on the batch are kept."""

    reads = ("prompt",)
    writes = ("pooled_prompt_embeds",)

    def __init__(self, text_encoder: Any, tokenizer: Any, max_length: int) -> None:
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.max_length = max_length

    def forward(self, batch: ForwardBatch, fastvideo_args: FastVideoArgs) -> ForwardBatch:
        if batch.pooled_prompt_embeds is None:
            batch.pooled_prompt_embeds = self.encode(batch.prompt)
        if batch.do_classifier_free_guidance and batch.negative_pooled_prompt_embeds is None:
            batch.negative_pooled_prompt_embeds = self.encode(
                batch.negative_prompt or [""] * batch.batch_size)
        return batch

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.max_length,
                                truncation=True, return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        return self.text_encoder(input_ids=tokens.input_ids.to(device),
                                 output_hidden_states=False).pooler_output

"""The text conditioning a Stable Diffusion UNet takes, for the training scripts (SD 1.x / 2.x and SDXL).

SD 1.x / 2.x: one CLIP tokenizer + CLIPTextModel; the UNet takes the encoder's last hidden states
(``encoder_hidden_states``), nothing else.

SDXL (UNets with ``addition_embed_type="text_time"``), as diffusers' StableDiffusionXLPipeline
``encode_prompt`` / ``_get_add_time_ids`` and its SDXL text-to-image training script do it:

- ``encoder_hidden_states``: the penultimate hidden states (``hidden_states[-2]``) of text_encoder
  (CLIPTextModel) and text_encoder_2 (CLIPTextModelWithProjection), concatenated on the feature axis
  (768 + 1280 = 2048 on SDXL base); each tokenizer pads / truncates to its own model_max_length.
  A pipeline without text_encoder (the SDXL refiner) uses text_encoder_2's states alone.
- ``added_cond_kwargs["text_embeds"]``: the pooled, projected output of text_encoder_2 (``text_embeds``,
  its output [0]).
- ``added_cond_kwargs["time_ids"]``: ``original_size + crop_top_left + target_size`` per sample, each
  (height, width) / (top, left), 6 numbers (SDXL's micro-conditioning). The UNet embeds each with
  ``addition_time_embed_dim`` sinusoids and concatenates them to text_embeds, so
  ``projection_class_embeddings_input_dim`` must equal ``6 * addition_time_embed_dim + projection_dim``
  (checked at load, as the pipeline does).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


class ConditioningError(ValueError):
    """The pipeline's text encoders do not fit its UNet."""


def is_sdxl(unet_or_config) -> bool:
    """True for UNets conditioned like SDXL: text states plus pooled text embeddings and time ids."""
    config = getattr(unet_or_config, "config", unet_or_config)
    return config.get("addition_embed_type") == "text_time"


@dataclass
class TextConditioning:
    """Tokenizers and frozen text encoders of a pipeline -> the UNet's text conditioning.

    tokenizers / text_encoders: SD: [tokenizer], [text_encoder]; SDXL: [tokenizer, tokenizer_2],
    [text_encoder, text_encoder_2] (or the second alone). `sdxl` selects the SDXL recipe.
    """

    tokenizers: list
    text_encoders: list
    sdxl: bool = False

    @classmethod
    def from_pretrained(cls, model: str, unet, revision: str | None = None) -> "TextConditioning":
        """The text encoders of the pipeline folder (or hub id) `model` that `unet` needs."""
        from transformers import CLIPTextModel, CLIPTokenizer

        kw = dict(revision=revision)
        if not is_sdxl(unet):
            return cls([CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", **kw)],
                       [CLIPTextModel.from_pretrained(model, subfolder="text_encoder", **kw)])
        from diffusers import DiffusionPipeline
        from transformers import CLIPTextModelWithProjection

        index = DiffusionPipeline.load_config(model, revision=revision)
        tokenizers, encoders = [], []
        if (index.get("text_encoder") or [None])[0] is not None:  # the SDXL refiner has text_encoder_2 only
            tokenizers.append(CLIPTokenizer.from_pretrained(model, subfolder="tokenizer", **kw))
            encoders.append(CLIPTextModel.from_pretrained(model, subfolder="text_encoder", **kw))
        if (index.get("text_encoder_2") or [None])[0] is None:
            raise ConditioningError(f"{model}: the UNet is SDXL-style (addition_embed_type='text_time') but the pipeline "
                                    "has no text_encoder_2 (the CLIPTextModelWithProjection that gives the pooled text embeddings)")
        tokenizers.append(CLIPTokenizer.from_pretrained(model, subfolder="tokenizer_2", **kw))
        encoders.append(CLIPTextModelWithProjection.from_pretrained(model, subfolder="text_encoder_2", **kw))
        conditioning = cls(tokenizers, encoders, sdxl=True)
        conditioning.check(unet, model)
        return conditioning

    @classmethod
    def from_pipeline(cls, pipe) -> "TextConditioning":
        """The conditioning of a loaded pipeline object (StableDiffusionPipeline or StableDiffusionXLPipeline)."""
        if not is_sdxl(pipe.unet):
            return cls([pipe.tokenizer], [pipe.text_encoder])
        pairs = [(t, e) for t, e in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)) if e is not None]
        return cls([t for t, _ in pairs], [e for _, e in pairs], sdxl=True)

    # ------------------------------------------------------------------------------------------ shapes

    @property
    def projection_dim(self) -> int:
        """Width of the pooled text embeddings (SDXL), text_encoder_2's projection_dim."""
        return self.text_encoders[-1].config.projection_dim

    @property
    def states_dim(self) -> int:
        """Width of encoder_hidden_states: the sum of the encoders' hidden sizes (SDXL) or the one encoder's."""
        return sum(e.config.hidden_size for e in self.text_encoders)

    def check(self, unet, model: str = "pipeline") -> None:
        """ConditioningError unless the encoders' widths are what `unet` expects (cross-attention, added embedding)."""
        cross = unet.config.cross_attention_dim
        cross = cross if isinstance(cross, int) else cross[0]
        if unet.config.get("encoder_hid_dim") is None and self.states_dim != cross:
            raise ConditioningError(f"{model}: the text encoders give states of width {self.states_dim}, the UNet's "
                                    f"cross-attention expects {cross}")
        if self.sdxl:
            expected = unet.config.projection_class_embeddings_input_dim
            given = 6 * unet.config.addition_time_embed_dim + self.projection_dim
            if expected != given:
                raise ConditioningError(f"{model}: the UNet's added embedding expects {expected} inputs, the pooled text embeddings "
                                        f"({self.projection_dim}) and 6 time ids x addition_time_embed_dim "
                                        f"({unet.config.addition_time_embed_dim}) give {given}")

    # ------------------------------------------------------------------------------------------ prompts

    def requires_grad_(self, flag: bool = False) -> "TextConditioning":
        for e in self.text_encoders:
            e.requires_grad_(flag)
        return self

    def to(self, *args, **kwargs) -> "TextConditioning":
        for e in self.text_encoders:
            e.to(*args, **kwargs)
        return self

    def eval(self) -> "TextConditioning":
        for e in self.text_encoders:
            e.eval()
        return self

    def tokenize(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Token ids per tokenizer, each (B, that tokenizer's model_max_length): padded to max length, truncated."""
        return [t(list(prompts), max_length=t.model_max_length, padding="max_length", truncation=True, return_tensors="pt").input_ids
                for t in self.tokenizers]

    def encode(self, input_ids: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(encoder_hidden_states (B, L, D), pooled text embeddings (B, P) or None for SD) of tokenized prompts."""
        if not self.sdxl:
            encoder = self.text_encoders[0]
            return encoder(input_ids[0].to(encoder.device))[0], None
        states, pooled = [], None
        for ids, encoder in zip(input_ids, self.text_encoders):
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds first (the pipeline's rule: the last encoder's)
                pooled = out[0]
            states.append(out.hidden_states[-2])
        return torch.cat(states, dim=-1), pooled

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.encode(self.tokenize(prompts))

    @staticmethod
    def time_ids(original_sizes, crops_top_left, target_sizes, dtype=torch.float32, device=None) -> torch.Tensor:
        """(B, 6) SDXL time ids: per sample original (h, w) + crop (top, left) + target (h, w).

        Each argument: a (B, 2) tensor or a sequence of B pairs; a single pair is used for every sample.
        """
        parts = [torch.as_tensor(p, dtype=torch.float64).reshape(-1, 2) for p in (original_sizes, crops_top_left, target_sizes)]
        n = max(p.shape[0] for p in parts)
        return torch.cat([p.expand(n, 2) for p in parts], dim=1).to(device=device, dtype=dtype)

    def unet_kwargs(self, states: torch.Tensor, pooled: torch.Tensor | None = None, time_ids: torch.Tensor | None = None) -> dict:
        """Keyword arguments of `unet(sample, timestep, **kwargs)`: encoder_hidden_states and, for SDXL,
        added_cond_kwargs {"text_embeds": pooled, "time_ids": time_ids} (time_ids: one row or one per sample)."""
        kwargs = {"encoder_hidden_states": states}
        if self.sdxl:
            if pooled is None or time_ids is None:
                raise ConditioningError("an SDXL UNet needs the pooled text embeddings and the time ids")
            # fp32 even under fp16 / bf16 (the UNet's sinusoidal projection casts its output): bf16 rounds sizes like 1023
            time_ids = time_ids.to(device=states.device, dtype=torch.float32)
            if time_ids.shape[0] == 1 and states.shape[0] > 1:
                time_ids = time_ids.expand(states.shape[0], -1)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(states.device), "time_ids": time_ids}
        return kwargs

"""Facilitated Transport: each membrane's strength follows how close the user's prompt is to its concept.

Per prompt p and membrane m (erased-concept prompts c_1..c_k from the file's metadata):

    g_m(p) = max_j max( cos(flat E(p), flat E(c_j)),  |T(p) & T(c_j)| / |T(c_j)| )

E = the text encoder's last hidden state of the padded prompt (L, D), flattened (the official
`encode_prompts`: padding to model_max_length, no attention mask); T = the set of token ids without
the tokenizer's special tokens (BOS, EOS, PAD, UNK). A membrane without concept prompts has g = 1.

Inside an ordinary ``pipe(prompt=...)`` call nothing is asked of the user: `Transport` wraps the
pipeline object's `encode_prompt` (an instance attribute; the class is untouched) and listens to its
text encoder, so the prompt's token ids and last hidden state are those the pipeline computes itself.
Strengths are per prompt, repeated for `num_images_per_prompt`, moved to the UNet's device once per
call, and the UNet's forward pre-hook tiles them over the batch (classifier-free guidance runs
[uncond, cond]: each image's unconditional half gets its prompt's strength, as in the official code
where the membrane is set per prompt), once per call: the denoising steps reuse them (`SPMModule.begin`).
They are cleared when the call ends (`maybe_free_model_hooks`), so direct UNet calls run the static
membranes (strength = weight).

``pipe(prompt_embeds=...)`` calls: no token ids exist, so g is the cosine term alone, computed on the
given embeddings (which must have the concept embedding's shape (L, D)).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from ..methods.spm import SPMModule, has_spm, spm_module
from ._plugin import pipeline_denoiser


def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (N, L), last hidden state (N, L, D)) as the official `encode_prompts` computes them."""
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = text_encoder(ids.to(text_encoder.device))[0]
    return ids, hidden


def special_token_ids(tokenizer) -> set[int]:
    return set(tokenizer.all_special_ids)


def matching_scores(prompt_embeds: torch.Tensor, concept_embeds: torch.Tensor, prompt_ids: torch.Tensor | None = None,
                    concept_ids: torch.Tensor | None = None, special: set[int] = frozenset()) -> torch.Tensor:
    """(P, C) scores max(cos, token overlap) of P prompts against C concept prompts.

    prompt_embeds (P, L, D), concept_embeds (C, L, D); prompt_ids (P, L) / concept_ids (C, L) or None
    for the cosine term alone (prompt_embeds calls).
    """
    if prompt_embeds.shape[1:] != concept_embeds.shape[1:]:
        raise ValueError(
            f"spm transport: prompt embeddings of shape {tuple(prompt_embeds.shape[1:])} cannot be compared with the concept "
            f"embeddings {tuple(concept_embeds.shape[1:])}; pass prompt= instead of prompt_embeds=, or load with transport=False"
        )
    a, b = prompt_embeds.flatten(1).float(), concept_embeds.flatten(1).float().to(prompt_embeds.device)
    scores = F.cosine_similarity(a[:, None], b[None], dim=-1).cpu()
    if prompt_ids is None:
        return scores
    concept_sets = [set(c.tolist()) - special for c in concept_ids]
    overlap = torch.tensor([[len((set(p.tolist()) - special) & c) / len(c) if c else 0.0 for c in concept_sets] for p in prompt_ids])
    return torch.maximum(scores, overlap)


class Transport:
    """Per-prompt strengths inside `pipe(...)` calls; `remove()` restores the pipeline object exactly.

    The membranes are looked up on the pipeline's UNet at every call, so the transport follows
    membranes loaded, unloaded or merged later (without membranes it only passes calls through).
    """

    def __init__(self, pipe):
        if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
            raise ValueError(f"spm transport needs a pipeline with `text_encoder` and `tokenizer`; {type(pipe).__name__} has none "
                             "(load with transport=False, or set strengths with set_weights)")
        if not callable(getattr(pipe, "encode_prompt", None)):
            raise ValueError(f"spm transport: {type(pipe).__name__} has no encode_prompt method; load with transport=False")
        self.pipe = pipe
        self.concepts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # concept prompt -> (ids (L,), E (L, D))
        self.recording: list | None = None
        self.last: dict[str, torch.Tensor] | None = None  # name -> (P * n,) of the last call
        self._saved = {k: pipe.__dict__[k] for k in ("encode_prompt", "maybe_free_model_hooks") if k in pipe.__dict__}
        self._encode, self._free = pipe.encode_prompt, getattr(pipe, "maybe_free_model_hooks", None)
        self._signature = inspect.signature(self._encode)
        self._hook = pipe.text_encoder.register_forward_hook(self._record, with_kwargs=True)
        pipe.encode_prompt = self.encode_prompt
        if self._free is not None:
            pipe.maybe_free_model_hooks = self.end_of_call

    def remove(self) -> None:
        self._hook.remove()
        for key in ("encode_prompt", "maybe_free_model_hooks"):
            self.pipe.__dict__.pop(key, None)
        self.pipe.__dict__.update(self._saved)
        self._set(None)

    @property
    def spm(self) -> SPMModule | None:
        unet = pipeline_denoiser(self.pipe)
        return spm_module(unet) if has_spm(unet) else None

    def _set(self, strengths) -> None:
        spm = self.spm
        if spm is not None:
            spm.strengths = strengths

    def _record(self, module, args, kwargs, output) -> None:
        if self.recording is not None:
            ids = args[0] if args else kwargs.get("input_ids")
            self.recording.append((ids.detach().cpu(), output[0].detach()))

    def encode_prompt(self, *args, **kwargs):
        """The pipeline's encode_prompt; records its text-encoder calls and sets the strengths."""
        if self.spm is None:
            self.last = None
            return self._encode(*args, **kwargs)
        self.recording = []
        try:
            result = self._encode(*args, **kwargs)
        finally:
            calls, self.recording = self.recording, None
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        prompt_embeds = result[0] if isinstance(result, tuple) else result
        given = bound.get("prompt_embeds")
        if given is not None:
            strengths = self.strengths(given, None)
        elif calls:
            ids, hidden = calls[0]  # encode_prompt encodes the prompts before the negative prompts
            strengths = self.strengths(hidden, ids)
        else:
            raise RuntimeError("spm transport: encode_prompt ran without prompt_embeds and without calling the text encoder")
        per_image = prompt_embeds.shape[0] // next(iter(strengths.values())).numel() if strengths else 1
        self.last = {name: g.repeat_interleave(per_image) for name, g in strengths.items()}
        # On the UNet's device once per call: the denoising steps then read them without a host-to-device copy.
        self._set({name: g.to(prompt_embeds.device) for name, g in self.last.items()})
        return result

    def end_of_call(self, *args, **kwargs):
        self._set(None)
        return self._free(*args, **kwargs)

    def concept(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        if prompt not in self.concepts:
            recording, self.recording = self.recording, None
            try:
                ids, hidden = encode_prompts(self.pipe.tokenizer, self.pipe.text_encoder, [prompt])
            finally:
                self.recording = recording
            self.concepts[prompt] = ids[0], hidden[0]
        return self.concepts[prompt]

    def strengths(self, embeds: torch.Tensor, ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Membrane name -> g (P,) for P prompts (ids None: cosine term only)."""
        special = special_token_ids(self.pipe.tokenizer)
        out = {}
        for name in self.spm.membranes:
            prompts = concept_prompts(self.spm.config.prompt_of(name))
            if not prompts:
                continue  # unknown concept: static strength
            concept_ids, concept_embeds = zip(*(self.concept(p) for p in prompts))
            scores = matching_scores(embeds, torch.stack(concept_embeds), ids, torch.stack(concept_ids), special)
            out[name] = scores.max(dim=1).values
        return out


def concept_prompts(metadata_prompts: str) -> list[str]:
    """The official metadata "prompts" (comma-separated) as a list, blanks dropped."""
    return [p.strip() for p in (metadata_prompts or "").split(",") if p.strip()]

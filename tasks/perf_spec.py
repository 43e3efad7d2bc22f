"""Speculative decoding's step: the target verifies k draft tokens per sequence (k + 1 query tokens) after
the drafts are proposed, and keeps the accepted prefix plus its own token.

Used by the closed-loop model (`perf_steady`), `dolphin plan` and `dolphin predict`. Draft methods:
`ngram` (prompt lookup: free), `mtp` / `eagle` / `eagle3` (a one-layer head on the target's hidden state,
run once per draft token: `PerfModel.draft_layer_step`), `draft_model` (a separate small model, one
decode step per draft token).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tasks.perf_model import PerfModel, StepCost

LAYER_HEADS = ("mtp", "eagle", "eagle3")  # drafts from one extra decoder layer sharing the LM head
DRAFT_METHODS = ("ngram", *LAYER_HEADS, "draft_model")


def expected_accepted(k, acceptance):
    """Tokens a verify step yields with k draft tokens each accepted with probability `acceptance` given
    the ones before it (the accepted prefix plus the target's own token): (1 - a^(k+1)) / (1 - a)."""
    k, a = np.asarray(k, float), np.clip(np.asarray(acceptance, float), 0.0, 0.999999)
    out = np.where(k > 0, (1 - a ** (k + 1)) / (1 - a), 1.0)
    return float(out) if out.ndim == 0 else out


def acceptance_from_length(k: int, length: float) -> float:
    """The per-token acceptance whose expected tokens per verify step is `length` (vLLM's "mean acceptance
    length", 1 + accepted drafts per draft): the inverse of `expected_accepted`."""
    if k < 1 or not 1.0 <= length <= k + 1:
        raise ValueError(f"acceptance length {length} must lie between 1 and num_speculative_tokens + 1 ({k + 1})")
    lo, hi = 0.0, 0.999999
    for _ in range(60):  # expected_accepted rises monotonically in the acceptance
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected_accepted(k, mid) < length else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class SpecDecode:
    """A deployment's speculative decoding (k = 0: none)."""

    k: int = 0  # draft tokens per verify step
    acceptance: float = 0.0  # probability a draft token is accepted, given the ones before it
    method: str = "ngram"
    draft: PerfModel | None = None  # method "draft_model": the draft's own step model
    verify_tokens: int | None = None  # tokens verified per sequence (SGLang's draft tree); None: the chain's k + 1

    def __post_init__(self) -> None:
        if self.method not in DRAFT_METHODS:
            raise ValueError(f"speculative method {self.method!r} unknown; modelled: {', '.join(DRAFT_METHODS)}")
        if self.method == "draft_model" and self.k and self.draft is None:
            raise ValueError("speculative method draft_model needs the draft model's PerfModel")

    @property
    def tokens_per_step(self) -> float:
        return expected_accepted(self.k, self.acceptance)


NO_SPEC = SpecDecode()


def speculation(method: str | None, k: int, acceptance: float, target: PerfModel, draft_arch=None,
                step_overhead_s: float = 0.0, backend: str | None = None,
                verify_tokens: int | None = None) -> tuple[SpecDecode, str]:
    """(the `SpecDecode` a deployment's settings describe, a caveat). A draft model runs at the target's
    GPUs, TP and dtypes with the engine's `step_overhead_s`; one outside the catalogue (`draft_arch` None)
    is costed as free drafts, an optimistic bound the caveat states. No method or k < 1: none."""
    if not method or k < 1:
        return NO_SPEC, ""
    if method != "draft_model":
        return SpecDecode(k, acceptance, method, verify_tokens=verify_tokens), ""
    if draft_arch is None:
        return (SpecDecode(k, acceptance, "ngram", verify_tokens=verify_tokens),
                "draft model not in the catalogue: its cost left out")
    draft = PerfModel(draft_arch, target.gpu, target.weights_dtype, target.kv_dtype, tp=target.tp,
                      step_overhead_s=step_overhead_s, params=target.params, backend=backend)
    return SpecDecode(k, acceptance, "draft_model", draft, verify_tokens=verify_tokens), ""


def _add(a: StepCost, b: StepCost, times=1.0) -> StepCost:
    return StepCost(a.seconds + times * b.seconds, a.compute_s + times * b.compute_s, a.memory_s + times * b.memory_s,
                    a.comm_s + times * b.comm_s, a.overhead_s + times * b.overhead_s)


def drafts(pm: PerfModel, seqs, context_tokens, spec: SpecDecode) -> StepCost | None:
    """Proposing k draft tokens for `seqs` sequences (None when drafts are free or absent)."""
    if spec.k < 1 or spec.method == "ngram":
        return None
    one = (pm.draft_layer_step(seqs, context_tokens) if spec.method in LAYER_HEADS
           else spec.draft.step(decode_seqs=seqs, decode_context_tokens=context_tokens))
    return _add(StepCost(0.0, 0.0, 0.0, 0.0, 0.0), one, spec.k * (np.asarray(seqs, float) > 0))


def decode_step(pm: PerfModel, seqs, context_tokens, spec: SpecDecode = NO_SPEC, **prefill) -> StepCost:
    """One engine step of `seqs` decoding sequences (and any `prefill` keywords of `PerfModel.step`): with
    speculative decoding, their drafts and a verify pass of k + 1 tokens each (a draft tree's
    `verify_tokens`), which yields `spec.tokens_per_step` output tokens per sequence (a tree's topk > 1
    candidates accept at least that many: the chain's figure is a floor)."""
    step = pm.step(decode_seqs=seqs, decode_context_tokens=context_tokens,
                   tokens_per_decode_seq=(spec.verify_tokens or spec.k + 1) if spec.k else 1, **prefill)
    extra = drafts(pm, seqs, context_tokens, spec)
    return step if extra is None else _add(step, extra)

"""The batched rejection sampler of speculative verification (see engine/spec/__init__.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..sampler import Sampler


def rejection_sample(
    draft_tokens: torch.Tensor,  # [B, k] long, proposals (positions >= num_proposed are padding)
    num_proposed: list[int],  # [B] m per row (host), 0 <= m <= k
    target_argmax: torch.Tensor,  # [B, k+1] argmax of the processed target logits
    target_probs: torch.Tensor | None,  # [B, k+1, V] target distribution; None when all rows greedy
    draft_probs: torch.Tensor | None,  # [R, k, V] q of the rows that sampled their proposal
    draft_rows: torch.Tensor | None,  # [R] long, which rows those are; every other q is a point mass
    greedy: list[bool],  # [B]
    race_keys: list[list[int | None]],  # [B][k+1] keyed race per position (seeded rows) or None
    sampler: "Sampler",  # draws the races (and the shared stream's uniforms)
) -> tuple[torch.Tensor, torch.Tensor]:  # num_accepted [B] long, next_token [B] long
    """Accept a prefix of each row's proposal and pick the token after it, exactly as the target
    distribution would (see engine/spec/__init__.py).

    Every sampled row draws the race plain decoding would draw at each of its m+1 positions, and
    y_j = argmax(p_j / race_j) is the token plain decoding would sample there. A point-mass
    proposal x_j (prompt lookup, greedy draft) is accepted iff y_j == x_j: probability p_j(x_j),
    the rejection rule's min(1, p/q) for q = 1, and on the first mismatch y_j is a draw from p_j
    without x_j, the normalised residual. So a seeded row emits exactly plain decoding's tokens.
    A sampled draft proposal (q_j not a point mass) keeps the general rule: accept with a uniform
    u < p/q, on rejection race the residual max(0, p - q)."""
    B, k = draft_tokens.shape
    dev = draft_tokens.device
    m = torch.tensor(num_proposed, device=dev)
    valid = torch.arange(k, device=dev)[None, :] < m[:, None]  # [B, k]
    is_greedy = torch.tensor(greedy, device=dev)
    if target_probs is None:
        accept = (draft_tokens == target_argmax[:, :k]) & valid
        num_accepted = accept.long().cumprod(1).sum(1)
        return num_accepted, target_argmax.gather(1, num_accepted[:, None]).squeeze(1)
    V = target_probs.shape[-1]
    sampled_q = set(draft_rows.tolist()) if draft_rows is not None else set()
    races = torch.ones(B, k + 1, V, device=dev)
    u = torch.ones(B, k, device=dev)  # only rows with a sampled q read it
    for i in range(B):
        if greedy[i]:
            continue
        for j in range(num_proposed[i] + 1):
            sampler.race(races[i, j], race_keys[i][j])
        if i in sampled_q and num_proposed[i]:
            u[i, : num_proposed[i]] = sampler.uniform(num_proposed[i], race_keys[i][0])
    y = (target_probs / races).argmax(-1)  # [B, k+1] what plain decoding samples at each position
    accept = torch.where(is_greedy[:, None], draft_tokens == target_argmax[:, :k], draft_tokens == y[:, :k])
    if draft_probs is not None:
        p_x = target_probs[draft_rows, :k].gather(-1, draft_tokens[draft_rows][..., None]).squeeze(-1)  # [R, k]
        q_x = draft_probs.gather(-1, draft_tokens[draft_rows][..., None]).squeeze(-1)
        accept[draft_rows] = u[draft_rows] * q_x < p_x  # u < p/q without dividing by a q that may underflow
    accept &= valid
    num_accepted = accept.long().cumprod(1).sum(1)  # [B] length of the accepted prefix
    next_token = torch.where(is_greedy[:, None], target_argmax, y).gather(1, num_accepted[:, None]).squeeze(1)
    if draft_probs is not None:
        # Rows with a sampled q: after a rejection, race the residual at the rejected position.
        R = draft_rows.shape[0]
        a = num_accepted[draft_rows]
        gather_v = a[:, None, None].expand(R, 1, V)
        p_a = target_probs[draft_rows].gather(1, gather_v).squeeze(1)  # [R, V]
        pad_q = torch.cat([draft_probs, torch.zeros(R, 1, V, dtype=draft_probs.dtype, device=dev)], 1)
        resid = (p_a - pad_q.gather(1, gather_v).squeeze(1)).clamp_min(0.0)
        # A rejection implies p(x) < q(x), so the residual has mass; guard rounding anyway.
        use_resid = (a < m[draft_rows])[:, None] & (resid.sum(-1, keepdim=True) > 0)
        race_a = races[draft_rows].gather(1, gather_v).squeeze(1)
        drawn = (torch.where(use_resid, resid, p_a) / race_a).argmax(-1)
        next_token[draft_rows] = torch.where(is_greedy[draft_rows], next_token[draft_rows], drawn)
    return num_accepted, next_token

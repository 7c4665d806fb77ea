"""Speculative decoding: prompt-lookup (n-gram) and draft-model proposals, verified losslessly.

Where each part lives and who decides what a step computes:
  * before the scheduler runs, the engine's `Speculator` (speculator.py) fills `Sequence.
    spec_token_ids` of every running sequence about to decode whose request speculates: prompt
    lookup (pld.py, over the one n-gram matcher in ngram.py) or the draft model (draft.py, work
    of the draft model's own engine);
  * the **scheduler** turns such a decode row into a verify row where its token budget
    (`max_num_batched_tokens`, k+1 positions per verify row) and free KV blocks allow, through
    the normal slot allocation; it never preempts for speculation (a row that does not fit
    decodes plainly) and lists verify rows in `SchedulerOutput.verifies`;
  * the runner verifies all of them in one forward over Q = k+1 positions: its last token plus
    the m proposed tokens, padded to k (padded positions write their K/V to the sink block and are
    never accepted). k is fixed per engine, so the verify forward has a static shape per batch
    bucket and can be graph-captured like decode (`ModelRunner.forward_verify`); the batched
    rejection sampler (rejection.py) then accepts a prefix per row;
  * the engine's postprocess appends the accepted tokens one by one through the plain finish
    check and rolls `num_cached_tokens` back over the rejected positions.

Host round trips per step: prompt lookup proposes on the host from token ids the host already has;
the verify forward returns the accepted count and the next token of every row with one `.tolist()`
(as plain decode returns its tokens); logprobs, when asked for, add one; draft proposals add one per
draft forward (k of them), in the draft engine.

Exactness (the output distribution is the target's, token by token):
  * the target distribution p_j at verify position j is the sampler's own (`Sampler.distribution`)
    over the row "sequence + first j proposed tokens": temperature, top-k/p, min-p, penalties and
    min_tokens apply exactly as in plain decode;
  * greedy: proposal j is accepted iff it equals argmax p_j; the first mismatch (or the bonus
    position after m accepts) emits argmax p_j — token for token what plain greedy decode emits;
  * sampling: proposal x_j drawn from q_j is accepted with probability min(1, p_j(x)/q_j(x));
    on the first rejection the token is drawn from normalize(max(0, p_j - q_j)); after m accepts
    the bonus token is drawn from p_m. For prompt lookup (and a greedy draft) q_j is a point
    mass, which reduces to: accept with probability p_j(x), else draw from p_j without x. We
    do that by drawing, at each position, the very race plain decoding would draw there (keyed
    by seed and output index for seeded requests, `sampler.race_key`) and accepting x_j iff the
    token it samples is x_j: a seeded request then emits plain decoding's tokens exactly,
    whatever it shares a batch with, and whether or not it speculated in a step;
  * accepted tokens go through the engine's normal per-token finish check (EOS, stop ids, stop
    strings, max_tokens, context length), so nothing past a stop is ever emitted.

KV consistency: writes are position-indexed, so a rejected position is simply overwritten later;
the target's `num_cached_tokens` becomes n + accepted. The draft engine keeps one shadow sequence
per target sequence in its own scheduler and paged cache (evicted first when its own requests
need blocks); its `num_cached_tokens` is rolled back to the accepted length after verification
and the next proposal first catches up on whatever the draft has not computed yet.
"""

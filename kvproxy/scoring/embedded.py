"""Exact teacher-forced scoring in process: two llama.cpp contexts on the primary's loaded weights.

One context has the primary's KV configuration, one the reference's (f16 by default). Both are fed
the exact tokens the primary produced (prompt, then the completion), and at every completion
position the full-vocabulary KL(P_reference || Q_primary) is computed. The weights are loaded once
(the contexts share the primary's ``llama_model``, so they also share its GPU offload).

Two paths (docs/reference-design.md, "Which numerics served the tokens": llama.cpp computes a one-token decode
and a batched prefill with different kernels, and a quantized KV cache reads differently in each):

* ``decode`` replays what generation computed. Each context clears its cache, prefills the prompt
  as llama-cpp-python's ``Llama.eval`` does (calls of ``batch`` tokens split by llama.cpp into
  micro-batches of ``ubatch``, logits only for the last token, whose row predicts completion[0]),
  then decodes ``completion[:-1]`` one token per ``llama_decode`` call. With ``max_sequences`` B > 1,
  up to B jobs are decoded in lockstep as B sequences of one context (``n_seq_max`` B, each sequence
  its own KV stream, as llama-server without ``--kv-unified``): one token per sequence per call.
* ``prefill`` is the cheaper chunked replay: the prompt prefix without logits, then ``chunk``
  positions per call. It understates what a quantized KV cache costs where the kernels differ
  (CUDA). On a CPU an f16 cache is read by a vector attention kernel for calls under 64 query rows
  and by a tiled one from 64 (what a 512-token prefill uses), so small chunks mix the two kinds of
  numerics: at chunks of 8, q8_0 read 11 % above ``llama-perplexity -ub 512``, at 128 within 0.2 %
  (tests/test_score_paths_agreement.py).

In embedded mode a shadow-sampled request's served rows are captured at generation time
(kvproxy.backends.row_capture) and :meth:`EmbeddedScorer.score_captured` decodes only the reference
against them, the KLD overlapping the next decode (kvproxy.scoring.captured); the replay of
both configs here stays for the score route, for the prefill path and for jobs whose rows did not fit
the capture budget.

Lockstep sequences reproduce the single-sequence rows only where llama.cpp's kernels do not depend
on the rows per call; on a CPU from 2 sequences, and on CUDA, they do (docs/kld.md has the
figures), so several sequences are off unless asked for (:func:`make_scorer`).

Memory stays bounded whatever the vocabulary V, the sequence length and the number of jobs.

* ``decode``: no row is copied. The KLD reads each step's rows where llama.cpp left them, so the
  extra memory is what llama.cpp holds for the step's outputs, per context its output buffer and
  the graph's output tensor (at most ``n_outputs_max`` = B rows each: 2 x 2 x 4 bytes a logit for
  the two contexts), plus :func:`kvproxy.kld.exact_kld`'s fixed 8 MiB and, when the primary's own
  logprobs are checked, two rows of temporaries: 16 B V bytes + 8 MiB + 8 V bytes
  (:func:`decode_step_bytes`). For Gemma (V = 262,144) that is 4 MiB + 10 MiB at B = 1 and 32 MiB +
  10 MiB at B = 8.
* ``prefill``: per chunk 36 bytes a logit (:func:`scoring_chunk_bytes`): in each context llama.cpp's
  output tensor and output buffer (2 x 2 x 4 bytes), one float32 copy of the reference's rows (4),
  with 16 to spare, plus the KLD's fixed 8 MiB: 584 MiB for Gemma at the default chunk of 64
  (the prefill path's price for llama.cpp's prefill kernels; the decode path is the default).

Both paths cap llama.cpp's outputs per call (``n_outputs_max``) at the rows they read: by default
llama.cpp reserves a graph output for n_batch rows, which for Gemma made each context's compute
buffer 514.5 MiB instead of 19.8 MiB (allocated as VRAM on a GPU). The two contexts' KV caches come
on top, fixed at creation: ``n_ctx`` cells per sequence, so B times one context's on the batched
decode path.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvproxy.backends.base import KVConfig
from kvproxy.backends.embedded import EmbeddedBackend
from kvproxy.backends.row_capture import RowCapture
from kvproxy.config import ScorePath
from kvproxy.kld import PositionScores, exact_kld, logprobs_at
from kvproxy.model.memory import llama_n_ubatch
from kvproxy.priority import lower_thread_priority
from kvproxy.scoring.captured import BlockBuffers, CapturedJob, Phases, score_captured_jobs
from kvproxy.scoring.contexts import memory_kind, scoring_context
from kvproxy.scoring.prompt_fill import PromptFill

log = logging.getLogger(__name__)

KLD_FIXED_BYTES = 8 << 20  # kvproxy.kld.exact_kld's temporaries, whatever the rows


def scoring_chunk_bytes(chunk: int, n_vocab: int) -> int:
    """Upper bound of the extra bytes one prefill-path chunk needs (see the module docstring)."""
    return chunk * n_vocab * (2 * 2 * 4 + 4 + 4 * 4)


def decode_step_bytes(max_sequences: int, n_vocab: int) -> int:
    """Upper bound of the extra bytes the decode path needs (see the module docstring)."""
    return max_sequences * n_vocab * 2 * 2 * 4 + KLD_FIXED_BYTES + 2 * n_vocab * 4


@dataclass(frozen=True)
class ScoreRequest:
    """One job's tokens: position j scores ``completion[j]`` given ``prompt + completion[:j]``."""

    prompt: Sequence[int]
    completion: Sequence[int]
    check_ids: Sequence[Sequence[int]] | None = None
    # how the serving process cut the prompt into calls (decode path; None: as the embedded
    # backend's own generation does, calls of ``batch`` tokens)
    prompt_fill: PromptFill | None = None


@dataclass
class _Run:
    """One job in flight on the decode path: its sequence id and what has been scored so far."""

    index: int
    request: ScoreRequest
    seq: int
    step: int = 0  # the next completion position to score
    kld: list[float] = field(default_factory=list)
    same_top: list[bool] = field(default_factory=list)
    p_ref: list[float] = field(default_factory=list)
    p_primary: list[float] = field(default_factory=list)
    checks: list[list[float]] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.step >= len(self.request.completion)

    def scores(self) -> PositionScores:
        s = PositionScores(
            np.asarray(self.kld, dtype=np.float64),
            np.asarray(self.same_top, dtype=bool),
            np.asarray(self.p_ref, dtype=np.float64),
            np.asarray(self.p_primary, dtype=np.float64),
        ).at(len(self.request.prompt))
        return s if self.request.check_ids is None else s.with_checks(self.checks)


class EmbeddedScorer:
    """Not thread-safe: call ``score`` / ``score_batch`` from one thread at a time (the shadow worker's).

    ``batch`` and ``ubatch`` are the serving context's ``n_batch`` and micro-batch (default
    llama.cpp's: min(batch, n_ctx, 512)); on the decode path they shape the prompt's prefill as in
    generation. ``prompt_ubatch`` prefills the prompt in smaller micro-batches than that (1 mirrors
    ``llama-perplexity -ub 1``).
    """

    def __init__(
        self,
        model: Any,  # llama_cpp._internals.LlamaModel, already loaded
        *,
        primary: KVConfig,
        reference: KVConfig,
        n_ctx: int,
        threads: int,
        flash_attn: bool,
        chunk: int = 8,
        batch: int = 512,
        path: ScorePath | str = ScorePath.PREFILL,
        ubatch: int | None = None,
        prompt_ubatch: int | None = None,
        max_sequences: int = 1,
    ) -> None:
        from llama_cpp import _internals

        path = ScorePath(path)  # a ValueError names anything else
        if max_sequences < 1 or (path == "prefill" and max_sequences != 1):
            raise ValueError("several sequences at once exist only on the decode path")
        if prompt_ubatch is not None and (path == "prefill" or prompt_ubatch < 1):
            raise ValueError("prompt_ubatch is a decode-path option of at least 1")
        self.primary_kv = primary
        self.reference_kv = reference
        self.n_ctx = n_ctx
        self.chunk = chunk
        self.path = path
        self.max_sequences = max_sequences
        self._model = model
        # llama-server's checkpoint cuts apply to windowed or recurrent models (kvproxy.scoring.prompt_fill)
        self.cuts_apply = memory_kind(model) != "full"
        self.n_vocab = int(model.n_vocab())
        if path == "prefill":
            self.batch_size = max(batch, chunk)
            n_batch = n_ubatch = self.batch_size
            self.prompt_ubatch = self._prompt_call = n_ubatch
            n_outputs_max = chunk  # rows per call: llama.cpp's default (n_batch) reserves 512 rows
        else:
            serving_ubatch = ubatch if ubatch is not None else llama_n_ubatch(batch, n_ctx)
            self.batch_size = batch
            self.prompt_ubatch = prompt_ubatch if prompt_ubatch is not None else serving_ubatch
            n_batch = max(batch, max_sequences)
            n_ubatch = max(serving_ubatch, max_sequences)
            # calls of n_batch tokens as Llama.eval makes them, or of the smaller micro-batch asked for
            self._prompt_call = batch if self.prompt_ubatch >= n_ubatch else self.prompt_ubatch
            n_outputs_max = max_sequences  # one row per sequence per step
        self._ctx_primary = self._context(
            primary, n_ctx, threads, flash_attn, n_batch, n_ubatch, n_outputs_max
        )
        self._ctx_reference = self._context(
            reference, n_ctx, threads, flash_attn, n_batch, n_ubatch, n_outputs_max
        )
        self._batch = _internals.LlamaBatch(n_tokens=n_batch, embd=0, n_seq_max=1, verbose=False)
        self._kld_worker: ThreadPoolExecutor | None = None  # score_captured's overlap (on first use)
        self._block_buffers: BlockBuffers | None = None  # score_captured's reference blocks (first use)

    def _context(
        self,
        kv: KVConfig,
        n_ctx: int,
        threads: int,
        flash_attn: bool,
        n_batch: int,
        n_ubatch: int,
        n_outputs_max: int,
    ) -> Any:
        return scoring_context(
            self._model,
            kv,
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_ubatch=n_ubatch,
            n_outputs_max=n_outputs_max,
            threads=threads,
            flash_attn=flash_attn,
            n_seq_max=self.max_sequences,
        )

    def close(self) -> None:
        if self._kld_worker is not None:
            self._kld_worker.shutdown(wait=True)
        for obj in (self._batch, self._ctx_primary, self._ctx_reference):
            obj.close()

    def score_captured(self, request: ScoreRequest, capture: RowCapture) -> PositionScores:
        """Decode path against the primary's captured rows: the reference alone is decoded and the
        KLD of each block overlaps the next block's decode (kvproxy.scoring.captured)."""
        result = self.score_captured_many([(request, capture)])[0]
        if isinstance(result, ValueError):
            raise result
        return result

    def score_captured_many(
        self, items: Sequence[tuple[ScoreRequest, RowCapture]], phases: Phases | None = None
    ) -> list[PositionScores | ValueError]:
        """:meth:`score_captured` for several jobs as one pipeline: a job's last blocks' KLD overlaps
        the next job's prefill and decode (kvproxy.scoring.captured.score_captured_jobs). A job that
        cannot be scored gets its ValueError in its place; a llama.cpp failure raises for all.
        ``phases`` (benchmarks) adds where the time went."""
        results: list[PositionScores | ValueError | None] = [None] * len(items)
        jobs: list[CapturedJob] = []
        taken: list[int] = []
        for i, (request, capture) in enumerate(items):
            try:
                self._check(request)
                if self.path is not ScorePath.DECODE or request.check_ids is not None:
                    raise ValueError("captured rows are scored on the decode path, without check_ids")
                if not capture.usable(len(request.completion)):
                    raise ValueError(
                        f"{capture.n_rows} captured rows for {len(request.completion)} completion tokens"
                    )
            except ValueError as exc:
                results[i] = exc
                continue
            jobs.append(CapturedJob(len(request.prompt), request.completion, capture))
            taken.append(i)
        if jobs:
            if self._kld_worker is None:
                self._kld_worker = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="kvproxy-kld-overlap", initializer=lower_thread_priority
                )
            if self._block_buffers is None:
                self._block_buffers = BlockBuffers(self.n_vocab)
            ctx = self._ctx_reference

            def prefill(k: int) -> None:
                request = items[taken[k]][0]
                ctx.kv_cache_clear()
                self._prefill_prompt(ctx, request.prompt, 0, request.prompt_fill)

            def step(token: int, pos: int) -> None:
                self._fill([token], [pos], [0], 1)
                ctx.decode(self._batch)

            try:
                scores = score_captured_jobs(
                    jobs,
                    prefill=prefill,
                    step=step,
                    row=lambda: ctx.get_logits_ith(-1),
                    executor=self._kld_worker,
                    buffers=self._block_buffers,
                    phases=phases,
                )
            finally:
                ctx.kv_cache_clear()
            for i, score in zip(taken, scores, strict=True):
                results[i] = score
        return [r if r is not None else ValueError("not scored") for r in results]

    def _decode(self, ctx: Any, tokens: Sequence[int], n_past: int, with_logits: bool) -> None:
        self._batch.set_batch(batch=list(tokens), n_past=n_past, logits_all=with_logits)
        ctx.decode(self._batch)

    def _logits(self, ctx: Any, n_rows: int) -> np.ndarray[Any, np.dtype[np.float32]]:
        return np.ctypeslib.as_array(ctx.get_logits(), shape=(n_rows, self.n_vocab))

    def score(
        self,
        prompt: Sequence[int],
        completion: Sequence[int],
        check_ids: Sequence[Sequence[int]] | None = None,
        prompt_fill: PromptFill | None = None,
    ) -> PositionScores:
        """Per-position exact scores for every completion token, teacher-forced on both configs.

        Position j scores ``completion[j]`` given ``prompt + completion[:j]``. With ``check_ids``
        (token ids per position), the primary config's logprobs of those tokens are returned too,
        in ``PositionScores.check_logprobs``.
        """
        request = ScoreRequest(prompt, completion, check_ids, prompt_fill)
        self._check(request)
        if self.path == "prefill":
            return self._score_prefill(request)
        result = self._score_decode([request])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def score_batch(self, requests: Sequence[ScoreRequest]) -> list[PositionScores | ValueError]:
        """Score several jobs; on the decode path up to ``max_sequences`` of them in lockstep.

        A job that cannot be scored (no prompt, too long) gets its ValueError in its place and the
        others are scored; a llama.cpp failure raises for all of them."""
        if self.path == "prefill":
            out: list[PositionScores | ValueError] = []
            for r in requests:
                try:
                    self._check(r)
                except ValueError as exc:
                    out.append(exc)
                else:
                    out.append(self._score_prefill(r))
            return out
        return self._score_decode(requests)

    def _check(self, request: ScoreRequest) -> None:
        if not request.prompt:
            raise ValueError("scoring needs at least one prompt token")
        n = len(request.prompt) + max(len(request.completion) - 1, 0)
        if n > self.n_ctx:
            raise ValueError(f"{n} tokens do not fit the scoring context of {self.n_ctx}")
        fill = request.prompt_fill
        if fill is not None and (self.path is not ScorePath.DECODE or fill.ubatch > self.batch_size):
            raise ValueError(
                f"a prompt fill of micro-batches of {fill.ubatch} needs the decode path and a scoring "
                f"batch of at least that (this scorer: {self.path.value}, batch {self.batch_size})"
            )

    # ---- prefill path ---------------------------------------------------------------------------

    def _score_prefill(self, request: ScoreRequest) -> PositionScores:
        return _prefill_scores(self, [self], request)[0]

    # ---- decode path ----------------------------------------------------------------------------

    def _fill(self, tokens: Sequence[int], pos: Sequence[int], seqs: Sequence[int], outputs: int) -> None:
        """Put tokens in the batch, the last ``outputs`` of them with logits."""
        b = self._batch.batch
        n = len(tokens)
        b.n_tokens = n
        for k in range(n):
            b.token[k] = tokens[k]
            b.pos[k] = pos[k]
            b.seq_id[k][0] = seqs[k]
            b.n_seq_id[k] = 1
            b.logits[k] = k >= n - outputs

    def _prefill_prompt(
        self, ctx: Any, prompt: Sequence[int], seq: int, fill: PromptFill | None = None
    ) -> None:
        """The prompt as generation fed it, logits for the last token only: calls of ``batch``
        tokens (or of ``prompt_ubatch``) as the embedded backend's generation makes them, or the
        micro-batches of another server's cuts (``fill``, kvproxy.scoring.prompt_fill). Llama.eval
        also asks for the last row of each earlier call; those rows change no KV cell, so they are not
        computed here."""
        ctx.kv_cache_seq_rm(seq, -1, -1)
        n = len(prompt)
        if fill is None:
            pieces = [(i, min(i + self._prompt_call, n)) for i in range(0, n, self._prompt_call)]
        else:
            pieces = fill.pieces(n, cuts_apply=self.cuts_apply)
        for start, end in pieces:
            part = prompt[start:end]
            self._fill(part, range(start, end), [seq] * len(part), int(end >= n))
            ctx.decode(self._batch)

    def _rows(self, ctx: Any, n_rows: int) -> np.ndarray[Any, np.dtype[np.float32]]:
        """The last ``n_rows`` output rows, read in place (valid until the context's next decode)."""
        if n_rows == 1:
            return np.ctypeslib.as_array(ctx.get_logits_ith(-1), shape=(1, self.n_vocab))
        return self._logits(ctx, n_rows)

    def _consume(self, runs: Sequence[_Run]) -> None:
        """Score the rows both contexts just produced, one per run, in batch order."""
        n = len(runs)
        ref, primary = self._rows(self._ctx_reference, n), self._rows(self._ctx_primary, n)
        targets = [r.request.completion[r.step] for r in runs]
        s = exact_kld(ref, primary, targets)
        for k, run in enumerate(runs):
            run.kld.append(float(s.kld[k]))
            run.same_top.append(bool(s.same_top[k]))
            run.p_ref.append(float(s.p_ref[k]))
            run.p_primary.append(float(s.p_primary[k]))
            check_ids = run.request.check_ids
            if check_ids is not None and run.step < len(check_ids):
                run.checks.append(logprobs_at(primary[k], check_ids[run.step]))
            run.step += 1

    def _score_decode(self, requests: Sequence[ScoreRequest]) -> list[PositionScores | ValueError]:
        results: list[PositionScores | ValueError | None] = [None] * len(requests)
        pending: deque[int] = deque()
        for i, r in enumerate(requests):
            try:
                self._check(r)
            except ValueError as exc:
                results[i] = exc
                continue
            if r.completion:
                pending.append(i)
            else:
                results[i] = PositionScores.concat([]).at(len(r.prompt))
        contexts = (self._ctx_reference, self._ctx_primary)
        for ctx in contexts:
            ctx.kv_cache_clear()
        free = list(range(self.max_sequences - 1, -1, -1))
        active: list[_Run] = []
        while pending or active:
            while pending and free:  # a free sequence takes the next job: prompt prefill, first row
                i = pending.popleft()
                run = _Run(i, requests[i], free.pop())
                for ctx in contexts:
                    self._prefill_prompt(ctx, run.request.prompt, run.seq, run.request.prompt_fill)
                self._consume([run])
                if run.done:
                    results[i] = run.scores()
                    free.append(run.seq)
                else:
                    active.append(run)
            if not active:
                continue
            # one token per sequence per call: the completion token before the one each row predicts
            tokens = [r.request.completion[r.step - 1] for r in active]
            pos = [len(r.request.prompt) + r.step - 1 for r in active]
            seqs = [r.seq for r in active]
            for ctx in contexts:
                self._fill(tokens, pos, seqs, len(tokens))
                ctx.decode(self._batch)
            self._consume(active)
            for run in [r for r in active if r.done]:
                active.remove(run)
                results[run.index] = run.scores()
                free.append(run.seq)
        for ctx in contexts:
            ctx.kv_cache_clear()
        return [r if r is not None else ValueError("not scored") for r in results]


def make_scorer(
    backend: EmbeddedBackend, reference: KVConfig, *, path: ScorePath | str | None = None
) -> EmbeddedScorer:
    """Scoring contexts (the backend's KV config and ``reference``) on the weights already loaded.

    On the decode path (the default) the prompt is prefilled with this context's batch and
    micro-batch, as generation did, then one token a step; on the prefill path in calls of
    ``shadow_chunk`` positions. Several jobs in lockstep (``score_sequences``) only with layers
    on a GPU: on a CPU they are not worth it (docs/benchmarks.md: 2 or 3 sequences stay within
    1 % of the single-sequence figure but save 4-6 % of the time; from 4 on llama.cpp multiplies
    4 rows at a time with other kernels and the mean moves 2.6 to 4.5 %)."""
    model = backend.llama_model
    s = backend.settings
    path = ScorePath(path) if path is not None else s.score_path  # the settings' unless told
    decode = path is ScorePath.DECODE
    sequences = s.score_sequences
    if sequences > 1 and not (decode and backend.offload.label != "CPU"):
        log.warning("%d scoring sequences at once are for the decode path on a GPU: one at a time", sequences)
        sequences = 1
    return EmbeddedScorer(
        model,
        primary=backend.kv,
        reference=reference,
        n_ctx=s.ctx_size,
        threads=s.threads,
        flash_attn=s.flash_attn,
        chunk=s.shadow_chunk,
        batch=min(s.batch_size, s.ctx_size),
        path=path,
        ubatch=backend.n_ubatch,
        max_sequences=sequences,
    )


def score_against_one_reference(
    scorers: Sequence[EmbeddedScorer], prompt: Sequence[int], completion: Sequence[int]
) -> list[PositionScores]:
    """One job scored for several primary configs against one reference computation (``kvproxy
    calibrate``'s sweep): the first scorer's reference context is fed the job once, instead of every
    scorer feeding its own. Every context gets exactly the calls :meth:`EmbeddedScorer.score` makes
    on the scorers' path, so each config's figures are those its own scorer gives (the reference's
    rows do not depend on which scorer computed them); a 5-config sweep computes 5 passes a chunk
    instead of 8. The scorers must share the path, context shape and reference config."""
    if not scorers:
        return []
    lead = scorers[0]
    for s in scorers:
        if _call_shape(s) != _call_shape(lead) or s.max_sequences != 1:
            raise ValueError("scorers sharing a reference must share its path, shape and config")
        s._check(ScoreRequest(prompt, completion))
    if not completion:
        return [PositionScores.concat([]).at(len(prompt)) for _ in scorers]
    if lead.path == "prefill":
        return _prefill_scores(lead, scorers, ScoreRequest(prompt, completion))
    contexts = [(lead, lead._ctx_reference), *((s, s._ctx_primary) for s in scorers)]
    parts: list[list[PositionScores]] = [[] for _ in scorers]
    try:
        for s, ctx in contexts:
            ctx.kv_cache_clear()
            s._prefill_prompt(ctx, prompt, 0)
        for step, target in enumerate(completion):
            if step:  # the completion token before the one this step's row predicts
                for s, ctx in contexts:
                    s._fill([completion[step - 1]], [len(prompt) + step - 1], [0], 1)
                    ctx.decode(s._batch)
            ref = lead._rows(lead._ctx_reference, 1)  # read in place: its context is not decoded again
            for k, s in enumerate(scorers):
                parts[k].append(exact_kld(ref, s._rows(s._ctx_primary, 1), [target]))
    finally:
        for _, ctx in contexts:
            ctx.kv_cache_clear()
    return [PositionScores.concat(p).at(len(prompt)) for p in parts]


def _call_shape(s: EmbeddedScorer) -> tuple[object, ...]:
    """What decides the calls a scorer's contexts get (the chunk only shapes the prefill path's)."""
    chunk = s.chunk if s.path == "prefill" else None
    return (s.path, s.n_ctx, s.batch_size, s.prompt_ubatch, s._prompt_call, chunk, s.reference_kv)


def _prefill_scores(
    lead: EmbeddedScorer, scorers: Sequence[EmbeddedScorer], request: ScoreRequest
) -> list[PositionScores]:
    """The prefill path for one or more primaries against ``lead``'s reference context: the prompt
    prefix without logits in each context, then ``chunk`` positions per call, the reference's rows
    copied once a call and read by every primary. ``check_ids`` are read from each primary's rows."""
    prompt, completion, check_ids = request.prompt, request.completion, request.check_ids
    if not completion:
        return [PositionScores.concat([]).at(len(prompt)) for _ in scorers]
    seq = list(prompt) + list(completion[:-1])
    start = len(prompt) - 1  # the position whose logits predict completion[0]
    for s, ctx in [(lead, lead._ctx_reference), *((s, s._ctx_primary) for s in scorers)]:
        ctx.kv_cache_clear()
        for i in range(0, start, s.batch_size):
            s._decode(ctx, seq[i : min(i + s.batch_size, start)], i, with_logits=False)
    parts: list[list[PositionScores]] = [[] for _ in scorers]
    checks: list[list[list[float]]] = [[] for _ in scorers]
    for c in range(start, len(seq), lead.chunk):
        part = seq[c : c + lead.chunk]
        lead._decode(lead._ctx_reference, part, c, with_logits=True)
        ref = lead._logits(lead._ctx_reference, len(part)).copy()
        targets = completion[c - start : c - start + len(part)]
        for k, s in enumerate(scorers):
            s._decode(s._ctx_primary, part, c, with_logits=True)
            primary = s._logits(s._ctx_primary, len(part))
            parts[k].append(exact_kld(ref, primary, targets))
            if check_ids is not None:
                for row, ids in zip(primary, check_ids[c - start : c - start + len(part)], strict=False):
                    checks[k].append(logprobs_at(row, ids))
    out = [PositionScores.concat(p).at(len(prompt)) for p in parts]
    return out if check_ids is None else [o.with_checks(c) for o, c in zip(out, checks, strict=True)]

"""Batched KV-cache sampling: one prefill, then a single `lax.while_loop` decode.

Conventions (shared with the trainers):

* prompts are LEFT-padded to a bucket length, generated tokens are RIGHT-padded with `pad_id`;
* positions come from the attention mask (`cumsum(mask) - 1`), so left padding does not shift RoPE;
* a row is finished after it emits one of its stop tokens, completes one of its stop token sequences, or
  reaches `max_new_tokens`; the stop token/sequence is part of the output and counted in `lengths`;
* sampling knobs (temperature, top-k, top-p) are per-row arrays, so a new value never recompiles;
  temperature 0 means greedy;
* `logprobs[b, t]` is the log-probability of the emitted token under `softmax(logits / T)` (raw logits
  when T = 0), before top-k/top-p filtering: the behaviour policy's probability that GRPO needs.

Stop strings are handled in two layers: on device, each row stops early when its output ends with one of
the token sequences that the stop string canonically tokenizes to (`stop_string_sequences`); on the host,
`truncate_at_stop_strings` cuts every row after the first exact occurrence of the string in the decoded
text, whatever tokens produced it.

Shapes are bucketed: prompt lengths and `max_new_tokens` round up to `SamplerConfig` buckets and the
batch to a multiple of the mesh's batch parallelism, so a training run compiles a handful of programs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_hd.core import sharding

NEG_INF = -1e30  # Finite: a fully masked row stays NaN-free.


class ApplyFn(Protocol):
    def __call__(
        self, params: Any, tokens: jax.Array, positions: jax.Array, attention_mask: jax.Array, cache: Any
    ) -> tuple[jax.Array, Any]:
        """tokens/positions/attention_mask `[batch, seq]` -> (logits `[batch, seq, vocab]`, new cache)."""


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Static sampler settings (changing them compiles new programs).

    prompt_buckets: allowed padded prompt lengths (a longer prompt raises).
    new_token_buckets: allowed padded generation lengths; the loop still exits early when all rows finish.
    pad_id: id written after a row finishes (and used for left padding).
    max_stop_tokens: width of the per-row stop-token table.
    max_stop_sequences, max_stop_sequence_len: size of the per-row stop-sequence table.
    """

    prompt_buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
    new_token_buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048)
    pad_id: int = 0
    max_stop_tokens: int = 4
    max_stop_sequences: int = 8
    max_stop_sequence_len: int = 16


@flax.struct.dataclass
class SamplerOutput:
    """tokens `[batch, max_new]` int32 (pad after the end); logprobs `[batch, max_new]` float32 (0 after the
    end); lengths `[batch]` int32 (generated tokens incl. the stop token); finished `[batch]` bool (stopped by
    a stop token/sequence/string rather than by the length limit)."""

    tokens: Any
    logprobs: Any
    lengths: Any
    finished: Any


def bucket(n: int, buckets: Sequence[int], what: str) -> int:
    """Smallest bucket >= n."""
    for b in sorted(buckets):
        if b >= n:
            return b
    raise ValueError(f"{what} {n} exceeds the largest bucket {max(buckets)}; add a bigger bucket to SamplerConfig")


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Masks logits `[batch, vocab]` outside each row's top-k (0: off) and top-p nucleus (1.0: off).

    The nucleus keeps the smallest set of highest-probability tokens whose mass reaches top_p (the token that
    crosses the threshold is kept). Ties at the k-th logit are kept.
    """
    vocab = logits.shape[-1]
    sorted_logits = -jnp.sort(-logits, axis=-1)  # Descending.
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(sorted_logits, (k - 1)[:, None], axis=-1)
    probs = jax.nn.softmax(jnp.where(sorted_logits >= kth, sorted_logits, NEG_INF), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p[:, None]
    threshold = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where((logits >= threshold) & (logits >= kth), logits, NEG_INF)


def sample_tokens(
    rng: jax.Array, logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Draws one token per row from logits `[batch, vocab]`; returns (tokens `[batch]`, logprobs `[batch]`)."""
    logits = logits.astype(jnp.float32)
    greedy = temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, temperature)[:, None]
    needs_filter = jnp.any((top_k > 0) | (top_p < 1.0))
    filtered = jax.lax.cond(needs_filter, filter_logits, lambda x, *_: x, scaled, top_k, top_p)
    sampled = jax.random.categorical(rng, filtered, axis=-1)
    tokens = jnp.where(greedy, jnp.argmax(logits, axis=-1), sampled).astype(jnp.int32)
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(scaled, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens, logprobs


def ends_with_any(recent: jax.Array, sequences: jax.Array) -> jax.Array:
    """Whether each row's last tokens `recent [batch, L]` end with one of its `sequences [batch, S, L]`.

    Sequences are right-aligned and left-padded with -1 (wildcard); an all -1 sequence never matches.
    """
    wildcard = sequences < 0
    match = jnp.all(wildcard | (sequences == recent[:, None, :]), axis=-1)
    return jnp.any(match & ~jnp.all(wildcard, axis=-1), axis=-1)


@flax.struct.dataclass
class _LoopState:
    step: jax.Array  # int32: number of tokens emitted so far.
    next_logits: jax.Array  # [batch, vocab]
    positions: jax.Array  # [batch] position of the next token fed to the model.
    cache: Any
    tokens: jax.Array  # [batch, max_new]
    logprobs: jax.Array  # [batch, max_new]
    recent: jax.Array  # [batch, max_stop_sequence_len] the last emitted tokens (-2 before any).
    lengths: jax.Array  # [batch] tokens emitted by each row.
    done: jax.Array  # [batch] bool
    finished: jax.Array  # [batch] bool (by a stop token/sequence)
    rng: jax.Array


def _generate(
    apply_fn: ApplyFn,
    init_cache_fn: Callable[[int, int], Any],
    pad_id: int,
    max_new: int,
    params: Any,
    prompt_tokens: jax.Array,
    prompt_mask: jax.Array,
    rng: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    max_new_tokens: jax.Array,
    stop_tokens: jax.Array,
    stop_sequences: jax.Array,
) -> SamplerOutput:
    batch, prompt_len = prompt_tokens.shape
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0).astype(jnp.int32)
    cache = init_cache_fn(batch, prompt_len + max_new)
    logits, cache = apply_fn(params, prompt_tokens, positions, prompt_mask, cache)

    def cond(s: _LoopState) -> jax.Array:
        return (s.step < max_new) & ~jnp.all(s.done)

    def body(s: _LoopState) -> _LoopState:
        rng, step_rng = jax.random.split(s.rng)
        token, logprob = sample_tokens(step_rng, s.next_logits, temperature, top_k, top_p)
        token = jnp.where(s.done, pad_id, token)
        logprob = jnp.where(s.done, 0.0, logprob)
        recent = jnp.concatenate([s.recent[:, 1:], token[:, None]], axis=1)
        stopped = jnp.any(token[:, None] == stop_tokens, axis=-1) | ends_with_any(recent, stop_sequences)
        stopped &= ~s.done
        done = s.done | stopped | (s.step + 1 >= max_new_tokens)
        logits, cache = apply_fn(params, token[:, None], s.positions[:, None], jnp.ones((batch, 1), bool), s.cache)
        return _LoopState(
            step=s.step + 1,
            next_logits=logits[:, -1],
            positions=s.positions + 1,
            cache=cache,
            tokens=jax.lax.dynamic_update_slice_in_dim(s.tokens, token[:, None], s.step, axis=1),
            logprobs=jax.lax.dynamic_update_slice_in_dim(s.logprobs, logprob[:, None], s.step, axis=1),
            recent=recent,
            lengths=jnp.where(s.done, s.lengths, s.step + 1),
            done=done,
            finished=s.finished | stopped,
            rng=rng,
        )

    state = _LoopState(
        step=jnp.zeros((), jnp.int32),
        next_logits=logits[:, -1],
        positions=positions[:, -1] + 1,
        cache=cache,
        tokens=jnp.full((batch, max_new), pad_id, jnp.int32),
        logprobs=jnp.zeros((batch, max_new), jnp.float32),
        recent=jnp.full((batch, stop_sequences.shape[-1]), -2, jnp.int32),
        lengths=jnp.zeros((batch,), jnp.int32),
        done=max_new_tokens <= 0,
        finished=jnp.zeros((batch,), bool),
        rng=rng,
    )
    state = jax.lax.while_loop(cond, body, state)
    return SamplerOutput(tokens=state.tokens, logprobs=state.logprobs, lengths=state.lengths, finished=state.finished)


def _pad_table(rows: Sequence[Sequence[int]], batch: int, width: int, what: str, right_align: bool) -> np.ndarray:
    table = np.full((batch, width), -1, np.int32)
    for b, row in enumerate(rows):
        row = list(row)
        if len(row) > width:
            raise ValueError(f"row {b}: {len(row)} {what} exceed the configured maximum {width}")
        if row:
            if right_align:
                table[b, width - len(row):] = row
            else:
                table[b, : len(row)] = row
    return table


class Sampler:
    """Generates from a decoder with a KV cache; one compiled program per (batch, prompt, new-token) bucket.

    Args:
      apply_fn: `(params, tokens, positions, attention_mask, cache) -> (logits, cache)`.
      init_cache_fn: `(batch, max_len) -> cache` (created inside the jitted program).
      config: buckets, pad id and table sizes.
      mesh: when given, the batch is sharded over `data` x `fsdp` (padded to a multiple of it) and the model is
        traced under `jax.set_mesh(mesh)` and `rules`, so its logical constraints shard heads, cache etc.
      rules: logical-axis rules (default `sharding.DEFAULT_RULES`).
    """

    def __init__(
        self,
        apply_fn: ApplyFn,
        init_cache_fn: Callable[[int, int], Any],
        config: SamplerConfig = SamplerConfig(),
        mesh: Mesh | None = None,
        rules: sharding.Rules | None = None,
    ):
        self.config = config
        self.mesh = mesh
        self.rules = sharding.normalize_rules(rules)
        self._apply_fn = apply_fn
        self._init_cache_fn = init_cache_fn
        self._compiled: dict[int, Callable[..., SamplerOutput]] = {}

    def _program(self, max_new: int) -> Callable[..., SamplerOutput]:
        if max_new not in self._compiled:
            fn = functools.partial(_generate, self._apply_fn, self._init_cache_fn, self.config.pad_id, max_new)
            if self.mesh is None:
                self._compiled[max_new] = jax.jit(fn)
            else:
                rows = NamedSharding(self.mesh, P(sharding.BATCH_AXES))
                matrix = NamedSharding(self.mesh, P(sharding.BATCH_AXES, None))
                cube = NamedSharding(self.mesh, P(sharding.BATCH_AXES, None, None))
                replicated = NamedSharding(self.mesh, P())
                self._compiled[max_new] = jax.jit(
                    fn,
                    in_shardings=(None, matrix, matrix, replicated, rows, rows, rows, rows, matrix, cube),
                    out_shardings=SamplerOutput(tokens=matrix, logprobs=matrix, lengths=rows, finished=rows),
                )
        return self._compiled[max_new]

    def compiled_programs(self) -> int:
        """How many distinct programs have been compiled so far (for tests and logs)."""
        return sum(fn._cache_size() for fn in self._compiled.values())

    def generate(
        self,
        params: Any,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int | Sequence[int],
        rng: jax.Array,
        temperature: float | Sequence[float] = 0.0,
        top_k: int | Sequence[int] = 0,
        top_p: float | Sequence[float] = 1.0,
        stop_token_ids: Sequence[int] | Sequence[Sequence[int]] = (),
        stop_sequences: Sequence[Sequence[int]] | Sequence[Sequence[Sequence[int]]] = (),
    ) -> SamplerOutput:
        """Generates continuations of `prompts` (lists of token ids); returns host numpy arrays.

        Per-row arguments may be given once for all rows or as one value per row: `max_new_tokens`,
        `temperature`, `top_k`, `top_p`, `stop_token_ids` (a list of ids, or one list per row) and
        `stop_sequences` (a list of id sequences, or one such list per row).
        """
        cfg = self.config
        n = len(prompts)
        if n == 0:
            raise ValueError("no prompts")
        if any(len(p) == 0 for p in prompts):
            raise ValueError(f"empty prompt at row {next(i for i, p in enumerate(prompts) if len(p) == 0)}")
        multiple = 1 if self.mesh is None else sharding.batch_parallelism(self.mesh)
        batch = -(-n // multiple) * multiple
        prompt_len = bucket(max(len(p) for p in prompts), cfg.prompt_buckets, "prompt length")

        def per_row(value: Any, dtype: Any) -> np.ndarray:
            array = np.asarray(value, dtype)
            array = np.broadcast_to(array, (n,)) if array.ndim == 0 else array
            if array.shape != (n,):
                raise ValueError(f"expected one value or {n} values, got shape {array.shape}")
            return np.concatenate([array, np.repeat(array[-1:], batch - n)])

        new_tokens = per_row(max_new_tokens, np.int32)
        max_new = bucket(int(new_tokens.max()), cfg.new_token_buckets, "max_new_tokens")
        tokens = np.full((batch, prompt_len), cfg.pad_id, np.int32)
        mask = np.zeros((batch, prompt_len), bool)
        for b in range(batch):
            prompt = prompts[min(b, n - 1)]
            tokens[b, prompt_len - len(prompt):] = prompt
            mask[b, prompt_len - len(prompt):] = True

        is_per_row_ids = len(stop_token_ids) > 0 and not np.isscalar(stop_token_ids[0])
        stop_rows = stop_token_ids if is_per_row_ids else [stop_token_ids] * n
        is_per_row_seqs = len(stop_sequences) > 0 and len(stop_sequences[0]) > 0 and not np.isscalar(
            stop_sequences[0][0])
        seq_rows = stop_sequences if is_per_row_seqs else [stop_sequences] * n
        if len(stop_rows) != n or len(seq_rows) != n:
            raise ValueError(f"per-row stop lists need {n} rows")
        stop_table = _pad_table(list(stop_rows) + [stop_rows[-1]] * (batch - n), batch, cfg.max_stop_tokens,
                                "stop tokens", right_align=False)
        seq_table = np.full((batch, cfg.max_stop_sequences, cfg.max_stop_sequence_len), -1, np.int32)
        for b in range(batch):
            sequences = seq_rows[min(b, n - 1)]
            if len(sequences) > cfg.max_stop_sequences:
                raise ValueError(f"row {b}: {len(sequences)} stop sequences exceed {cfg.max_stop_sequences}")
            seq_table[b] = _pad_table(list(sequences), cfg.max_stop_sequences, cfg.max_stop_sequence_len,
                                      "stop-sequence tokens", right_align=True)

        args = (params, tokens, mask, rng, per_row(temperature, np.float32), per_row(top_k, np.int32),
                per_row(top_p, np.float32), new_tokens, stop_table, seq_table)
        if self.mesh is None:
            out = self._program(max_new)(*args)
        else:
            with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
                out = self._program(max_new)(*args)
        out = jax.device_get(out)
        return SamplerOutput(
            tokens=out.tokens[:n], logprobs=out.logprobs[:n], lengths=out.lengths[:n], finished=out.finished[:n]
        )


def stop_string_sequences(tokenizer: Any, stop_strings: Sequence[str]) -> list[list[int]]:
    """Token sequences that end a row early on device for each stop string.

    A string can tokenize differently in context; this returns its stand-alone tokenization and the one after
    a space and after a newline (dropping the context tokens), deduplicated. `truncate_at_stop_strings`
    makes the host-side result exact whichever tokens the model used.
    """
    sequences: list[list[int]] = []
    for text in stop_strings:
        for prefix in ("", " ", "\n"):
            context = tokenizer.encode(prefix, add_special_tokens=False) if prefix else []
            ids = tokenizer.encode(prefix + text, add_special_tokens=False)
            if ids[: len(context)] == context and len(ids) > len(context):
                ids = ids[len(context):]
            if ids and ids not in sequences:
                sequences.append(ids)
    return sequences


def truncate_at_stop_strings(
    output: SamplerOutput, tokenizer: Any, stop_strings: Sequence[str], pad_id: int
) -> tuple[SamplerOutput, list[str]]:
    """Cuts each row after the first stop string in its decoded text; returns (output, decoded texts).

    A row is cut after the shortest token prefix whose text contains the stop string; the row is then marked
    finished. Rows without a stop string are unchanged.
    """
    tokens, logprobs = output.tokens.copy(), output.logprobs.copy()
    lengths, finished = output.lengths.copy(), output.finished.copy()
    texts = []
    for b in range(tokens.shape[0]):
        ids = tokens[b, : lengths[b]].tolist()
        text = tokenizer.decode(ids)
        ends = [text.find(s) + len(s) for s in stop_strings if s in text]
        if ends:
            end = min(ends)
            lo, hi = 1, len(ids)  # Smallest k with len(decode(ids[:k])) >= end (decoded length is monotone).
            while lo < hi:
                mid = (lo + hi) // 2
                if len(tokenizer.decode(ids[:mid])) >= end:
                    hi = mid
                else:
                    lo = mid + 1
            tokens[b, lo:] = pad_id
            logprobs[b, lo:] = 0.0
            lengths[b], finished[b] = lo, True
            text = tokenizer.decode(ids[:lo])
        texts.append(text)
    return SamplerOutput(tokens=tokens, logprobs=logprobs, lengths=lengths, finished=finished), texts

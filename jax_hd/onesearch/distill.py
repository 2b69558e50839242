"""OneSearch-V2 reasoning-internalised self-distillation (spec onesearch.md §2.5, §5 "Self-distillation").

The teacher reads the prompt WITH the keyword clause (`teacher_input_ids`), the student the same prompt without it
(`input_ids`); both predict the same item-SID labels. The SFT-stage-3 loss (eq. 8):

    L = CE_focal(student) + kl_weight * KL(teacher || student) + rdrop_weight * symKL(student_1, student_2) + L_adv

* KL: forward KL of the temperature-softened distributions, fp32, times tau^2, averaged over the label positions
  (`label_mask`), teacher stop-gradient. Teacher modes: "self" (the student's own weights, no dropout), "ema" (a
  separate copy in `TrainState.extra["teacher"]`, teacher <- d * teacher + (1 - d) * student after each step) and
  "off" (no teacher pass: plain SFT, the V1 rows).
* Positions: `OneSearchModel.__call__` returns logits aligned with `labels` (index j predicts `labels[:, j]`, for
  BART and for the decoder-only qwen2 backbone whatever the prompt lengths), so teacher and student are compared at
  the SAME label positions under `label_mask`: exactly the positions that predict target tokens. The released code
  picks `labels != -100` on unshifted causal-LM logits (one position late) and tail-aligns the last
  min(#targets) positions because its teacher and student prompts differ in length; neither is needed here because
  our logits are label-aligned.
* R-Drop: a second student pass with independent dropout, symmetric KL between the two passes (needs dropout > 0).
* FGM: r_adv = eps * g / ||g||_2, g = dL_base / d(prompt input embeddings) at the student input, L_base =
  CE_focal + kl_weight * KL (the norm per example over its real prompt positions); L_adv = CE_focal (+ kl_weight *
  KL when `fgm_kl`) of a third student pass on the perturbed embeddings, r_adv held constant.
* Focal: scale * (1 - p)^gamma * CE per token (gamma 0, scale 1: `model.sequence_loss`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from jax_hd.core import sharding, train_state
from jax_hd.onesearch import model as model_lib

Array = jax.Array
MODES = ("off", "self", "ema")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """mode: "off" (plain SFT), "self" (shared weights, teacher pass stop-gradient), "ema" (EMA teacher copy);
    kl_weight alpha_KL; temperature tau (KL times tau^2); rdrop_weight alpha_R (paper 0.5, needs dropout > 0);
    fgm_epsilon (paper 0.6, 0 = off); fgm_kl: L_adv includes kl_weight * KL; focal_gamma (paper 3, 0 = plain CE);
    focal_scale (the paper's "alpha = 2" read as a scale: CONFLICT in the spec); ema_decay (mode "ema")."""

    mode: str = "self"
    kl_weight: float = 0.1
    temperature: float = 1.0
    rdrop_weight: float = 0.0
    fgm_epsilon: float = 0.0
    fgm_kl: bool = True
    focal_gamma: float = 0.0
    focal_scale: float = 1.0
    ema_decay: float = 0.999

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"DistillConfig.mode {self.mode!r} is not one of {MODES}")
        if self.temperature <= 0:
            raise ValueError(f"DistillConfig.temperature must be > 0, got {self.temperature}")
        for name in ("kl_weight", "rdrop_weight", "fgm_epsilon", "focal_gamma", "focal_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"DistillConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"DistillConfig.ema_decay must be in [0, 1], got {self.ema_decay}")

    @property
    def uses_teacher(self) -> bool:
        return self.mode != "off"


def model_dropout(model_config: model_lib.OneSearchConfig) -> float:
    """The backbone's dropout rate (qwen2 has none)."""
    return model_config.bart.dropout if model_config.backbone == "bart" else 0.0


def check_config(cfg: DistillConfig, model_config: model_lib.OneSearchConfig) -> None:
    """ValueError when an option cannot work with the model (R-Drop without dropout)."""
    if cfg.rdrop_weight > 0 and model_dropout(model_config) <= 0:
        raise ValueError(
            f"DistillConfig.rdrop_weight = {cfg.rdrop_weight} needs dropout > 0, but the {model_config.backbone} "
            f"backbone has dropout {model_dropout(model_config)} (set model.dropout or rdrop_weight = 0)"
        )


# ----------------------------------------------------------------------------------------------------------
# Losses: pure functions of arrays.


def token_cross_entropy(
    logits: Array, labels: Array, mask: Array, focal_gamma: float = 0.0, focal_scale: float = 1.0
) -> Array:
    """Mean over `mask [b, t]` of `focal_scale * (1 - p)^focal_gamma * CE` (p = softmax(logits)[label]); logits
    `[b, t, V]`, labels `[b, t]`. gamma 0 and scale 1 is `model.sequence_loss` exactly. Scalar float32 (nats)."""
    if focal_gamma == 0 and focal_scale == 1:
        return model_lib.sequence_loss(logits, labels, mask)[0]
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    label_logprob = jnp.take_along_axis(logprobs, labels[..., None], axis=-1)[..., 0]
    per_token = -label_logprob * focal_scale
    if focal_gamma != 0:
        one_minus_p = jnp.maximum(-jnp.expm1(label_logprob), 1e-12)  # the floor keeps d/dp finite for gamma < 1
        per_token = per_token * one_minus_p**focal_gamma
    weight = mask.astype(jnp.float32)
    return jnp.sum(per_token * weight) / jnp.maximum(weight.sum(), 1.0)


def token_accuracy(logits: Array, labels: Array, mask: Array) -> Array:
    """Fraction of `mask [b, t]` positions whose argmax of `logits [b, t, V]` is the label. Scalar float32."""
    return model_lib.sequence_loss(logits, labels, mask)[1]


def _kl_per_position(logp: Array, logq: Array) -> Array:
    """KL(p || q) over the last axis of log-probabilities `[..., V]` -> `[...]`."""
    return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


def _masked_mean(values: Array, mask: Array) -> Array:
    """Mean of `values [b, t]` over `mask`, ignoring whatever the masked-out positions hold (even NaN)."""
    weight = mask.astype(jnp.float32)
    return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(weight.sum(), 1.0)


def distill_kl(teacher_logits: Array, student_logits: Array, mask: Array, temperature: float = 1.0) -> Array:
    """Forward KL(softmax(z_T / tau) || softmax(z_S / tau)) * tau^2, fp32, mean over `mask [b, t]` positions.

    teacher_logits / student_logits: label-aligned `[b, t, V]` (the same positions); the teacher is stop-gradient.
    """
    tau = temperature
    logp_t = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / tau, axis=-1)
    logp_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / tau, axis=-1)
    return _masked_mean(_kl_per_position(logp_t, logp_s), mask) * tau**2


def symmetric_kl(logits_a: Array, logits_b: Array, mask: Array) -> Array:
    """R-Drop term `(KL(P_a || P_b) + KL(P_b || P_a)) / 2`, fp32, mean over `mask [b, t]`; logits `[b, t, V]`, both
    sides differentiable."""
    logp_a = jax.nn.log_softmax(logits_a.astype(jnp.float32), axis=-1)
    logp_b = jax.nn.log_softmax(logits_b.astype(jnp.float32), axis=-1)
    per_position = 0.5 * (_kl_per_position(logp_a, logp_b) + _kl_per_position(logp_b, logp_a))
    return _masked_mean(per_position, mask)


def fgm_perturbation(grad: Array, mask: Array, epsilon: float) -> Array:
    """FGM step `epsilon * g / ||g||_2` per example, the norm over its real prompt positions (`mask [b, n]`) and all
    embedding dims of `grad [b, n, d]`. Pads get 0; an all-zero row gets zeros (no NaN). `[b, n, d]` float32."""
    g = jnp.where(mask[..., None], grad.astype(jnp.float32), 0.0)
    norm = jnp.sqrt(jnp.sum(g * g, axis=(1, 2), keepdims=True))
    scale = jnp.where(norm > 0, epsilon / jnp.where(norm > 0, norm, 1.0), 0.0)
    return g * scale


def ema_update(teacher_params: Any, student_params: Any, decay: float | Array) -> Any:
    """`decay * teacher + (1 - decay) * student`, leaf by leaf (dtypes of the teacher kept)."""
    return jax.tree.map(
        lambda t, s: (decay * t.astype(jnp.float32) + (1 - decay) * s.astype(jnp.float32)).astype(t.dtype),
        teacher_params,
        student_params,
    )


# ----------------------------------------------------------------------------------------------------------
# The SDFT loss.


def sdft_loss(
    model: model_lib.OneSearchModel,
    params: Any,
    teacher_params: Any | None,
    batch: dict[str, Array],
    rng: Array,
    cfg: DistillConfig,
    train: bool,
) -> tuple[Array, dict[str, Array]]:
    """The self-distillation loss (module docstring) and its metrics, differentiable w.r.t. `params`.

    batch: `input_ids` / `input_mask` `[b, n]` (student prompt), `teacher_input_ids` / `teacher_input_mask`
    `[b, n_T]` (the prompt with the keyword clause; not read in mode "off"), `memory [b, 9, memory_dim]`, `labels` /
    `label_mask` `[b, t]`. teacher_params: the EMA teacher (mode "ema"), else ignored. train: dropout on (the
    student passes; the teacher is always deterministic). `rng` is the dropout key of student pass 1 (as
    `trainer.loss_fn` uses it); passes 2 and 3 fold in 1 and 2.
    Metrics (scalars): loss, ce, kl, rdrop, adv, accuracy (student), teacher_accuracy (not in mode "off").
    """
    check_config(cfg, model.config)
    labels, label_mask = batch["labels"], batch["label_mask"]
    uses_kl = cfg.uses_teacher and cfg.kl_weight > 0

    def student(p, key, delta=None):
        return model.apply(
            {"params": p}, batch["input_ids"], batch["input_mask"], batch["memory"], labels,
            deterministic=not train, prompt_delta=delta, rngs={"dropout": key},
        )  # fmt: skip

    def ce(logits):
        return token_cross_entropy(logits, labels, label_mask, cfg.focal_gamma, cfg.focal_scale)

    teacher_logits = None
    if cfg.uses_teacher:
        if cfg.mode == "ema":
            if teacher_params is None:
                raise ValueError('DistillConfig.mode "ema" needs teacher_params (TrainState.extra["teacher"])')
            t_params = teacher_params
        else:
            t_params = params
        teacher_logits = jax.lax.stop_gradient(
            model.apply(
                {"params": jax.lax.stop_gradient(t_params)},
                batch["teacher_input_ids"],
                batch["teacher_input_mask"],
                batch["memory"],
                labels,
                deterministic=True,
            )  # fmt: skip
        )

    def base_loss(p, delta):
        logits = student(p, rng, delta)
        kl = distill_kl(teacher_logits, logits, label_mask, cfg.temperature) if uses_kl else jnp.zeros(())
        ce_value = ce(logits)
        return ce_value + cfg.kl_weight * kl if uses_kl else ce_value, (logits, ce_value, kl)

    _, (logits, ce_value, kl) = base_loss(params, None)
    if cfg.fgm_epsilon > 0:
        zero = jnp.zeros((*batch["input_ids"].shape, model.config.d_model), jnp.float32)
        # g = dL_base / d(prompt embeds) at the same (dropout) pass; with constant params no second-order terms
        # enter the outer gradient (XLA shares the forward with the pass above).
        grad_delta = jax.grad(lambda d: base_loss(jax.lax.stop_gradient(params), d)[0])(zero)
        r_adv = jax.lax.stop_gradient(fgm_perturbation(grad_delta, batch["input_mask"], cfg.fgm_epsilon))
        adv_logits = student(params, jax.random.fold_in(rng, 2), r_adv)
        adv = ce(adv_logits)
        if uses_kl and cfg.fgm_kl:
            adv = adv + cfg.kl_weight * distill_kl(teacher_logits, adv_logits, label_mask, cfg.temperature)
    else:
        adv = jnp.zeros(())

    rdrop = jnp.zeros(())
    if cfg.rdrop_weight > 0:
        rdrop = symmetric_kl(logits, student(params, jax.random.fold_in(rng, 1)), label_mask)

    loss = ce_value
    if uses_kl:
        loss = loss + cfg.kl_weight * kl
    if cfg.rdrop_weight > 0:
        loss = loss + cfg.rdrop_weight * rdrop
    if cfg.fgm_epsilon > 0:
        loss = loss + adv
    metrics = {
        "loss": loss, "ce": ce_value, "kl": kl, "rdrop": rdrop, "adv": adv,
        "accuracy": token_accuracy(logits, labels, label_mask),
    }  # fmt: skip
    if teacher_logits is not None:
        metrics["teacher_accuracy"] = token_accuracy(teacher_logits, labels, label_mask)
    return loss, metrics


# ----------------------------------------------------------------------------------------------------------
# Train state and step.


def init_ema_teacher(state: train_state.TrainState) -> train_state.TrainState:
    """`state` with `extra["teacher"]`: a copy of the params (own buffers, same shardings; the step donates)."""
    teacher = jax.tree.map(lambda x: jnp.array(x, copy=True), state.params)
    return state.replace(extra={**state.extra, "teacher": teacher})


def teacher_shardings(shardings: train_state.TrainState) -> train_state.TrainState:
    """State shardings (e.g. `trainer.state_shardings`) extended by `extra["teacher"]` laid out like the params."""
    return shardings.replace(extra={**shardings.extra, "teacher": shardings.params})


def make_distill_step(
    model_config: model_lib.OneSearchConfig,
    tx: optax.GradientTransformation,
    shardings: train_state.TrainState,
    mesh: Mesh,
    cfg: DistillConfig,
):
    """Jitted `(state, batch, lr) -> (state, metrics)`, the calling convention of `trainer.make_train_step`: state
    donated, its layout `shardings` in and out, every batch array sharded along its leading (batch) axis, `lr`
    (float32 scalar) written into the AdamW state. Mode "ema": the state (and `shardings`, see
    `teacher_shardings`) carry `extra["teacher"]` (`init_ema_teacher`), updated after the optimizer step.
    Metrics: those of `sdft_loss` + grad_norm. Dropout is on in the student passes iff the model has dropout > 0.
    """
    check_config(cfg, model_config)
    if cfg.mode == "ema" and "teacher" not in (shardings.extra or {}):
        raise ValueError('DistillConfig.mode "ema": shardings.extra has no "teacher" (use teacher_shardings)')
    model = model_lib.OneSearchModel(model_config)
    loss = functools.partial(sdft_loss, model, cfg=cfg, train=model_dropout(model_config) > 0)

    def step(state: train_state.TrainState, batch: dict[str, Array], lr: Array):
        state, rng = state.replace(opt_state=optax.tree.set(state.opt_state, learning_rate=lr)).split_rng()
        teacher = state.extra["teacher"] if cfg.mode == "ema" else None
        (_, step_metrics), grads = jax.value_and_grad(loss, has_aux=True)(state.params, teacher, batch, rng)
        state = state.apply_gradients(grads, tx)
        if cfg.mode == "ema":
            state = state.replace(extra={**state.extra, "teacher": ema_update(teacher, state.params, cfg.ema_decay)})
        return state, {**step_metrics, "grad_norm": optax.tree.norm(grads)}

    # One sharding for the whole batch dict (a pytree prefix): leading axis over data x fsdp, the rest replicated.
    return jax.jit(
        step,
        in_shardings=(shardings, sharding.batch_sharding(mesh), None),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )

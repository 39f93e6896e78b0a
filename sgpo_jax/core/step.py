r"""The pure training step: policy forward on chosen and rejected responses, follower, update.

``sgpo_step(state, batch) -> (state, metrics)`` is a pure function of pytrees. The model is any
``apply_fn(params, input_ids [B, T], attention_mask [B, T]) -> logits [B, T, V]``; the optimizer
any optax transformation. Both, and the :class:`SGPOConfig`, are static fields of the state.

Per step, with :math:`h_i` the pair margins under the current policy:

* ``mode="dpo"``: the ``loss_type`` (:mod:`sgpo_jax.core.preference_losses`: ``sigmoid`` DPO /
  cDPO, ``robust``, ``ipo``) averaged over the pairs' masses; ``dr_dpo`` couples the batch: a
  forward pass gives every pair's DPO loss :math:`\ell_i`, the batch value :math:`L` and weights
  :math:`q_i = \partial L / \partial \ell_i`, then the leader minimizes
  :math:`\sum_i W q_i (\ell_i(\theta) - \ell_i + L) / W` (:math:`W` = the batch's mass): value
  :math:`L`, gradient :math:`\sum_i q_i \nabla\ell_i`, exact under micro-batching.
* ``mode="sgpo"``: if the batch carries follower atoms (computed per round over all pairs) they
  are used; otherwise the exact follower runs on-device on the batch's centers
  :math:`\xi = \text{stop\_gradient}(\sigma(\beta h))` (or :math:`\beta h` in margin space,
  on the window ``[min - tau, max + tau]`` of the real pairs), and the leader loss
  :func:`sgpo_jax.core.losses.sgpo_loss` is minimized with the atoms held fixed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sgpo_jax.core import follower as follower_lib
from sgpo_jax.core import losses, preference_losses
from sgpo_jax.core.follow import follow
from sgpo_jax.models.logps import chosen_rejected_logps
from sgpo_jax.models.packed import PackedPairs
from sgpo_jax.parallel.mesh import auto_mesh
from sgpo_jax.parallel.sharding import activation_sharding

Array = jax.Array
MODES = ("dpo", "sgpo")

__all__ = [
    "MODES", "SGPOConfig", "PreferenceBatch", "TrainState", "sgpo_step", "make_sgpo_step",
]


@dataclasses.dataclass(frozen=True)
class SGPOConfig:
    """Static settings of the step (hashable; validated on construction).

    Attributes:
      mode: ``"dpo"`` or ``"sgpo"``.
      beta: DPO temperature; centers are ``sigmoid(beta h)`` or ``beta h``.
      label_smoothing: DPO label smoothing (``mode="dpo"`` only): cDPO for ``loss_type="sigmoid"``,
        the assumed flip rate for ``"robust"``.
      loss_type: the ``mode="dpo"`` loss, one of
        :data:`sgpo_jax.core.preference_losses.LOSS_TYPES` (TRL's names).
      dr_dpo_beta: Dr. DPO's temperature :math:`\beta'` (``loss_type="dr_dpo"``).
      space: ``"probability"`` (authors' code) or ``"margin"`` (paper's main text).
      loss: follower loss, one of :data:`sgpo_jax.core.follower.LOSSES`; it must suit the space.
      leader_loss: loss the policy minimizes at the atoms; ``None`` = ``loss`` (consistent
        game). ``"neg_log"`` with ``loss="tangents"`` is the authors' pairing.
      num_tangents: K for the tangent losses.
      epsilon: Wasserstein radius.
      support: follower support in probability space.
      window_tau: margin-space window padding ``[min - tau, max + tau]`` over each batch.
      variant: ``"ball"`` or ``"per_entry"`` (authors' SciPy bounds), see the follower.
      p_min: floor of ``-log p`` in the leader loss.
      micro_batches: gradient accumulation: the step splits its batch into this many
        micro-batches (the pair count must divide) and gives the same update as one batch.
      group_size: ``None`` = one global ball over all pairs; ``G`` = the authors' consecutive
        groups of ``G`` pairs, each its own ball (see :func:`sgpo_jax.core.follower.worst_case`).
    """

    mode: str = "sgpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    loss_type: str = "sigmoid"
    dr_dpo_beta: float = 1.0
    space: str = "probability"
    loss: str = "tangents"
    leader_loss: Optional[str] = None
    num_tangents: int = 6
    epsilon: float = 0.01
    support: Tuple[float, float] = (0.0, 1.0)
    window_tau: float = 1.0
    variant: str = "ball"
    p_min: float = 1e-6
    micro_batches: int = 1
    group_size: Optional[int] = None

    def __post_init__(self):
        problems = []
        if self.mode not in MODES:
            problems.append(f"mode must be one of {MODES}, got {self.mode!r}")
        if not self.beta > 0:
            problems.append(f"beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            problems.append(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.loss_type not in preference_losses.LOSS_TYPES:
            problems.append(f"loss_type must be one of {preference_losses.LOSS_TYPES}, got {self.loss_type!r}")
        elif self.label_smoothing and not preference_losses.pair_loss(self.loss_type).uses_label_smoothing:
            problems.append(f"loss_type {self.loss_type!r} does not use label_smoothing "
                            f"(got {self.label_smoothing}); set it to 0")
        if not self.dr_dpo_beta > 0:
            problems.append(f"dr_dpo_beta must be > 0, got {self.dr_dpo_beta}")
        if self.space not in losses.SPACES:
            problems.append(f"space must be one of {losses.SPACES}, got {self.space!r}")
        for field in ("loss", "leader_loss"):
            name = getattr(self, field)
            if name is None and field == "leader_loss":
                continue
            if name not in follower_lib.LOSSES:
                problems.append(f"{field} must be one of {follower_lib.LOSSES}, got {name!r}")
            elif preference_losses.follower_loss(name).space != self.space:
                problems.append(f"{field} {name!r} does not suit space {self.space!r}")
        if not isinstance(self.num_tangents, int) or self.num_tangents < 1:
            problems.append(f"num_tangents must be a positive int, got {self.num_tangents!r}")
        if not self.epsilon >= 0:
            problems.append(f"epsilon must be >= 0, got {self.epsilon}")
        lo, hi = self.support
        if self.space == "probability" and not 0 <= lo < hi <= 1:
            problems.append(f"support must satisfy 0 <= lo < hi <= 1 in probability space, got {self.support}")
        support_problem = (self.space == "probability" and self.loss in follower_lib.LOSSES
                           and preference_losses.follower_loss(self.loss).support_problem(lo))
        if support_problem:
            problems.append(support_problem)
        if not self.window_tau >= 0:
            problems.append(f"window_tau must be >= 0, got {self.window_tau}")
        if self.variant not in follower_lib.VARIANTS:
            problems.append(f"variant must be one of {follower_lib.VARIANTS}, got {self.variant!r}")
        if not 0 < self.p_min < 1:
            problems.append(f"p_min must be in (0, 1), got {self.p_min}")
        if not isinstance(self.micro_batches, int) or self.micro_batches < 1:
            problems.append(f"micro_batches must be a positive int, got {self.micro_batches!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int) or self.group_size < 1):
            problems.append(f"group_size must be a positive int or None, got {self.group_size!r}")
        if problems:
            raise ValueError("invalid SGPOConfig: " + "; ".join(problems))


@struct.dataclass
class PreferenceBatch:
    """A batch of preference pairs. ``B`` pairs, ``T`` tokens (chosen and rejected may have
    different lengths; they are right-padded to a common length inside the step).

    ``*_loss_mask`` marks response tokens (the only ones scored); ``weight`` is each pair's
    mass (1 for real pairs, 0 for padding rows). ``atom_shift``/``atom_mass`` (``[B, J]``) are
    precomputed follower atoms; ``None`` runs the follower inside the step. ``support``
    (``[B, 2]``, every row the same ``(lo, hi)``) is the margin window the precomputed atoms were
    solved on; margin space needs it (the tangent knots and the atoms live on that window).
    ``packed``: the same pairs laid out with a shared prompt and/or packed rows
    (:class:`~sgpo_jax.models.packed.PackedPairs`, from :func:`sgpo_jax.data.packing.pack_batch`);
    the policy is then scored on it and the ``*_ids``/``*_attention``/``*_loss_mask`` are unused.
    """

    chosen_ids: Array
    chosen_attention: Array
    chosen_loss_mask: Array
    rejected_ids: Array
    rejected_attention: Array
    rejected_loss_mask: Array
    ref_chosen_logps: Array
    ref_rejected_logps: Array
    weight: Array
    atom_shift: Optional[Array] = None
    atom_mass: Optional[Array] = None
    support: Optional[Array] = None
    packed: Optional[PackedPairs] = None


@struct.dataclass
class TrainState:
    """Training state; ``rng`` is split every step and handed to nothing else yet (kept so
    stochastic models and in-step sampling resume deterministically). ``logps_fn(params, ids,
    attention, loss_mask) -> [rows]``, when given, replaces ``sequence_logps(apply_fn(...))``
    (e.g. the decoder's chunked log-probs, which never hold the full ``[rows, T, V]`` logits).
    ``frozen``: weights the forward pass reads but the step never updates (LoRA's base model,
    :mod:`sgpo_jax.models.lora`); when given, ``params`` are the trainable rest and the model
    functions receive ``(frozen, params)``."""

    step: Array
    params: Any
    opt_state: Any
    rng: Array
    apply_fn: Callable[[Any, Array, Array], Array] = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    config: SGPOConfig = struct.field(pytree_node=False)
    logps_fn: Optional[Callable[[Any, Array, Array, Array], Array]] = struct.field(pytree_node=False, default=None)
    frozen: Any = None

    @classmethod
    def create(cls, *, apply_fn, params, tx, config: SGPOConfig, rng: Array, logps_fn=None,
               frozen: Any = None) -> "TrainState":
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=rng,
            apply_fn=apply_fn,
            tx=tx,
            config=config,
            logps_fn=logps_fn,
            frozen=frozen,
        )


def _policy_logps(state: "TrainState", params, batch: PreferenceBatch) -> Tuple[Array, Array]:
    """One forward pass over ``[2B, T]`` (chosen rows then rejected rows)."""
    logps_fn = state.logps_fn
    if logps_fn is None:
        logps_fn = lambda p, ids, attention, mask: losses.sequence_logps(state.apply_fn(p, ids, attention), ids, mask)
    return chosen_rejected_logps(logps_fn, params if state.frozen is None else (state.frozen, params), batch)


def _in_step_follower(config: SGPOConfig, batch: PreferenceBatch, pc: Array, pr: Array):
    """Exact follower on the batch's margins from the policy log-probs ``pc, pr [B]`` (held
    constant); returns ``(batch with atom_shift/atom_mass, support, metrics)``."""
    margins = (pc - batch.ref_chosen_logps) - (pr - batch.ref_rejected_logps)
    f = follow(margins, config, weights=batch.weight)
    return batch.replace(atom_shift=f.shift, atom_mass=f.mass), f.support, f.metrics


def _pair_terms(config: SGPOConfig, pc: Array, pr: Array, mb: PreferenceBatch):
    """The ``loss_type``'s per-pair terms ``[B]`` and TRL metrics of a (micro-)batch."""
    tokens = lambda mask: jnp.sum(mask[:, 1:].astype(pc.dtype), axis=1)  # the scored positions
    return losses.pair_loss(
        pc, pr, mb.ref_chosen_logps, mb.ref_rejected_logps, loss_type=config.loss_type, beta=config.beta,
        label_smoothing=config.label_smoothing, chosen_tokens=tokens(mb.chosen_loss_mask),
        rejected_tokens=tokens(mb.rejected_loss_mask), weights=mb.weight,
    )


def _coupling(config: SGPOConfig, batch: PreferenceBatch, pc: Array, pr: Array):
    r"""A coupled ``loss_type`` on the whole batch's policy log-probs ``pc, pr [B]`` (held
    constant): ``(mass [B], offset [B])`` with mass :math:`W q_i` and offset :math:`L - \ell_i`,
    so that :math:`\sum_i \text{mass}_i (\ell_i(\theta) + \text{offset}_i)` has value :math:`W L`
    and gradient :math:`W \sum_i q_i \nabla \ell_i` (see the module docstring)."""
    pc, pr = jax.lax.stop_gradient(pc), jax.lax.stop_gradient(pr)
    terms, _ = _pair_terms(config, pc, pr, batch)
    value, q = preference_losses.pair_loss(config.loss_type).couple(terms, batch.weight, temperature=config.dr_dpo_beta)
    return jnp.sum(batch.weight) * q, value - terms


def _numerator(config: SGPOConfig, support, pc: Array, pr: Array, mb: PreferenceBatch, coupling=None):
    """``(sum of mass * loss, (mass, metrics))`` of a (micro-)batch from its policy log-probs ``pc, pr``
    (``coupling``: the micro-batch's rows of :func:`_coupling` for a coupled ``loss_type``)."""
    rc, rr = mb.ref_chosen_logps, mb.ref_rejected_logps
    if config.mode == "dpo":
        per_pair, metrics = _pair_terms(config, pc, pr, mb)
        if coupling is None:
            return jnp.sum(per_pair * mb.weight), (jnp.sum(mb.weight), metrics)
        mass, offset = coupling
        return jnp.sum(mass * (per_pair + offset)), (jnp.sum(mb.weight), metrics)
    terms, metrics = losses.sgpo_loss(
        pc, pr, rc, rr, mb.atom_shift, mb.atom_mass * mb.weight[:, None],
        beta=config.beta, space=config.space, loss=config.leader_loss or config.loss,
        num_tangents=config.num_tangents, support=support, p_min=config.p_min,
    )
    return terms.total, (terms.mass, metrics)


def _split(tree: Any, parts: int) -> Any:
    """``[B, ...] -> [parts, B / parts, ...]`` on every leaf; a
    :class:`~sgpo_jax.models.packed.PackedPairs` laid out in ``parts`` groups splits into its
    groups' rows ``[parts, R, T]`` and pairs, each group's chains re-based to its own rows: an
    entry ``c`` of group ``g`` becomes ``max(c - g R T, 0)`` (every real entry of the group lies in
    its rows, so only the unused zero entries are clipped)."""
    def leaves(x):
        return x.reshape(parts, x.shape[0] // parts, *x.shape[1:])

    def split(node):
        if not isinstance(node, PackedPairs):
            return jax.tree.map(leaves, node)
        out = jax.tree.map(leaves, node)
        offset = (jnp.arange(parts, dtype=out.ids.dtype) * out.ids[0].size)[:, None, None]
        rebase = lambda index: jnp.maximum(index - offset, 0)
        return out.replace(chosen_index=rebase(out.chosen_index), rejected_index=rebase(out.rejected_index))

    return jax.tree.map(split, tree, is_leaf=lambda node: isinstance(node, PackedPairs))


_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected")


def sgpo_step(state: TrainState, batch: PreferenceBatch) -> Tuple[TrainState, Dict[str, Array]]:
    r"""One optimizer step over the batch, as ``config.micro_batches`` micro-batches.

    The loss is ``sum(mass * loss) / sum(mass)`` over the *whole* batch: per micro-batch the
    step accumulates the gradient of the numerator and the mass, then divides, so any number of
    micro-batches gives the same update as one big batch (up to float rounding). The in-step
    follower also sees the whole batch. Returns ``(new_state, metrics)``: ``loss``, TRL's
    ``rewards/*`` and ``logps/*`` (mass-weighted), ``grad_norm``, and ``follower/*`` when the
    follower runs.

    With one micro-batch the policy runs forward once: with :math:`\ell = (\ell_c, \ell_r)` the
    policy log-probs ``[B]`` each and :math:`N(\ell; a)` the loss numerator at atoms :math:`a`,
    ``(pc, pr), pullback = jax.vjp(policy_logps, params)``, the follower's atoms
    :math:`a = F(\mathrm{stop\_gradient}(\ell))` (in-step follower only), and
    :math:`\nabla_\theta N = J_\ell(\theta)^\top \nabla_\ell N(\ell; a)` = ``pullback(grad N(pc, pr))``:
    the loss depends on the parameters only through :math:`\ell`, the atoms are constants. With
    several micro-batches and the in-step follower (or a coupled ``loss_type``), a forward pass
    computes all margins first (the follower and the coupling need the whole batch), then each
    micro-batch runs ``value_and_grad``. A packed batch (``batch.packed``) splits into
    micro-batches only when laid out in as many groups of rows (``pack_batch(..., groups=m)``):
    each micro-batch then holds its own rows and pairs (:func:`_split`).
    """
    config = state.config
    parts = config.micro_batches
    if parts > 1 and batch.packed is not None and batch.packed.groups != parts:
        raise ValueError(f"a packed batch laid out in {batch.packed.groups} group(s) of rows cannot be split into "
                         f"{parts} micro-batches: pack it with pack_batch(..., groups={parts})")
    if batch.weight.shape[0] % parts:
        raise ValueError(f"batch of {batch.weight.shape[0]} pairs is not divisible into {parts} micro-batches")
    extra: Dict[str, Array] = {}
    support = config.support
    in_step_follower = config.mode == "sgpo" and batch.atom_shift is None
    coupled = config.mode == "dpo" and preference_losses.pair_loss(config.loss_type).coupled
    coupling = None
    if config.mode == "sgpo" and not in_step_follower and config.space == "margin":
        if batch.support is None:
            raise ValueError("margin-space batches with precomputed atoms need batch.support (the window)")
        support = (batch.support[0, 0], batch.support[0, 1])
    zero = jnp.zeros((), jnp.result_type(batch.ref_chosen_logps.dtype, jnp.float32))

    def weighted(t, m, metrics):
        """The numerator, mass and mass-weighted metrics, in the accumulation dtype."""
        t, m = t.astype(zero.dtype), m.astype(zero.dtype)
        return t, m, {k: metrics[k].astype(zero.dtype) * m for k in _METRICS}

    if parts == 1:
        (pc, pr), pullback = jax.vjp(lambda p: _policy_logps(state, p, batch), state.params)
        if in_step_follower:
            batch, support, extra = _in_step_follower(config, batch, pc, pr)
        if coupled:
            coupling = _coupling(config, batch, pc, pr)
        (t, (m, metrics)), cotangents = jax.value_and_grad(
            lambda c, r: _numerator(config, support, c, r, batch, coupling), argnums=(0, 1), has_aux=True)(pc, pr)
        (grads,) = pullback(cotangents)
        total, mass, sums = weighted(t, m, metrics)
    else:
        if in_step_follower or coupled:
            logps = jax.lax.map(lambda mb: _policy_logps(state, state.params, mb), _split(batch, parts))
            pc, pr = (x.reshape(-1) for x in logps)
            if in_step_follower:
                batch, support, extra = _in_step_follower(config, batch, pc, pr)
            if coupled:
                coupling = _coupling(config, batch, pc, pr)

        def accumulate(carry, xs):
            grads, total, mass, sums = carry
            mb, mb_coupling = xs
            (t, (m, metrics)), g = jax.value_and_grad(
                lambda p: _numerator(config, support, *_policy_logps(state, p, mb), mb, mb_coupling),
                has_aux=True)(state.params)
            t, m, s = weighted(t, m, metrics)
            return (jax.tree.map(jnp.add, grads, g), total + t, mass + m, {k: sums[k] + s[k] for k in _METRICS}), None

        carry = (jax.tree.map(jnp.zeros_like, state.params), zero, zero, {k: zero for k in _METRICS})
        (grads, total, mass, sums), _ = jax.lax.scan(accumulate, carry, _split((batch, coupling), parts))
    mass = jnp.maximum(mass, jnp.finfo(mass.dtype).tiny)
    grads = jax.tree.map(lambda g: g / mass.astype(g.dtype), grads)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    rng, _ = jax.random.split(state.rng)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
        rng=rng,
    )
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    metrics = {k: v / mass for k, v in sums.items()}
    return new_state, {"loss": total / mass, "grad_norm": grad_norm, **metrics, **extra}


class _SteppedApart:
    """The jitted step ``(trainable, frozen, batch) -> (trainable, metrics)`` called as
    ``step(state, batch) -> (state, metrics)``: ``trainable`` is the state without its ``frozen``
    part (donated when the step donates), ``frozen`` is passed alone, never donated and never
    copied, and rejoins the new state as the very same arrays. :meth:`lower` lowers the same
    program from a whole state (``jax.ShapeDtypeStruct`` leaves are fine)."""

    def __init__(self, jitted):
        self.jitted = jitted

    def __call__(self, state: TrainState, batch: PreferenceBatch) -> Tuple[TrainState, Dict[str, Array]]:
        new_state, metrics = self.jitted(state.replace(frozen=None), state.frozen, batch)
        return new_state.replace(frozen=state.frozen), metrics

    def lower(self, state: TrainState, batch: PreferenceBatch):
        return self.jitted.lower(state.replace(frozen=None), state.frozen, batch)


def make_sgpo_step(
    mesh: Mesh,
    state: TrainState,
    *,
    batch_axes: Sequence[str] = ("data",),
    state_sharding: Optional[Any] = None,
    donate: bool = True,
) -> Callable[[TrainState, PreferenceBatch], Tuple[TrainState, Dict[str, Array]]]:
    """``sgpo_step`` jitted over ``mesh``: the batch split along ``batch_axes`` on its leading
    axis, the state placed by ``state_sharding`` (a :class:`TrainState` of shardings matching
    ``state``; default: replicated), metrics replicated. The state's trainable part (``step``,
    ``params``, ``opt_state``, ``rng``) is donated: updated in place. Its ``frozen`` part (LoRA's
    base) is a separate argument of the compiled program that is neither donated nor copied, so
    the caller's arrays stay valid and exist once; the returned state holds the same ``frozen``
    arrays. The pair count must be divisible by the product of the ``batch_axes`` sizes. The mesh's
    axes are used in ``Auto`` mode. The result is called as ``step(state, batch)`` and lowered
    as ``step.lower(state, batch)``."""
    mesh = auto_mesh(mesh)
    replicated = NamedSharding(mesh, P())
    if state_sharding is None:
        state_sharding = jax.tree.map(lambda _: replicated, state)
    batch_sharding = NamedSharding(mesh, P(tuple(batch_axes)))
    trainable_sharding = state_sharding.replace(frozen=None)

    def step(trainable: TrainState, frozen: Any, batch: PreferenceBatch):
        with activation_sharding(mesh):  # models' constrain_batch() calls see the mesh while tracing
            new_state, metrics = sgpo_step(trainable.replace(frozen=frozen), batch)
        return new_state.replace(frozen=None), metrics

    return _SteppedApart(jax.jit(
        step,
        in_shardings=(trainable_sharding, state_sharding.frozen, batch_sharding),
        out_shardings=(trainable_sharding, replicated),
        donate_argnums=(0,) if donate else (),
    ))

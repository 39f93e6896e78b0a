r"""Model FLOPs of one training step, from the architecture (the PaLM-paper convention).

Forward and backward, remat recomputation and the chunked head's backward recomputation *not*
counted (so ``flops / step_time`` is MFU, not HFU)::

    tokens      = pairs * 2 * seq                          (chosen + rejected rows)
    N_layers    = L * (H * (N*D + 2*K*D) + N*D * H + 3 * H * I + 2 * H) + H   (non-embedding,
                  without the output head; norms included)
    dense       = 6 * N_layers * tokens
    head        = 6 * H * V * tokens                       (the output projection; the embedding
                                                            lookup is free)
    attention   = 12 * L * N * D * seq * tokens            (QK^T and PV, full T x T as in PaLM;
                                                            ``attention_causal`` halves it)
    total       = dense + head + attention

XLA's ``compiled.cost_analysis()`` is no substitute: it counts the body of a scanned loop
(``scan_layers``, micro-batches, the chunked log-probs) once rather than per iteration, and
Pallas/Mosaic kernels (splash attention) not at all.
"""

from __future__ import annotations

from typing import Any, Dict

__all__ = ["model_flops"]


def model_flops(cfg: Any, pairs: int, seq: int) -> Dict[str, float]:
    """The documented FLOP count of one step of ``pairs`` preference pairs of ``seq`` tokens for
    the :class:`~sgpo_jax.models.DecoderConfig` ``cfg`` (see the module docstring)."""
    h, i, v, layers = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    nd, kd = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    n_layers = layers * (h * (nd + 2 * kd) + nd * h + 3 * h * i + 2 * h) + h
    tokens = pairs * 2 * seq
    dense = 6 * n_layers * tokens
    head = 6 * h * v * tokens
    attention = 12 * layers * nd * seq * tokens
    return dict(tokens=tokens, non_embedding_params=n_layers, dense=dense, head=head, attention=attention,
                total=dense + head + attention, attention_causal=attention / 2,
                total_causal=dense + head + attention / 2)

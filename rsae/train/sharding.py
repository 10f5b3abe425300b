"""Sharded (FSDP2) training of an SAE: every rank holds 1/world of each parameter, gradient and Adam state.

`shard_sae(sae, mesh)` applies `torch.distributed.fsdp.fully_shard` to an rsae SAE. `SAEModule.configure_model`
calls it under Lightning's `ModelParallelStrategy` (`rsae/configs/topk-teacher-fsdp.yaml`); plain torch code calls
it after `init_process_group` (see `tests/train/test_sharding.py`).

Placements: each parameter is sharded along its latent dimension, so that rank r holds the same block of latents
in every per-latent tensor.

* `W_dec` [d_sae, d_in]: `Shard(0)`, by rows. Both unit-norm operations of the topk / jumprelu recipe are per
  row: the gradient projection `g -= (g . w) w` and the renormalisation `w /= ||w||`. With whole rows on each rank,
  the norms and dot products are local, so no communication happens and each row comes out bit-identical to the
  unsharded computation. (`set_decoder_norm_to_unit_norm` below works on the local rows; given a `W_dec` sharded
  by columns, it falls back to DTensor ops, which all-reduce the partial norms.)
* `W_enc` [d_in, d_sae]: `Shard(1)`, by columns (dim 0 would split d_in, cutting every latent's encoder column
  across ranks). FSDP2 requires a non-zero shard dim to divide evenly: when `d_sae % world != 0` it falls back to
  `Shard(0)`, which is just as correct (nothing after the step needs encoder columns local; the forward all-gathers
  the full matrix either way).
* `b_enc`, a JumpReLU `threshold`, a rational gate's `scale_in` / `shift` / `scale_out` [d_sae], and per-latent
  gate coefficients [d_sae, p+1]: `Shard(0)`, the latent dim. Everything else (`b_dec` [d_in], shared or grouped
  gate coefficients) is small and gets FSDP's default `Shard(0)`, uneven or empty shards included.

What else sharding changes, and how the training step stays correct:

* FSDP2 all-gathers the parameters only around `forward`; the SAE is trained through `training_loss` and evaluated
  through `run` / `encode` / ..., so those methods are registered as forward methods
  (`register_fsdp_forward_method`). The calls nest (`training_loss` calls `run`): only the outermost call runs
  FSDP's hooks. Between a forward and its backward the parameters stay gathered (the SAE is the FSDP root); after a
  forward without gradient (validation) they are resharded at once, so that whatever runs next outside a forward
  (the first step's `b_dec` initialisation, the post-step renormalisation) writes into the sharded parameters that
  the optimiser and the next all-gather read.
* Outside a forward the parameters are `DTensor`s. `Parameter.data = ...` on one is silently lost (FSDP keeps
  reading its own storage): the SAE's own `set_decoder_norm_to_unit_norm` assigns `.data`, so a sharded SAE goes
  through `set_decoder_norm_to_unit_norm(sae)` here, which writes in place. The gradient projection
  (`remove_gradient_parallel_to_decoder_directions`) is in place already and works on DTensors as it is.
  `copy_full_` writes a full, replicated value (b_dec's data mean) into a sharded parameter.
* The latent codes come out of the forward whole (the weights are gathered, each rank encodes its own batch), so
  the dead-latent counters, AuxK's dead mask and the L0 controller see every latent; `SAEModule` sums the firing
  counts and averages L0 over ranks exactly as under DDP. Gradients are averaged over ranks by the reduce-scatter,
  so N ranks on batches of B tokens take the step one process takes on the N * B tokens together.
* `full_state_dict` gathers the weights (a collective: every rank must call it) for the export at the end of fit.

What sharding saves: the sharded fp32 parameters, gradients and both Adam moments (4 copies of the weights) are
split over the ranks; a forward and backward still materialise the full weights and the full gradient on each
device for their duration (one FSDP unit: the SAE's four tensors are one group). So a device needs about
2 + 4 / world copies of the weights instead of DDP's 4 (less with a bf16 `MixedPrecisionPolicy`). An SAE whose
weights alone exceed one device needs latent (tensor) parallelism, which this module does not do.

Limits: every rank builds the full SAE in host memory before it is sharded (`TeacherTraining` seeds it, so all
ranks agree). `SAEModule` shards for `fit` only; `validate` / `test` under `ModelParallelStrategy` evaluate the full
SAE on every rank, and a test run after a sharded fit in the same process is not supported (rank 0 alone runs the
LM on the SAE: run `rsae test` on the exported folder). Stage 1 (`GateCalibration`) is refused: it trains only the
gate, and DDP suits it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsae.nn.sae import SparseAutoencoder

ENTRY_METHODS = ("training_loss", "run", "encode", "decode", "pre_activations", "activate", "gate_codes")
"""The SAE methods that read its parameters and are called from outside `forward` (by `SAEModule`, evaluation,
probing); under sharding they gather the parameters like `forward` does."""


def _dtensor() -> type:
    from torch.distributed.tensor import DTensor

    return DTensor


def is_sharded(module: nn.Module) -> bool:
    """Whether `fully_shard` has been applied to `module`."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def latent_placements(sae: SparseAutoencoder, shard_size: int) -> Callable[[nn.Parameter], Any]:
    """`shard_placement_fn` for `fully_shard`: each parameter sharded on its latent dim (see the module doc)."""
    from torch.distributed.tensor import Shard

    w_enc = sae.W_enc
    d_sae = sae.cfg.d_sae

    def placement(param: nn.Parameter) -> Any:
        if param is w_enc:
            return Shard(1) if d_sae % shard_size == 0 else Shard(0)
        return Shard(0)  # W_dec rows, every [d_sae] vector, per-latent gate coefficients; the rest is small

    return placement


def _fsdp_mesh(mesh: Any) -> Any:
    """A 1-D mesh over every rank of `mesh`: the SAE has no tensor-parallel layer, so each rank of a Lightning
    `ModelParallelStrategy` mesh ('data_parallel' x 'tensor_parallel') is one shard and one data-parallel replica
    (the DataModule gives every global rank its own rows)."""
    if mesh.ndim == 1:
        return mesh
    return mesh._flatten()


def shard_sae(sae: SparseAutoencoder, mesh: Any = None, **fully_shard_kwargs: Any) -> SparseAutoencoder:
    """Apply FSDP2 to `sae` in place (idempotent) and return it.

    Args:
        sae: an rsae SAE with full, identical weights on every rank (same seed or same checkpoint).
        mesh: a `DeviceMesh`; a 2-D one (Lightning's) is flattened, every rank holding one shard. None: one mesh
            over the default process group, on CUDA if available, else CPU (gloo).
        **fully_shard_kwargs: passed on to `fully_shard` (`mp_policy`, `offload_policy`, ...);
            `shard_placement_fn` replaces `latent_placements` (the tests shard `W_dec` by columns with it).
    """
    if is_sharded(sae):
        return sae
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    if mesh is None:
        world = torch.distributed.get_world_size()
        mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (world,))
    mesh = _fsdp_mesh(mesh)
    with torch.no_grad():
        for param in sae.parameters():
            if not param.is_contiguous():  # FSDP2 shards contiguous tensors only (W_enc starts as W_dec.T)
                param.data = param.data.contiguous()
    fully_shard_kwargs.setdefault("shard_placement_fn", latent_placements(sae, mesh.size()))
    fully_shard(sae, mesh=mesh, **fully_shard_kwargs)
    depth = [0]
    for name in ENTRY_METHODS:
        if not hasattr(sae, name):
            continue
        plain = getattr(sae, name)
        register_fsdp_forward_method(sae, name)
        gathered = getattr(sae, name)
        setattr(sae, name, _entry(sae, plain, gathered, depth))
    return sae


def _entry(sae: nn.Module, plain: Callable[..., Any], gathered: Callable[..., Any], depth: list[int]
           ) -> Callable[..., Any]:
    @functools.wraps(plain)
    def method(*args: Any, **kwargs: Any) -> Any:
        if depth[0]:  # nested in another entry method (or in forward): the parameters are gathered already
            return plain(*args, **kwargs)
        depth[0] += 1
        try:
            out = gathered(*args, **kwargs)
        finally:
            depth[0] -= 1
        if not torch.is_grad_enabled():
            sae.reshard()  # no backward will: back to the sharded parameters (see the module doc)
        return out

    return method


@torch.no_grad()
def set_decoder_norm_to_unit_norm(sae: SparseAutoencoder) -> None:
    """`sae.set_decoder_norm_to_unit_norm()`, also for a sharded SAE (in place, on the local rows)."""
    w = sae.W_dec
    if not isinstance(w, _dtensor()):
        if is_sharded(sae):  # gathered copies, between a forward and its backward: a write here would be lost
            raise RuntimeError("renormalise the decoder of a sharded SAE after the optimiser step, not while its "
                               "parameters are gathered for a forward / backward")
        sae.set_decoder_norm_to_unit_norm()
        return
    from torch.distributed.tensor import Shard

    if any(isinstance(p, Shard) and p.dim % w.ndim == 1 for p in w.placements):
        # Rows split across ranks: DTensor's norm all-reduces the partial sums of squares.
        w.copy_(F.normalize(w.float(), dim=-1).to(w.dtype))
        return
    local = w.to_local()  # whole rows: the same arithmetic as the unsharded method, row by row
    local.copy_(F.normalize(local.float(), dim=-1).to(local.dtype))


@torch.no_grad()
def copy_full_(param: Tensor, value: Tensor) -> None:
    """`param.copy_(value)` for a full `value` (the same on every rank), also when `param` is sharded."""
    if isinstance(param, _dtensor()):
        from torch.distributed.tensor import distribute_tensor

        # src_data_rank=None: every rank cuts its own shard out of its (identical) copy; no communication.
        value = distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements,
                                  src_data_rank=None)
    param.copy_(value)


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """`module.state_dict()` with sharded tensors gathered; a collective when `module` is sharded (every rank
    calls it; rank 0 gets the full state on CPU, the others an empty dict)."""
    state = module.state_dict()
    if not any(isinstance(v, _dtensor()) for v in state.values()):
        return state
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

"""Training on several processes: torchrun's process group, FSDP2 sharding, full-state checkpoints.

Glossary:

    w   world size: processes in the run (one per GPU, or several on the CPU for the tests)
    p   this process's rank, 0 .. w-1
    b   global batch: sequences per optimizer step over all processes; each process takes b/w

One loop for one process and for many: `minijamba.training.train.train` calls `setup` (which joins the
process group when torchrun started this process, and does nothing otherwise), then `prepare` on
the model, and reads and writes checkpoints through `model_state` / `optimizer_state` /
`load_model_state` / `load_optimizer_state` here, which fall through to `minijamba.training.checkpoint`
when the model is not sharded. PyTorch's own stack does the work:

    process group   torch.distributed, from torchrun's RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT;
                    NCCL between GPUs (each process takes cuda:LOCAL_RANK), gloo on the CPU
    sharding        FSDP2 (`fully_shard`): each decoder layer is one unit (its Mamba mixer, if it has
                    one, a unit of its own inside it), the root (embedding, final norm, LM head)
                    another. Each process keeps 1/w of every parameter, of its gradient and of AdamW's
                    moments; a unit's full parameters are all-gathered just before it runs and freed
                    after, gradients are reduce-scattered (averaged) as backward leaves it
    precision       on GPUs the gathered parameters are bf16 and gradients are reduced in fp32
                    (`MixedPrecisionPolicy`); the sharded master weights and AdamW stay fp32. The
                    Mamba mixers are gathered in fp32 and left to autocast, as on one GPU: the
                    recurrence is sensitive to A = -exp(A_log), D and the Δ bias, which the model keeps
                    in fp32 (mamba-ssm's authors advise the same), and the mixers are a small part of
                    the parameters (7% of the 8-layer benchmark model, 6% of a full-width block).
                    On the CPU everything is fp32
    data            every process takes its own rows p*b/w .. (p+1)*b/w of the same global batch
                    (`minijamba.training.data` batches are a pure function of seed and step)
    checkpoints     the full (unsharded) state is gathered to rank 0 on the CPU
                    (`get_model_state_dict` / `get_optimizer_state_dict` with full_state_dict) and
                    rank 0 writes the ordinary single-process checkpoint. Resuming reads that full
                    state and lets each process keep its shard (`set_model_state_dict` /
                    `set_optimizer_state_dict`), so a run saved on w processes resumes on any other w

Why the loss is the single-process loss: each process's cross-entropy is the mean over its own
targets and FSDP averages the gradients, which is the mean over the global batch when every
process holds as many targets as the others (true of both tasks: every text position is a target,
every MQAR sequence has Q answers). The MoE load-balancing loss n * sum_i f_i P_i is not a mean over
tokens, so each process counts f (the fraction of assignments per expert) over the global batch
(one all-reduce of n numbers per MoE layer; `SparseMoE.balance_group`); with the local P the mean
over processes is then the global batch's loss, and so are the averaged gradients.

Activation checkpointing (`checkpoint_layers`, on one process too): each decoder layer keeps only
its input for backward and runs its forward again there, instead of keeping every intermediate
tensor. Memory for activations falls from all layers' intermediates to one layer's, for about a
third more compute.

Decisions that must be the same on every process (stop on Ctrl-C or at the time budget, the
schedule's length estimated from measured speed) go through `any_rank` and `from_rank0`, on a
gloo group on the CPU, so they never wait for the GPU.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from minijamba.training import checkpoint
from minijamba.runtime import dist_info, resolve_device

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_control = None  # the gloo group for decisions (the default group itself when that is gloo)


# --- the process group -------------------------------------------------------------------------
def launched_by_torchrun() -> bool:
    """True when torchrun (or `python -m torch.distributed.run`) started this process with w > 1."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device_name: str = "auto") -> torch.device:
    """This process's device, after joining torchrun's process group if there is one to join.

    One process: `resolve_device(device_name)`. Under torchrun with w > 1: NCCL with
    cuda:LOCAL_RANK when the device is a GPU, gloo on the CPU. Idempotent: a group that is already
    initialised (by the caller, or by an earlier call) is used as it is.
    """
    import torch.distributed as dist

    device = resolve_device(device_name)
    if not (launched_by_torchrun() or (dist.is_available() and dist.is_initialized())):
        return device
    if not dist.is_available():
        raise ValueError("this PyTorch build has no torch.distributed: run one process (python, not torchrun)")
    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing and not dist.is_initialized():
        raise ValueError(
            f"WORLD_SIZE is set but {', '.join(missing)} is not: start several processes with "
            f"torchrun --nproc-per-node N, or unset WORLD_SIZE for one process"
        )
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.index is not None and device.index != local:
            raise ValueError(
                f"--device {device_name}: under torchrun each process uses the GPU of its LOCAL_RANK "
                f"(this one cuda:{local}); pass --device cuda or auto"
            )
        if local >= torch.cuda.device_count():
            raise ValueError(
                f"torchrun started a process with LOCAL_RANK {local} but this machine has "
                f"{torch.cuda.device_count()} GPUs: use --nproc-per-node {torch.cuda.device_count()} or fewer"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    global _control
    if not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    if _control is None:
        gloo = dist.get_backend() == "gloo"
        _control = dist.group.WORLD if gloo else dist.new_group(backend="gloo")
    return device


def shutdown() -> None:
    """Leave the process group (if this process is in one)."""
    import torch.distributed as dist

    global _control
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _control = None


def is_main() -> bool:
    return dist_info()[0] == 0


def any_rank(*flags: bool) -> tuple[bool, ...]:
    """Each flag, True if it is True on any process (one process: the flags themselves)."""
    if dist_info()[1] == 1:
        return tuple(bool(f) for f in flags)
    import torch.distributed as dist

    t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_control)
    return tuple(bool(v) for v in t.tolist())


def from_rank0(value):
    """Rank 0's `value` (any picklable object) on every process."""
    if dist_info()[1] == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


def gather_objects(value) -> list:
    """Every process's `value` (any picklable object), in rank order, on every process."""
    world = dist_info()[1]
    if world == 1:
        return [value]
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, value, group=_control)
    return out


def barrier() -> None:
    if dist_info()[1] > 1:
        import torch.distributed as dist

        dist.barrier(group=_control)


# --- the model ---------------------------------------------------------------------------------
def checkpoint_layers(model: nn.Module) -> None:
    """Activation checkpointing per decoder layer: a training forward keeps only the layer's input
    and recomputes the rest in backward. The module tree (and so every state-dict name) is
    unchanged; decoding with an inference state, and forwards without gradients, run as before."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.layers:
        if getattr(layer, "_checkpointed", False):
            continue
        inner = layer.forward

        def forward(x, state=None, mask=None, seq_idx=None, *, _inner=inner):
            if state is None and torch.is_grad_enabled():
                return checkpoint(_inner, x, state, mask, seq_idx, use_reentrant=False)
            return _inner(x, state, mask, seq_idx)

        layer.forward = forward
        layer._checkpointed = True


def shard(model: nn.Module, device: torch.device, mesh=None, param_dtype=None) -> nn.Module:
    """FSDP2 over `mesh` (default: all processes): one unit per Mamba mixer and per decoder layer,
    then the root. The units other than the Mamba mixers compute with `param_dtype` parameters and
    reduce gradients in fp32 (default: bf16 on GPUs; on the CPU the parameters' own dtype); the
    Mamba mixers always in their own dtype (see the docstring). In place; returns `model`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from minijamba.model.moe import SparseMoE

    if mesh is None:
        mesh = init_device_mesh(device.type, (dist_info()[1],))
    if param_dtype is None and device.type == "cuda":
        param_dtype = torch.bfloat16
    fp32 = MixedPrecisionPolicy()  # parameters and reduction in their own dtype
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else fp32
    for layer in model.layers:
        if hasattr(layer, "mamba"):
            fully_shard(layer.mamba, mesh=mesh, mp_policy=fp32)  # inner unit first: A_log, D, Δ bias in fp32
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)  # the rest: embedding, final norm, LM head
    group = mesh.get_group()
    for module in model.modules():
        if isinstance(module, SparseMoE):
            module.balance_group = group  # count f over the global batch (see the docstring)
    return model


def prepare(model: nn.Module, device: torch.device, checkpoint_activations: bool = False) -> nn.Module:
    """The model as the loop trains it: layers checkpointed if asked, then sharded over the
    processes if there are several. Build the optimizer after this (sharding replaces parameters)."""
    if checkpoint_activations:
        checkpoint_layers(model)
    if dist_info()[1] > 1:
        shard(model, device)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradient norm over all parameters (over all shards when sharded); the norm before,
    as a 0-d tensor on the device (reading it would wait for the device)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(norm, "full_tensor"):  # a DTensor: the norm over every shard
        norm = norm.full_tensor()
    return norm


# --- checkpoints -------------------------------------------------------------------------------
def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """`checkpoint.model_state`, for a sharded model too: the full weights on rank 0 (other
    ranks get {}; every rank must call this, it gathers)."""
    if not is_sharded(model):
        return checkpoint.model_state(model)
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd = get_model_state_dict(model, options=_full_options(cpu_offload=True))
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return {k: v.contiguous() for k, v in sd.items()}


def optimizer_state(model: nn.Module, optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """`checkpoint.optimizer_state`, for a sharded model too (full state on rank 0; collective)."""
    if not is_sharded(model):
        return checkpoint.optimizer_state(model, optimizer)
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
    tensors = {
        f"{name}/{key}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().contiguous()
        for name, state in osd.get("state", {}).items()
        for key, v in state.items()
    }
    return tensors, osd.get("param_groups", [])


def load_model_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """`checkpoint.load_model_state`, for a sharded model too: each process keeps its shard."""
    if not is_sharded(model):
        return checkpoint.load_model_state(model, tensors, source=source)
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    expected = checkpoint.model_state_shapes(model)  # global shapes
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise checkpoint.CheckpointError(f"{source} does not fit the model in config.json: {what}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise checkpoint.CheckpointError(
                f"{source}: {name} has shape {tuple(tensors[name].shape)}, the model in config.json needs {shape}"
            )
    set_model_state_dict(model, dict(tensors), options=_full_options())


def load_optimizer_state(model: nn.Module, optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    """`checkpoint.load_optimizer_state`, for a sharded model too: each process keeps its shard."""
    if not is_sharded(model):
        return checkpoint.load_optimizer_state(model, optimizer, tensors, groups)
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = {n for n, _ in model.named_parameters()}
    saved = {n for g in groups for n in g["params"]}
    if len(groups) != len(optimizer.param_groups) or saved != names:
        raise checkpoint.CheckpointError(
            f"{checkpoint.OPTIMIZER} does not fit the model: its parameter groups name other parameters"
        )
    state: dict[str, dict] = {}
    for key, value in tensors.items():
        name, _, field = key.partition("/")
        state.setdefault(name, {})[field] = value
    osd = {"state": state, "param_groups": [dict(g) for g in groups]}
    set_optimizer_state_dict(model, optimizer, osd, options=_full_options())

"""End to end on a GPU: minijamba --fast against transformers' JambaForCausalLM (issue 5, point 2).

The 8-layer config of issue 5 (hidden 1024, intermediate 2816, 16 experts top-2, 16 query and 4
key/value heads, vocab 32000, l=8 a:m=1:7 e=2; about 0.7B parameters), with the same random weights
in every implementation: minijamba draws them once, transformers gets them by name (its keys are
ours with a `model.` prefix), and their logits are compared before anything is timed. One process,
one implementation at a time, each model built fresh for each measurement:

    train     tokens/s of one optimizer step on batch 4 x 2048: forward, backward, AdamW; float32
              weights under bf16 autocast (how train.py trains; transformers: bf16 weights, the
              setting its mamba-ssm path can train), fused AdamW, the loss with the router's
              load-balancing term in both (transformers: output_router_logits=True)
    prefill   tokens/s of one prompt of 4K and of 16K tokens at batch 1, bf16 weights, filling the
              inference cache, logits of the last position only (what generation does)
    decode    tokens/s of greedy decoding at batch 1 after a 1K-token prompt, bf16 weights, steady
              state (after warm-up steps; a graph's capture is in the warm-up). minijamba: CUDA graph
              replays (minijamba.inference.cuda_graph), and also its ordinary eager step ("no graph");
              transformers: its forward with its cache in a plain loop (generate() adds overhead)
    memory    peak allocated GPU memory of each measurement, weights and optimizer included

Implementations (rows):

    minijamba --fast            the scan backend --fast picks (backends.best_available(), the same
                                for train_tiny.py and generate.py), eager PyTorch
    minijamba --fast, bf16 weights   the same, trained with bf16 weights as transformers is (train only)
    minijamba triton            our Triton scan kernels, eager PyTorch
    minijamba mamba_ssm         mamba-ssm's scan kernels, eager PyTorch (train and prefill)
    minijamba triton+compile    the triton backend under torch.compile (training and prefill: the whole
                                model; decoding: the step, compiled, then captured in CUDA graphs)
    ... , CUDA graphs           the same with mode="reduce-overhead": the compiled training step
                                replayed as CUDA graphs, no launch overhead (train only)
    ... , bf16 weights          the compiled model trained with bf16 weights, as transformers
                                trains (train only); also with CUDA graphs
    ... , compiled AdamW        and the optimizer's step compiled too (torch.compile of a foreach
                                AdamW: its own fused kernels, in place of the fused CUDA AdamW)
    transformers                JambaForCausalLM with the kernels it finds (printed: mamba-ssm's scan
                                and step, causal-conv1d's convolution), its default attention and experts

    python bench/gpu_e2e.py                   # everything, about 5 minutes on an H100
    python bench/gpu_e2e.py --only fast transformers --what decode
    python bench/gpu_e2e.py --smoke           # tiny sizes on the CPU: every code path, no timing value
                                              # (triton rows on the reference scan, torch.compile traces only)

A compact table goes to stdout at the end; every number to JSON (--out, default $OUT/gpu_e2e.json
when $OUT is set, else gpu_e2e.json), rewritten after each measurement so that a run cut short keeps
what it measured. Sections that would not finish within --budget seconds are skipped, and said so.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minijamba import Jamba, JambaConfig, kernels as backends
from minijamba.inference.cuda_graph import DecodeStep
from minijamba.model.jamba import cast_parameters
from minijamba.runtime import scan_backend_for

CONFIG = dict(
    vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
    num_attention_heads=16, num_key_value_heads=4, attn_layer_period=8, attn_layer_offset=4,
    num_experts=16, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
    mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, tie_word_embeddings=False,
)  # fmt: skip
SMOKE_CONFIG = dict(CONFIG, vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                    num_key_value_heads=2, num_experts=4)  # fmt: skip
SIZES = {
    "full": dict(batch=4, seq=2048, train_warmup=3, train_iters=15, prefill=(4096, 16384), prefill_iters=3,
                 prompt=1024, decode=128, decode_warmup=8, parity_len=256),
    "smoke": dict(batch=2, seq=32, train_warmup=1, train_iters=1, prefill=(48, 96), prefill_iters=1,
                  prompt=16, decode=4, decode_warmup=2, parity_len=16),
}  # fmt: skip
# Rows: (key, label, scan backend, torch.compile? True, or its mode)
IMPLS = {
    "fast": ("minijamba --fast", "fast", False),
    "fast_bf16": ("minijamba --fast, bf16 weights", "fast", False),
    "triton": ("minijamba triton", "triton", False),
    "mamba_ssm": ("minijamba mamba_ssm", "mamba_ssm", False),
    "compile": ("minijamba triton+compile", "triton", True),
    "compile_graphs": ("minijamba triton+compile, CUDA graphs", "triton", "reduce-overhead"),
    "compile_bf16": ("minijamba triton+compile, bf16 weights", "triton", True),
    "compile_graphs_bf16": ("minijamba triton+compile, CUDA graphs, bf16 weights", "triton", "reduce-overhead"),
    "compile_graphs_opt_bf16": ("minijamba triton+compile, CUDA graphs, compiled AdamW, bf16 weights", "triton",
                                "reduce-overhead"),
    "transformers": ("transformers", None, False),
}
# Seconds each section needs at the least on an H100, to skip what would not finish in the budget.
NEEDS = {"train": 40, "prefill": 30, "decode": 20, "train+compile": 200, "prefill+compile": 120, "decode+compile": 90}


class Run:
    """The results so far, the clock, and the JSON file they are written to after each change."""

    def __init__(self, args, device):
        self.args, self.device, self.t0 = args, device, time.perf_counter()
        self.meta = meta(args, device)
        self.rows: list[dict] = []
        self.out = Path(args.out)
        self.profiles = self.out.with_name(self.out.stem + "_profiles.txt")
        if self.profiles.exists():
            self.profiles.unlink()

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.t0)

    def add(self, **row) -> dict:
        row = {"impl": row.pop("impl"), "measure": row.pop("measure"), **row}
        self.rows.append(row)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
        print("RESULT", json.dumps(shown), flush=True)
        self.save()
        return row

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_name(self.out.name + ".tmp")
        tmp.write_text(json.dumps({"meta": self.meta, "rows": self.rows}, indent=1) + "\n")
        os.replace(tmp, self.out)


def meta(args, device) -> dict:
    import transformers

    m = dict(
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), command="python bench/gpu_e2e.py " + " ".join(args.argv),
        torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        sizes=SIZES["smoke" if args.smoke else "full"], backends_available=backends.available(),
        fast_backend=backends.best_available(),
        config=SMOKE_CONFIG if args.smoke else CONFIG,
    )  # fmt: skip
    for name in ("mamba_ssm", "causal_conv1d", "triton"):
        try:
            from importlib.metadata import version

            m[name] = version(name.replace("_", "-"))
        except Exception:  # noqa: BLE001 - not installed, or no metadata
            m[name] = None
    return m


# --- the models ---------------------------------------------------------------------------------


def config_for(args, backend: str | None = None, training: bool = True) -> JambaConfig:
    if backend == "fast":  # what --fast picks: train_tiny.py's choice to train, generate.py's to infer
        backend = scan_backend_for(True)
    if args.smoke and backend in ("triton", "mamba_ssm"):
        backend = "reference"  # no GPU: the triton rows check their code path with the reference scan
    return JambaConfig(**(SMOKE_CONFIG if args.smoke else CONFIG), scan_backend=backend)


def random_weights(args, device) -> dict[str, torch.Tensor]:
    """minijamba's initialisation, drawn once (on the device: fast), kept on the host in float32."""
    torch.manual_seed(0)
    with torch.device(device):
        model = Jamba(config_for(args))
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    del model
    return sd


def build_minijamba(args, sd, device, backend: str, dtype, training: bool = False) -> Jamba:
    """float32 for training; in bf16 A_log, D and the Δ bias stay float32, as load_hf keeps them."""
    with torch.device("meta"):
        model = Jamba(config_for(args, backend, training))
    model = model.to_empty(device=device)
    model.load_state_dict(sd)  # copies: `sd` stays as drawn, whatever training does to the model
    return cast_parameters(model, dtype)


def load_mamba_kernels() -> None:
    """Import mamba-ssm's kernels the way minijamba's adapter does, before transformers looks for them:
    where mamba_ssm's own __init__ fails to import (its optional Mamba-3 modules), transformers would
    otherwise fall back to its PyTorch loop without a word."""
    if "mamba_ssm" in backends.available():
        backends.get("mamba_ssm")


def build_transformers(args, sd, device, dtype):
    """JambaForCausalLM with our weights: its state dict keys are ours with `model.` in front (the LM
    head has none). If this transformers holds its experts otherwise, go through a checkpoint."""
    import transformers

    load_mamba_kernels()
    hf_config = transformers.JambaConfig(**config_for(args).to_hf())
    try:
        with torch.device("meta"):
            model = transformers.JambaForCausalLM(hf_config)
        model = model.to_empty(device=device)
        model.load_state_dict({k if k == "lm_head.weight" else f"model.{k}": v for k, v in sd.items()})
    except (RuntimeError, ValueError, KeyError):
        import tempfile

        from minijamba import save_hf

        with tempfile.TemporaryDirectory() as tmp:
            save_hf(build_minijamba(args, sd, "cpu", "reference", torch.float32), Path(tmp) / "ckpt")
            model = transformers.JambaForCausalLM.from_pretrained(Path(tmp) / "ckpt", dtype=torch.float32)
    return model.to(device, dtype)


def hf_prefill(model, ids):
    """transformers' forward over a prompt, keeping its cache. transformers 5 makes the cache itself;
    older versions return none unless handed their HybridMambaAttentionDynamicCache."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    if out.past_key_values is None:
        import transformers.models.jamba.modeling_jamba as mj

        cache = mj.HybridMambaAttentionDynamicCache(model.config, ids.shape[0], dtype=model.dtype, device=ids.device)
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out


def hf_kernels() -> dict:
    """What transformers' Jamba calls for each kernel it can take from a package: the function's
    module (mamba_ssm..., causal_conv1d...), or transformers' own PyTorch fallback."""
    import transformers.models.jamba.modeling_jamba as mj

    out = {}
    names = ("mamba_selective_scan", "mamba_selective_state_update", "causal_conv1d_fn",
             "causal_conv1d_update", "selective_scan_fn", "selective_state_update", "mamba_inner_fn")  # fmt: skip
    for name in names:
        fn = getattr(mj, name, None)
        if fn is None:
            continue
        found = getattr(fn, "__module__", "?")
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                v = cell.cell_contents
            except ValueError:
                continue
            module = getattr(v, "__module__", None) or ""
            if callable(v) and module and not module.startswith(("transformers", "functools", "torch")):
                found = module
        out[name] = found
    if hasattr(mj, "is_fast_path_available"):  # transformers before the per-kernel fallbacks
        out["is_fast_path_available"] = bool(mj.is_fast_path_available)
    return out


def cleanup() -> None:
    """Free what the last measurement left (torch.compile's caches hold its model) and restart the
    peak-memory count."""
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def timed(fn, warmup: int, iters: int, device) -> list[float]:
    """Seconds of each of `iters` calls of fn after `warmup` untimed ones, the device synchronised."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


@contextlib.contextmanager
def deadline(seconds: float):
    """TimeoutError if the block runs longer than `seconds` (a torch.compile that would eat the budget)."""

    def stop(*_):
        raise TimeoutError(f"over the {seconds:.0f} s left in the budget")

    if not hasattr(signal, "SIGALRM") or seconds <= 0:
        yield
        return
    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(max(1, int(seconds)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def compile_options(args, compiled=True) -> dict:
    if args.smoke:
        return {"backend": "eager"}  # the CPU smoke run traces, compiles nothing
    return {"mode": compiled} if isinstance(compiled, str) else {}


# --- the measurements ---------------------------------------------------------------------------


def parity(run: Run, sd) -> None:
    """Same weights, same logits: float32, minijamba (--fast backend) against transformers."""
    args, device = run.args, run.device
    n = SIZES["smoke" if args.smoke else "full"]["parity_len"]
    ids = torch.randint(0, config_for(args).vocab_size, (2, n), generator=torch.Generator().manual_seed(3))
    ids = ids.to(device)
    with torch.no_grad():
        ours = build_minijamba(args, sd, device, "fast", torch.float32).eval()
        a = ours(ids).float()
        del ours
        theirs = build_transformers(args, sd, device, torch.float32).eval()
        b = theirs(input_ids=ids, use_cache=False).logits.float()
        info = dict(attn=getattr(theirs.config, "_attn_implementation", None),
                    experts=getattr(theirs.config, "_experts_implementation", None))  # fmt: skip
        del theirs
    rel = ((a - b).norm() / b.norm()).item()
    run.meta.update(transformers_kernels=hf_kernels(), transformers_impl=info)
    run.add(impl="minijamba vs transformers", measure="parity", logits_rel_err=rel, tokens=ids.numel())


def train(run: Run, key: str, sd) -> None:
    args, device = run.args, run.device
    label, backend, compiled = IMPLS[key]
    s = SIZES["smoke" if args.smoke else "full"]
    # transformers' Jamba with mamba-ssm cannot train fp32 weights under bf16 autocast (its B/C reach
    # the CUDA scan in fp32 next to a bf16 input: a dtype error), so it trains in pure bf16 weights:
    # its best working setting, and a cheaper one (half the weight and optimizer traffic).
    # The "bf16 weights" row trains minijamba the same way, for a like-for-like comparison.
    bf16 = (key == "transformers" or key.endswith("_bf16")) and device.type == "cuda"
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = (build_transformers(args, sd, device, dtype) if key == "transformers"
             else build_minijamba(args, sd, device, backend, dtype, training=True)).train()  # fmt: skip
    if key != "transformers":
        run.meta.setdefault("train_backend", {})[label] = model.config.scan_backend
    net = torch.compile(model, **compile_options(args, compiled)) if compiled else model
    # Fused AdamW on a GPU for every row (what train.py uses, and transformers' Trainer's default)
    # but the compiled-AdamW one.
    compiled_opt = "_opt" in key
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=(device.type == "cuda" and not compiled_opt) or None)
    opt_step = torch.compile(opt.step, **compile_options(args)) if compiled_opt else opt.step
    g = torch.Generator(device=device).manual_seed(1)
    shape = (s["batch"], s["seq"] + 1)
    batches = [torch.randint(0, model.config.vocab_size, shape, device=device, generator=g) for _ in range(2)]
    calls = [0]

    def step():
        ids = batches[calls[0] % 2]
        calls[0] += 1
        if compiled == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are free again
        opt.zero_grad(set_to_none=True)
        with autocast(device):
            if key == "transformers":
                x = ids[:, :-1]
                loss = net(input_ids=x, labels=x, output_router_logits=True, use_cache=False).loss
            else:
                loss = net(ids[:, :-1], targets=ids[:, 1:])[1]
        loss.backward()
        opt_step()

    cleanup()
    t_first = time.perf_counter()
    step()  # the first step builds (and under torch.compile compiles) everything
    sync(device)
    first = time.perf_counter() - t_first
    times = timed(step, s["train_warmup"] - 1, s["train_iters"], device)
    # The same steps back to back, as a training loop runs them, one sync at the end: the host
    # prepares a step while the device still runs the last one (no per-step wait in between).
    t0 = time.perf_counter()
    for _ in range(s["train_iters"]):
        step()
    sync(device)
    back_to_back = (time.perf_counter() - t0) / s["train_iters"]
    tokens = s["batch"] * s["seq"]
    run.add(impl=label, measure="train", tok_s=tokens / statistics.median(times), step_s=times,
            tok_s_back_to_back=tokens / back_to_back,
            first_step_s=first, peak_gib=peak_gib(device), batch=s["batch"], seq=s["seq"])  # fmt: skip
    profile(run, f"{label} train, one step", step)


def prefill(run: Run, key: str, sd) -> None:
    args, device = run.args, run.device
    label, backend, compiled = IMPLS[key]
    s = SIZES["smoke" if args.smoke else "full"]
    model = (build_transformers(args, sd, device, torch.bfloat16) if key == "transformers"
             else build_minijamba(args, sd, device, backend, torch.bfloat16)).eval()  # fmt: skip
    net = torch.compile(model, **compile_options(args, compiled)) if compiled else model
    for n in s["prefill"]:
        ids = torch.randint(0, model.config.vocab_size, (1, n), device=device)

        @torch.inference_mode()
        def once(ids=ids, n=n):
            if key == "transformers":
                return hf_prefill(model, ids).logits
            return net(ids, state=model.new_state(1, n), logits_to_keep=1)

        cleanup()
        t_first = time.perf_counter()
        once()  # builds (and under torch.compile compiles for this length) everything
        sync(device)
        first = time.perf_counter() - t_first
        times = timed(once, 0, s["prefill_iters"], device)
        run.add(impl=label, measure=f"prefill {n}", tok_s=n / statistics.median(times), s=times,
                first_s=first, peak_gib=peak_gib(device), tokens=n)  # fmt: skip
        if n == max(s["prefill"]):
            profile(run, f"{label} prefill {n}", once)


@torch.inference_mode()
def decode(run: Run, key: str, sd) -> None:
    """Greedy tokens/s at batch 1 after the prompt. minijamba: CUDA graph replays, checked during the
    warm-up against the ordinary eager step fed the same tokens; the --fast row also times that
    eager step ("no graph")."""
    args, device = run.args, run.device
    label, backend, compiled = IMPLS[key]
    s = SIZES["smoke" if args.smoke else "full"]
    model = (build_transformers(args, sd, device, torch.bfloat16) if key == "transformers"
             else build_minijamba(args, sd, device, backend, torch.bfloat16)).eval()  # fmt: skip
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, model.config.vocab_size, (1, s["prompt"]), generator=g).to(device)
    n, warm = s["decode"], s["decode_warmup"]
    cleanup()

    def steps(step, token, count):
        """Time `count` greedy steps from `token`; returns (seconds, last token)."""
        sync(device)
        t0 = time.perf_counter()
        for _ in range(count):
            token = step(token)
        sync(device)
        return time.perf_counter() - t0, token

    if key == "transformers":
        out = hf_prefill(model, prompt)
        cache = out.past_key_values

        def step(t):
            logits = model(input_ids=t, past_key_values=cache, use_cache=True).logits
            return logits[:, -1].argmax(-1, keepdim=True)

        _, token = steps(step, out.logits[:, -1].argmax(-1, keepdim=True), warm)
        dt, token = steps(step, token, n)
        run.add(impl=label, measure="decode", tok_s=n / dt, s=dt, peak_gib=peak_gib(device),
                prompt=s["prompt"], tokens=n)  # fmt: skip
        profile(run, f"{label} decode, 16 steps", lambda: steps(step, token, 16))
        return

    capacity = s["prompt"] + warm + n + 16 + 1  # 16: the profiled steps
    graph_state, eager_state = model.new_state(1, capacity), model.new_state(1, capacity)
    first = model(prompt, state=graph_state, logits_to_keep=1)[:, -1].argmax(-1)
    model(prompt, state=eager_state, logits_to_keep=1)

    def eager(t):
        return model(t[:, None], state=eager_state, logits_to_keep=1)[:, -1]

    try:
        t0 = time.perf_counter()
        graph = DecodeStep(model, graph_state, compile=(compile_options(args) or True) if compiled else False)
        token, worst = first, 0.0
        for _ in range(warm):  # the first step captures the graph (and compiles the step)
            a, b = graph(token).float(), eager(token).float()
            worst = max(worst, ((a - b).norm() / b.norm()).item())
            token = a.argmax(-1)
        sync(device)
        warm_s = time.perf_counter() - t0
        dt, token = steps(lambda t: graph(t).argmax(-1), token, n)
        run.add(impl=label, measure="decode", tok_s=n / dt, s=dt, peak_gib=peak_gib(device),
                prompt=s["prompt"], tokens=n, warmup_s=warm_s, graphs=len(graph.graphs),
                vs_eager_step_rel_err=worst)  # fmt: skip
    except Exception as e:  # noqa: BLE001 - the eager row below still runs
        traceback.print_exc()
        run.add(impl=label, measure="decode", status=f"failed: {type(e).__name__}: {str(e)[:400]}")
        graph = None
    if key == "fast":  # the same model's ordinary eager step: what the graph takes away
        dt, _ = steps(lambda t: eager(t).argmax(-1), first, n)
        run.add(impl=label + " (no graph)", measure="decode", tok_s=n / dt, s=dt, prompt=s["prompt"],
                tokens=n)  # fmt: skip
        if graph is not None:
            graphed = lambda t: graph(t).argmax(-1)  # noqa: E731
            profile(run, f"{label} decode, 16 graph steps", lambda: steps(graphed, first, 16))
        profile(run, f"{label} decode, 16 eager steps", lambda: steps(lambda t: eager(t).argmax(-1), first, 16))


def profile(run: Run, title: str, fn) -> None:
    """Append the kernels of one call of fn, by GPU time, to the profiles file (GPU runs only),
    with how much of the wall time the GPU was busy."""
    if run.device.type != "cuda" or not run.args.profile:
        return
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    try:
        sync(run.device)
        t0 = time.perf_counter()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            sync(run.device)
        wall = time.perf_counter() - t0
        events = prof.key_averages()
        try:
            text = events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70)
        except Exception:  # noqa: BLE001 - older torch names it self_cuda_time_total
            text = events.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70)
        kernels, head = kernel_summary(kernel_spans(prof), wall * 1e6)
        head = f"== {title}: wall {wall * 1e3:.1f} ms (profiled), {head}"
        with open(run.profiles, "a") as f:
            f.write(f"{head}\n{text}\n{kernels}\n\n")
        print(head, flush=True)
    except Exception as e:  # noqa: BLE001 - a profile is a bonus, never a failure
        print(f"profile of {title} failed: {type(e).__name__}: {e}", flush=True)


def kernel_spans(prof) -> list[tuple[float, float, str]]:
    """(start, end, name) in us of what a torch.profiler run put on the device: kernels, memcpys and
    memsets; not the annotations (the optimizer's, ProfilerStep) that span them."""
    from torch.autograd import DeviceType

    return [(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
            if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
            and "#" not in e.name]  # fmt: skip


def kernel_summary(spans: list[tuple[float, float, str]], wall_us: float, rows: int = 60) -> tuple[str, str]:
    """The device's kernels (start, end, name) in us: a table of the `rows` costliest names (time,
    calls, share), and a line with their sum, the time the device was busy with any of them (their
    union) and the idle rest of the wall time: launch gaps, host syncs."""
    total, busy, end = 0.0, 0.0, float("-inf")
    by_name: dict[str, list[float]] = {}
    for a, b, name in sorted(spans):
        total += b - a
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
        by_name.setdefault(name, [0.0, 0])
        by_name[name][0] += b - a
        by_name[name][1] += 1
    lines = [f"{'us':>10} {'calls':>6} {'share':>6}  kernel"]
    for name, (us, calls) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:rows]:
        lines.append(f"{us:10.1f} {calls:6d} {us / max(total, 1e-9):6.1%}  {name[:110]}")
    # where the device waited: the longest stretches with no kernel, and the kernels around them
    order = sorted(spans)
    gaps, end, last = [], float("-inf"), None
    for a, b, name in order:
        if last is not None and a > end:
            gaps.append((a - end, end - order[0][0], last, name))
        if b > end:
            end, last = b, name
    lines.append(f"{'gap us':>10} {'at us':>9}  after -> before")
    for g, at, before, after in sorted(gaps, reverse=True)[:12]:
        lines.append(f"{g:10.1f} {at:9.0f}  {before[:60]} -> {after[:60]}")
    head = (f"GPU kernels {total / 1e3:.1f} ms ({len(spans)} kernels), busy {busy / 1e3:.1f} ms, "
            f"idle {max(0.0, wall_us - busy) / 1e3:.1f} ms of the wall")  # fmt: skip
    return "\n".join(lines), head


# --- the run ------------------------------------------------------------------------------------


def section(run: Run, name: str, fn, *fn_args) -> None:
    """Run one measurement unless the budget is too short for it; an error is recorded, not fatal."""
    key = fn_args[0] if fn_args and isinstance(fn_args[0], str) else ""
    label = IMPLS[key][0] if key in IMPLS else key
    need = NEEDS.get(name + ("+compile" if key.startswith("compile") else ""), 0) if not run.args.smoke else 0
    if run.left() < need:
        run.add(impl=label, measure=name, status=f"skipped: {run.left():.0f} s of the budget left, needs ~{need}")
        return
    t0 = time.perf_counter()
    try:
        with deadline(run.left() if not run.args.smoke else 0):
            fn(run, *fn_args)
    except Exception as e:  # noqa: BLE001 - every failure is a result to report, the next section runs
        traceback.print_exc()
        run.add(impl=label, measure=name, status=f"failed: {type(e).__name__}: {str(e)[:400]}")
    cleanup()  # the measurement's models are gone with its frame: free their memory
    print(f"  [{label} {name}: {time.perf_counter() - t0:.1f} s; {run.left():.0f} s left]", flush=True)


def table(run: Run) -> str:
    """One line per implementation: each measure's tokens/s (x transformers) and peak GiB."""
    s = SIZES["smoke" if run.args.smoke else "full"]
    measures = ["train", *(f"prefill {n}" for n in s["prefill"]), "decode"]
    by = {(r["impl"], r["measure"]): r for r in run.rows}
    impls = list(dict.fromkeys(r["impl"] for r in run.rows if r["measure"] in measures))
    head = ["impl"] + [f"{m} tok/s" for m in measures] + ["train tok/s, back to back"] + [f"{m} GiB" for m in measures]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for impl in impls:
        cells, mem = [impl], []
        for m in measures:
            r, ref = by.get((impl, m)), by.get(("transformers", m))
            if r is None:
                cells.append("")
            elif "tok_s" not in r:
                cells.append(r.get("status", "?")[:40])
            else:
                vs = ref and "tok_s" in ref and impl != "transformers"
                cells.append(f"{r['tok_s']:,.0f}" + (f" ({r['tok_s'] / ref['tok_s']:.2f}x)" if vs else ""))
            mem.append(f"{r['peak_gib']:.1f}" if r and r.get("peak_gib") is not None else "")
        r, ref = by.get((impl, "train"), {}), by.get(("transformers", "train"), {})
        b2b, ref_b2b = r.get("tok_s_back_to_back"), ref.get("tok_s_back_to_back")
        vs = f" ({b2b / ref_b2b:.2f}x)" if b2b and ref_b2b and impl != "transformers" else ""
        cells.append(f"{b2b:,.0f}{vs}" if b2b else "")
        lines.append("| " + " | ".join(cells + mem) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: every code path, in seconds")
    p.add_argument("--only", nargs="+", default=list(IMPLS), choices=list(IMPLS), help="implementations")
    measures = ["train", "prefill", "decode"]
    p.add_argument("--what", nargs="+", default=measures, choices=measures, help="what to measure")
    p.add_argument("--budget", type=float, default=540, help="seconds for the whole run (default 540)")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip the torch.profiler kernel tables (next to the JSON: *_profiles.txt)")  # fmt: skip
    default_out = Path(os.environ["OUT"]) / "gpu_e2e.json" if os.environ.get("OUT") else Path("gpu_e2e.json")
    p.add_argument("--out", default=str(default_out), help="JSON results (default $OUT/gpu_e2e.json)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not args.smoke and not torch.cuda.is_available():
        p.error("no CUDA GPU here: run with --smoke for the CPU check of the script")
    device = torch.device("cuda" if not args.smoke else "cpu")
    run = Run(args, device)
    print(json.dumps(run.meta), flush=True)
    sd = random_weights(args, device)
    n = sum(v.numel() for v in sd.values())
    run.meta["parameters"] = n
    print(f"{config_for(args).describe()}: {n / 1e6:.1f}M parameters", flush=True)
    section(run, "parity", parity, sd)
    print(json.dumps({"transformers_kernels": run.meta.get("transformers_kernels"),
                      "transformers_impl": run.meta.get("transformers_impl")}), flush=True)  # fmt: skip
    order = [k for k in ("fast", "transformers", "fast_bf16", "triton", "mamba_ssm", "compile", "compile_graphs",
                         "compile_bf16", "compile_graphs_bf16", "compile_graphs_opt_bf16") if k in args.only]  # fmt: skip
    for key in order:
        why = backends.why_unavailable("triton")
        if key == "mamba_ssm" and backends.why_unavailable("mamba_ssm") is not None and not args.smoke:
            run.add(impl=IMPLS[key][0], measure="all", status=f"skipped: {backends.why_unavailable('mamba_ssm')}")
            continue
        if key.startswith(("triton", "compile")) and why is not None and not args.smoke:
            run.add(impl=IMPLS[key][0], measure="all", status=f"skipped: {why}")
            continue
        whats = {"compile": ("decode", "prefill", "train"), "compile_graphs": ("train",), "fast_bf16": ("train",),
                 "compile_bf16": ("train",), "compile_graphs_bf16": ("train",), "compile_graphs_opt_bf16": ("train",),
                 "mamba_ssm": ("train", "prefill")}  # fmt: skip
        whats = whats.get(key, args.what)
        for what in whats:  # compile: the cheaper first; the bf16-weights row only trains
            if what in args.what:
                section(run, what, {"train": train, "prefill": prefill, "decode": decode}[what], key, sd)
    text = table(run)
    print("\n" + text, flush=True)
    run.meta["table"] = text
    run.meta["total_s"] = time.perf_counter() - run.t0
    run.save()
    return {"meta": run.meta, "rows": run.rows}


if __name__ == "__main__":
    main()

"""CPU throughput of minijamba against transformers' JambaForCausalLM and mamba.py's JambaLM.

Same config and the same weights in all three: transformers' randomly initialised model is saved
with `save_pretrained` and loaded with `minijamba.load_hf`, and copied into mamba.py's module names;
the bench checks that the logits and 20 greedy tokens agree before timing anything. Measured in one
process with torch on `--threads` threads (2 on the reference machine), the implementations taking
turns step by step (a burst of load from another process then hits all of them alike):

    train    tokens/s of one optimizer step: forward + backward + AdamW, float32, the loss
             including the router's load-balancing term in all three (transformers needs
             output_router_logits=True for it; minijamba adds it by default; for mamba.py we add it)
    decode   new tokens/s of greedy decoding at batch 1 after a short prompt

Each number is the median of the timed runs after warm-up runs (the best run is reported too). The
three implementations:

    minijamba      this repository, default ("reference") scan backend: plain PyTorch
    transformers   JambaForCausalLM as a laptop user gets it: without mamba-ssm / causal-conv1d its
                   Mamba layers run the sequential PyTorch loop (use_mambapy=False is its default;
                   `use_mamba_kernels` is deprecated and ignored in transformers 5)
    mamba.py       `mambapy.jamba.JambaLM` with its parallel scan (pscan=True)

Usage:
    python bench/cpu_vs_transformers.py                       # all configs, all three, ~10-15 min
    python bench/cpu_vs_transformers.py --configs 8.5m --only minijamba mambapy
Results go to bench/cpu_vs_transformers.json and a markdown table to bench/cpu_vs_transformers.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from minijamba import Jamba, JambaConfig, generate  # noqa: E402

# The sizes of issue 3. All have the paper's layout: 8 layers, one attention layer (index 4), an MoE
# MLP every 2nd layer with 4 experts, top-2; tied embeddings (mamba.py ties them always). The issue
# fixes 15M (hidden 256, batch 8 x 256) and 8.5M at batch 4 x 256. For 8.5M, "8.5m" keeps hidden 256
# (it reproduces the mamba.py figure, ~560 tokens/s); "8.5m-narrow" is hidden 192, where the
# per-step tensors of transformers' sequential loop are smaller and it is relatively faster.
CONFIGS = {
    "15m": dict(hidden_size=256, intermediate_size=512, vocab_size=16384, batch=8, seq=256),
    "8.5m": dict(hidden_size=256, intermediate_size=256, vocab_size=5120, batch=4, seq=256),
    "8.5m-narrow": dict(hidden_size=192, intermediate_size=512, vocab_size=4096, batch=4, seq=256),
}
COMMON = dict(
    num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, attn_layer_period=8, attn_layer_offset=4,
    num_experts=4, num_experts_per_tok=2, expert_layer_period=2, expert_layer_offset=1,
    mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, tie_word_embeddings=True, router_aux_loss_coef=0.001,
    rms_norm_eps=1e-6,
)  # fmt: skip
IMPLS = ("minijamba", "transformers", "mambapy")


def ours_config(name: str) -> JambaConfig:
    sizes = {k: v for k, v in CONFIGS[name].items() if k not in ("batch", "seq")}
    return JambaConfig(**COMMON, **sizes)


# --- building the three models with the same weights ---------------------------------------------


def build_transformers(config: JambaConfig):
    import transformers

    hf = transformers.JambaConfig(**config.to_hf())
    hf.use_mamba_kernels = False  # deprecated in transformers 5 (no effect); set for older versions
    hf.use_cache = False
    torch.manual_seed(0)
    return transformers.JambaForCausalLM(hf).float()


def build_minijamba(config: JambaConfig, hf_model) -> Jamba:
    """transformers' weights into minijamba the way a user does it: `save_pretrained`, then
    `minijamba.load_hf` (config.json + safetensors). The scan backend is the default, "reference"."""
    from minijamba import load_hf

    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        model = load_hf(tmp, dtype=torch.float32)
    if model.config.to_hf()["hidden_size"] != config.hidden_size:
        raise RuntimeError("load_hf read a different config")
    return model


def build_mambapy(config: JambaConfig, hf_model):
    from mambapy.jamba import JambaLM, JambaLMConfig

    mc = JambaLMConfig(
        d_model=config.hidden_size, n_layers=config.num_hidden_layers, mlp_size=config.intermediate_size,
        initializer_range=config.initializer_range, rms_norm_eps=config.rms_norm_eps,
        d_state=config.mamba_d_state, expand_factor=config.mamba_expand, d_conv=config.mamba_d_conv,
        dt_rank=config.mamba_dt_rank, bias=config.mamba_proj_bias, conv_bias=config.mamba_conv_bias,
        inner_layernorms=True, use_cuda=False, pscan=True,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        num_experts=config.num_experts, num_experts_per_tok=config.num_experts_per_tok,
        attn_layer_offset=config.attn_layer_offset, attn_layer_period=config.attn_layer_period,
        expert_layer_offset=config.expert_layer_offset, expert_layer_period=config.expert_layer_period,
        vocab_size=config.vocab_size, pad_token_id=config.pad_token_id, tie_lm_weights=config.tie_word_embeddings,
    )  # fmt: skip
    model = JambaLM(mc)
    sd = {}
    for k, v in hf_model.state_dict().items():
        v = v.detach()
        k = k.replace("model.embed_tokens.", "embedding.").replace("model.final_layernorm.", "final_layernorm.")
        k = k.replace("model.layers.", "jamba.layers.").replace(".b_layernorm.", ".B_layernorm.")
        k = k.replace(".c_layernorm.", ".C_layernorm.").replace(".pre_ff_layernorm.", ".pre_moe_layernorm.")
        k = k.replace(".feed_forward.", ".moe.")
        if k.endswith("moe.experts.gate_up_proj"):  # fused (n, 2f, h) -> one MLP per expert
            f = v.shape[1] // 2
            for i in range(v.shape[0]):
                sd[k.replace("gate_up_proj", f"{i}.gate_proj.weight")] = v[i, :f]
                sd[k.replace("gate_up_proj", f"{i}.up_proj.weight")] = v[i, f:]
        elif k.endswith("moe.experts.down_proj"):
            for i in range(v.shape[0]):
                sd[k.replace("down_proj", f"{i}.down_proj.weight")] = v[i]
        elif ".moe." in k and "experts" not in k and "router" not in k:  # dense MLP = expert 0
            sd[k.replace(".moe.", ".moe.experts.0.")] = v
        elif k.endswith("moe.router.weight"):
            sd[k] = v
        else:
            sd[k] = v
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if [m for m in missing if m != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"mamba.py weight mapping failed: missing {missing}, unexpected {unexpected}")
    return model


# --- one training step and greedy decoding, for each implementation ------------------------------


def loss_fn(impl: str, model, config: JambaConfig, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy + router_aux_loss_coef * load-balancing loss, the same in all three."""
    if impl == "minijamba":
        _, loss = model(ids[:, :-1], targets=ids[:, 1:])
        return loss
    if impl == "transformers":
        return model(input_ids=ids[:, :-1], labels=ids[:, :-1], output_router_logits=True, use_cache=False).loss
    from mambapy.jamba import load_balancing_loss

    logits, router_logits = model(ids[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    aux = load_balancing_loss(router_logits, config.num_experts, config.num_experts_per_tok)
    return loss + config.router_aux_loss_coef * aux


class Trainer:
    """One implementation's model, AdamW optimizer and batches: `step()` times one optimizer step."""

    def __init__(self, impl, model, config, batch, seq):
        self.impl, self.model, self.config, self.shape = impl, model.train(), config, (batch, seq + 1)
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.gen = torch.Generator().manual_seed(1)

    def step(self) -> float:
        ids = torch.randint(0, self.config.vocab_size, self.shape, generator=self.gen)
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        loss = loss_fn(self.impl, self.model, self.config, ids)
        loss.backward()
        self.opt.step()
        dt = time.perf_counter() - t0
        if not torch.isfinite(loss):
            raise RuntimeError(f"{self.impl}: loss is {loss.item()}")
        return dt


def round_robin(fns: dict, counts: dict, warmup: dict) -> dict[str, list[float]]:
    """Call each fn warmup[k] times untimed, then counts[k] times, interleaved round by round: a burst
    of load from another process then slows every implementation alike instead of one of them."""
    for k, fn in fns.items():
        for _ in range(warmup[k]):
            fn()
    times = {k: [] for k in fns}
    for r in range(max(counts.values(), default=0)):
        for k, fn in fns.items():
            if r < counts[k]:
                times[k].append(fn())
    return times


@torch.inference_mode()
def greedy(impl, model, prompt: torch.Tensor, new: int) -> torch.Tensor:
    """prompt (1, p) -> the `new` greedy tokens (new,)."""
    if impl == "minijamba":
        return generate(model, prompt, new)[0, prompt.shape[1] :]
    if impl == "transformers":
        out = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
            do_sample=False, use_cache=True, pad_token_id=0,
        )  # fmt: skip
        return out[0, prompt.shape[1] :]
    # mamba.py's JambaLM.generate needs a tokenizer; this is its loop without it (prompt token by
    # token through `step`, as its generate does, then greedy).
    caches = [layer.get_empty_cache(1, prompt.device) for layer in model.jamba.layers]
    tokens = []
    for t in range(prompt.shape[1]):
        logits, caches = model.step(prompt[:, [t]], caches)
    for i in range(new):
        token = logits[:, -1].argmax(-1)  # (1,)
        tokens.append(token)
        if i + 1 < new:
            logits, caches = model.step(token[:, None], caches)
    return torch.cat(tokens)


def decoder(impl, model, config, prompt_len, new):
    """A function that decodes `new` greedy tokens after a fixed prompt and returns the seconds."""
    model.eval()
    prompt = torch.randint(3, config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(2))

    def run() -> float:
        t0 = time.perf_counter()
        greedy(impl, model, prompt, new)
        return time.perf_counter() - t0

    return run


@torch.no_grad()
def logits_of(impl, model, ids):
    model.eval()
    if impl == "minijamba":
        return model(ids)
    if impl == "transformers":
        return model(input_ids=ids, use_cache=False).logits
    return model(ids)[0]


# --- the run -----------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--only", nargs="+", default=list(IMPLS), choices=IMPLS, help="implementations to run")
    p.add_argument("--what", nargs="+", default=["train", "decode"], choices=["train", "decode"], help="what to time")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--train-steps", type=int, default=7, help="timed training steps (minijamba, mamba.py)")
    p.add_argument("--hf-train-steps", type=int, default=2, help="timed training steps for transformers (slow)")
    p.add_argument("--prompt", type=int, default=8, help="prompt length for decoding")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens to decode")
    p.add_argument("--decode-repeats", type=int, default=7)
    p.add_argument("--out", default=str(ROOT / "bench" / "cpu_vs_transformers"), help="output path without suffix")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import transformers

    try:
        import mambapy

        mambapy_version = getattr(mambapy, "__version__", None) or _dist_version("mambapy")
    except ImportError:
        mambapy_version = None
    meta = dict(
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), cpu=cpu_name(), threads=torch.get_num_threads(),
        torch=torch.__version__, transformers=transformers.__version__, mambapy=mambapy_version,
        load_average_at_start=os.getloadavg(),  # other processes on the machine: the noise
        command="python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
    )  # fmt: skip
    print(json.dumps(meta, indent=1))
    results = {"meta": meta, "configs": {}}
    for name in args.configs:
        config = ours_config(name)
        batch, seq = CONFIGS[name]["batch"], CONFIGS[name]["seq"]
        hf_model = build_transformers(config)
        models = {"transformers": hf_model, "minijamba": build_minijamba(config, hf_model)}
        if "mambapy" in args.only:
            models["mambapy"] = build_mambapy(config, hf_model)
        params = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
        ids = torch.randint(0, config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(3))
        ref = logits_of("transformers", hf_model, ids)
        diffs = {k: (logits_of(k, m, ids) - ref).abs().max().item() for k, m in models.items() if k != "transformers"}
        print(f"\n== {name}: {config.describe()}, hidden {config.hidden_size}, batch {batch} x {seq}")
        print("   parameters:", params, " max |logits - transformers'|:", diffs)
        entry = {"config": {**CONFIGS[name], **COMMON}, "parameters": params, "logit_max_abs_diff": diffs, "impls": {}}
        entry["transformers_paths"] = dict(  # what transformers chose on this machine
            attention=hf_model.config._attn_implementation,
            experts=getattr(hf_model.config, "_experts_implementation", None),
            mamba="PyTorch sequential loop (no mamba-ssm, no causal-conv1d)",
        )
        print("   transformers runs:", entry["transformers_paths"])
        impls = {impl: {} for impl in args.only}
        if "train" in args.what:
            trainers = {k: Trainer(k, models[k], config, batch, seq).step for k in args.only}
            counts = {k: args.hf_train_steps if k == "transformers" else args.train_steps for k in args.only}
            warmup = {k: 1 if k == "transformers" else 2 for k in args.only}
            for k, t in round_robin(trainers, counts, warmup).items():
                impls[k].update(
                    train_step_s=t, train_tok_s=batch * seq / statistics.median(t), train_tok_s_best=batch * seq / min(t)
                )
                print(f"   {k:13s} train  {impls[k]['train_tok_s']:9.1f} tok/s  (steps: {_fmt(t)} s)", flush=True)
            del trainers
        if "decode" in args.what:
            decoders = {k: decoder(k, models[k], config, args.prompt, args.new_tokens) for k in args.only}
            counts = {k: args.decode_repeats for k in args.only}
            for k, t in round_robin(decoders, counts, dict.fromkeys(args.only, 1)).items():
                impls[k].update(
                    decode_s=t, decode_tok_s=args.new_tokens / statistics.median(t),
                    decode_tok_s_best=args.new_tokens / min(t),
                )  # fmt: skip
                print(f"   {k:13s} decode {impls[k]['decode_tok_s']:9.1f} tok/s  (runs: {_fmt(t)} s)", flush=True)
        entry["impls"] = impls
        # Decoding runs on the weights after training steps, which differ per implementation, so
        # the greedy tokens are compared on fresh copies: same weights -> same tokens.
        entry["greedy_tokens_equal"] = _greedy_parity(config, args)
        print("   greedy tokens equal to transformers':", entry["greedy_tokens_equal"])
        results["configs"][name] = entry

    meta["load_average_at_end"] = os.getloadavg()
    _write(results, Path(args.out))
    return results


def _greedy_parity(config, args) -> dict:
    hf_model = build_transformers(config)
    ours = build_minijamba(config, hf_model)
    prompt = torch.randint(3, config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(2))
    ref = greedy("transformers", hf_model.eval(), prompt, 20)
    out = {"minijamba": bool(torch.equal(greedy("minijamba", ours.eval(), prompt, 20), ref))}
    try:
        out["mambapy"] = bool(torch.equal(greedy("mambapy", build_mambapy(config, hf_model).eval(), prompt, 20), ref))
    except ImportError:
        pass
    return out


def _fmt(ts):
    return ", ".join(f"{t:.3g}" for t in ts)


def _dist_version(name):
    from importlib.metadata import version

    return version(name)


def _write(results: dict, out: Path) -> None:
    """The JSON (every timing), and a markdown table: median tokens/s, with the best run's in
    parentheses; ratios of medians, with the ratio of best runs in parentheses."""
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    meta = results["meta"]
    lines = [
        f"date {meta['date']}; {meta['cpu']}, {meta['threads']} threads; torch {meta['torch']}, "
        f"transformers {meta['transformers']}, mambapy {meta['mambapy']}; load average (1, 5, 15 min) "
        f"{_fmt(meta['load_average_at_start'])} at the start, {_fmt(meta['load_average_at_end'])} at the end",
        f"command: `{meta['command']}`",
        "",
        "| config | params | batch x seq | impl | train tok/s | decode tok/s | train vs transformers | "
        "train vs mamba.py | decode vs transformers |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, e in results["configs"].items():
        im, c = e["impls"], e["config"]

        def num(impl, key):
            return f"{im[impl][key]:.1f} ({im[impl][key + '_best']:.1f})" if key in im[impl] else "-"

        def ratio(impl, key, other):
            if other == impl or other not in im or key not in im[impl] or key not in im[other]:
                return ""
            best = key + "_best"
            return f"{im[impl][key] / im[other][key]:.1f}x ({im[impl][best] / im[other][best]:.1f}x)"

        for impl in im:
            lines.append(
                f"| {name} | {e['parameters'][impl] / 1e6:.2f}M | {c['batch']} x {c['seq']} | {impl} | "
                f"{num(impl, 'train_tok_s')} | {num(impl, 'decode_tok_s')} | "
                f"{ratio(impl, 'train_tok_s', 'transformers')} | {ratio(impl, 'train_tok_s', 'mambapy')} | "
                f"{ratio(impl, 'decode_tok_s', 'transformers')} |"
            )
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()

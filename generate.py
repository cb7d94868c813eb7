#!/usr/bin/env python
"""Sample from a Jamba: a train_tiny.py output folder, or a transformers Jamba checkpoint folder.

    python generate.py --prompt "def "                       # the model train_tiny.py wrote to out/tiny
    echo "import os" | python generate.py --num-samples 3     # prompt from stdin
    python generate.py --hf path/to/jamba --prompt "Hello"    # transformers' files + tokenizer.json
    python generate.py --prompts-file prompts.jsonl --output out.jsonl --batch-size auto
                                                              # many prompts, continuous batching
    python generate.py --hf path/to/jamba --chat --prompt "Hi" [--system TEXT]
                                                              # the folder's chat template; no --prompt:
                                                              # a session over stdin, one message a line

Tokens are printed as they are produced. At the end (on stderr): tokens per second and the size
of the inference state, split into the attention layers' KV cache and the Mamba layers' state.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

SEED_MAX = 2**64 - 1  # what torch.Generator.manual_seed takes (minijamba.checks.SEED_MAX)
MAX_SAMPLES = 10**6  # --num-samples: beyond this a run is a mistake (it would print for years)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> Parser:
    p = Parser(
        prog="generate.py",
        description="Sample text from a Jamba model, streaming the tokens as they are produced.",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--out-dir", metavar="DIR", help="a train_tiny.py output folder (default out/tiny)")
    src.add_argument(
        "--hf",
        metavar="PATH",
        help="a transformers Jamba checkpoint folder (config.json, safetensors, tokenizer.json)",
    )
    p.add_argument("--prompt", help="the text to continue (default: read from stdin)")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        metavar="N",
        help="tokens to generate per sample (default 200, or an --hf folder's generation_config.json)",
    )
    p.add_argument(
        "--temperature", type=float, default=None,
        help="softmax temperature; 0 = greedy (default 0.8; for an --hf folder, its generation_config.json's, "
        "greedy unless it says do_sample, as transformers)",
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=None,
        metavar="K",
        help="sample only among the K most likely tokens (default: all)",
    )
    p.add_argument(
        "--top-p",
        type=float,
        default=None,
        metavar="P",
        help="nucleus sampling: the smallest set of tokens with probability >= P (default 0.95, or the folder's)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the sampler: same seed, same samples (default 0)"
    )
    p.add_argument(
        "--num-samples",
        type=int,
        default=1,
        metavar="N",
        help="samples to draw from the prompt, one after the other (default 1)",
    )
    p.add_argument(
        "--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto: cuda if available)"
    )
    p.add_argument(
        "--fast",
        action="store_true",
        help="run the model's primitives on the fastest backend here instead of the plain reference "
        "(a GPU's Triton kernels, a CPU's cpu twins); on a GPU, also replay each decoding step as one CUDA graph",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decoding step before it runs (about 15 s once on a GPU; then, with --fast, "
        "fewer kernels per token: 1,377 tokens/s on an H200, 674 with --fast alone; bench/RESULTS.md)",
    )
    p.add_argument(
        "--int8-experts",
        action="store_true",
        help="store the MoE experts as int8 with per-channel scales (how all 52B of Jamba-v0.1 fit one "
        "80GB GPU); everything else, the Mamba layers included, stays unquantized",
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=None,
        metavar="N",
        help="run the prompt N tokens at a time: the same tokens, with activation memory bounded by N "
        "instead of the prompt's length (default: the prompt in one piece)",
    )
    talk = p.add_argument_group("chat (an --hf folder's chat template: minijamba.inference.chat)")
    talk.add_argument(
        "--chat",
        action="store_true",
        help="render --prompt as a user message through the folder's chat template (as transformers' "
        "apply_chat_template with add_generation_prompt) and print the reply; without --prompt, a session "
        "over stdin, one message a line, each turn keeping the inference state of the last",
    )
    talk.add_argument("--system", metavar="TEXT", help="with --chat: a system message first")
    many = p.add_argument_group("many prompts (continuous batching: minijamba.inference.serving)")
    many.add_argument(
        "--prompts-file",
        metavar="FILE",
        help='JSONL, one {"prompt": "text"} per line: each is completed, and one JSON object per line is '
        "written (the completion, token counts, the finish reason, or the line's error)",
    )
    many.add_argument("--output", metavar="FILE", help="where the JSONL results go (default stdout)")
    many.add_argument(
        "--batch-size",
        default="8",
        metavar="N|auto",
        help="slots decoded together; a slot takes the next prompt as soon as its row ends. auto: the most "
        "that the memory plan fits in the device's free memory (default 8)",
    )
    many.add_argument(
        "--context",
        type=int,
        default=None,
        metavar="N",
        help="tokens a slot holds, its prompt and its new tokens (default: the longest prompt plus "
        "--max-new-tokens); longer prompts get an error line. With --chat: the tokens the whole "
        "conversation may hold (default 4096)",
    )
    return p


def _check_args(p: Parser, a: argparse.Namespace) -> None:
    if a.max_new_tokens is not None and a.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    if a.temperature is not None and not (math.isfinite(a.temperature) and a.temperature >= 0):  # NaN fails both
        p.error(f"--temperature must be a finite number >= 0 (0 = greedy), got {a.temperature}")
    if a.top_k is not None and a.top_k < 1:
        p.error(f"--top-k must be >= 1, got {a.top_k}")
    if a.top_p is not None and not 0 < a.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {a.top_p}")
    if not 0 <= a.seed <= SEED_MAX:
        p.error(f"--seed must be an integer from 0 to 2**64 - 1 = {SEED_MAX}, got {a.seed}")
    if not 1 <= a.num_samples <= MAX_SAMPLES:
        p.error(f"--num-samples must be from 1 to {MAX_SAMPLES:,}, got {a.num_samples}")
    if a.prefill_chunk is not None and a.prefill_chunk < 1:
        p.error(f"--prefill-chunk must be >= 1, got {a.prefill_chunk}")
    if a.batch_size != "auto" and (not a.batch_size.isdigit() or not 1 <= int(a.batch_size) <= 2**16):
        p.error(f"--batch-size must be auto or a number of slots from 1 to 65536, got {a.batch_size!r}")
    if a.context is not None and a.context < 2:
        p.error(f"--context must be >= 2 tokens, got {a.context}")
    if a.prompts_file is None and a.output is not None:
        p.error("--output goes with --prompts-file")
    if a.prompts_file is None and not a.chat and a.context is not None:
        p.error("--context goes with --prompts-file or --chat")
    if a.chat and (a.hf is None or a.prompts_file is not None or a.num_samples != 1):
        p.error("--chat needs --hf DIR (a folder with a chat template), and no --prompts-file or --num-samples")
    if a.system is not None and not a.chat:
        p.error("--system goes with --chat")


def load(args, device, backend):
    """(model, tokenizer) from --out-dir or --hf, on `device`, fp32 on the CPU and bf16 on a GPU.
    Any problem with the folder is one ValueError that starts with the flag that named it."""
    from pathlib import Path

    flag, folder = ("--hf", args.hf) if args.hf is not None else ("--out-dir", args.out_dir or "out/tiny")
    if Path(folder).is_file():
        raise ValueError(f"{flag} {folder} is a file, not a folder: give the checkpoint folder")
    try:
        return _load(args, Path(folder), device, backend)
    except (ValueError, OSError) as e:  # incl. CheckpointError, FileNotFoundError
        raise ValueError(f"{flag}: {e}") from None


def _load(args, folder, device, backend):
    import torch

    from minijamba.hf_tokenizer import check_vocabulary, load_tokenizer
    from minijamba.training import checkpoint

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    quantize = "int8" if args.int8_experts else None
    if args.hf is None:
        from minijamba.inference.quant import quantize_model_

        model, tok = checkpoint.load_model(folder, device=device, dtype=dtype, scan_backend=backend)
        check_vocabulary(tok, model.config.vocab_size, folder)
        return quantize_model_(model, quantize), tok  # NaN or inf weights were refused as they loaded
    from safetensors import SafetensorError

    from minijamba import load_hf
    from minijamba.hf import read_config

    config = read_config(folder)  # the cheap files first: a bad config, tokenizer or template fails at once
    tok = load_tokenizer(folder)
    check_vocabulary(tok, config.vocab_size, folder)
    try:
        model = load_hf(folder, device=device, dtype=dtype, quantize=quantize)  # int8 as it loads
    except SafetensorError as e:
        raise ValueError(f"a weight file in {folder} is not valid safetensors ({e}): it is corrupt") from None
    model.config.scan_backend = backend  # every layer reads its backend from the one config
    return model.eval(), tok


def sampling_defaults(args, config) -> tuple[int, ...]:
    """Fill the sampling flags left unset (--hf: from generation_config.json, greedy unless it says
    do_sample, as transformers; else 0.8 / 0.95 / 200) and return the end tokens: the folder's
    generation_config.json's when it names them, else config.json's."""
    from minijamba.hf_tokenizer import generation_defaults

    found = generation_defaults(args.hf) if args.hf is not None else None
    if found is not None and found.found:
        given = {k: getattr(args, k) for k in ("temperature", "top_k", "top_p", "max_new_tokens")}
        for k, v in given.items():
            if v is None:
                setattr(args, k, getattr(found, k))
        print(f"generation_config.json: temperature {args.temperature}, top_k {args.top_k}, top_p {args.top_p}"
              + ("" if found.eos_token_id is None else f", end tokens {found.eos_token_id}"), file=sys.stderr)  # fmt: skip
    args.temperature = 0.8 if args.temperature is None else args.temperature
    args.top_p = 0.95 if args.top_p is None and (found is None or not found.found) else args.top_p
    args.max_new_tokens = 200 if args.max_new_tokens is None else args.max_new_tokens
    if found is not None and found.eos_token_id is not None:
        return tuple(found.eos_token_id)
    return config.end_tokens()


def read_prompt(args) -> str:
    """The prompt from --prompt or stdin, checked to be UTF-8 text (a tokenizer takes nothing else)."""
    if args.prompt is not None:
        try:  # bytes that are not UTF-8 arrive from the command line as lone surrogates
            args.prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"--prompt is not valid UTF-8 text (byte {_bad_byte(args.prompt[e.start])} at character "
                f"{e.start}): give UTF-8 text"
            ) from None
        return args.prompt
    if sys.stdin is None or sys.stdin.isatty():
        raise ValueError("no prompt: pass --prompt TEXT or pipe the prompt on stdin")
    stream = getattr(sys.stdin, "buffer", None)
    try:
        if stream is not None:  # the bytes, decoded strictly: not the locale's encoding or its escapes
            return stream.read().decode("utf-8")
        text = sys.stdin.read()
        text.encode("utf-8")
        return text
    except UnicodeDecodeError as e:
        raise ValueError(
            f"the prompt on stdin is not valid UTF-8 text (byte 0x{e.object[e.start]:02x} at offset "
            f"{e.start}): pipe UTF-8 text, or pass --prompt TEXT"
        ) from None
    except UnicodeEncodeError as e:
        raise ValueError(
            f"the prompt on stdin is not valid UTF-8 text (at character {e.start}): pipe UTF-8 text, "
            "or pass --prompt TEXT"
        ) from None


def _bad_byte(ch: str) -> str:
    """The byte a surrogate-escaped character stands for (U+DC80..U+DCFF), else the code point."""
    code = ord(ch)
    return f"0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    import torch

    from minijamba.inference import commands
    from minijamba.inference.commands import kib
    from minijamba.training import tokenizer as tk
    from minijamba.training.checkpoint import CheckpointError
    from minijamba.inference.generation import generate_stream
    from minijamba.inference.memory_plan import DoesNotFit, available_bytes, check, plan
    from minijamba.runtime import resolve_device, scan_backend_for
    from minijamba.model.state import plan_nbytes

    try:
        device = resolve_device(args.device)
        model, tok = load(args, device, scan_backend_for(args.fast))
        stops = set(sampling_defaults(args, model.config))  # any of them ends a sample (Jamba 1.5 has two)
        if args.prompts_file is not None:
            return commands.serve_file(args, model, tok, device, tuple(stops))
        if args.chat:
            return commands.chat(args, model, tok, device, tuple(stops))
        prompt = read_prompt(args)
        ids = tok.encode(prompt).ids
        if not ids:
            raise ValueError("the prompt encodes to no tokens: give some text")
        if max(ids) >= model.config.vocab_size:
            raise ValueError(
                f"the tokenizer gives id {max(ids)}, beyond the model's {model.config.vocab_size} tokens"
            )
        # The memory plan of this run, printed, and checked before anything runs: a run that cannot
        # fit stops here with the largest context that would, not halfway with an out-of-memory error.
        weights = model.embed_tokens.weight
        memory = plan(model.config, len(ids) + args.max_new_tokens, 1, args.prefill_chunk, weights.dtype,
                      "int8" if args.int8_experts else None, model.config.scan_backend,
                      new_tokens=args.max_new_tokens)  # fmt: skip
        print(memory, file=sys.stderr)
        held = torch.cuda.memory_allocated(device) if device.type == "cuda" else memory.weights_total
        try:
            check(memory, available_bytes(device) + held)  # the weights are loaded already
        except DoesNotFit as e:
            room = e.largest_context - len(ids)
            hint = (f"--max-new-tokens {room:,} at most with this prompt of {len(ids):,} tokens" if room >= 1 else
                    f"not even --max-new-tokens 1 with this prompt of {len(ids):,} tokens")  # fmt: skip
            raise ValueError(f"{e} ({hint})") from None
    except (ValueError, OSError, CheckpointError) as e:
        print(f"generate.py: error: {e}", file=sys.stderr)
        return 1

    config = model.config
    x = torch.tensor([ids], device=device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    out = sys.stdout
    total_tokens, total_time, state = 0, 0.0, None
    try:
        for i in range(args.num_samples):
            if args.num_samples > 1:
                out.write(f"{'' if i == 0 else chr(10)}--- sample {i + 1} ---\n")
            decoder = tk.StreamDecoder(tok, ids)
            out.write(tok.decode(ids, skip_special_tokens=False))
            out.flush()
            state = model.new_state(1, len(ids) + args.max_new_tokens)
            t0 = time.perf_counter()
            stream = generate_stream(model, x, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                                     generator=gen, state=state, prefill_chunk=args.prefill_chunk,
                                     cuda_graph=args.fast and device.type == "cuda",
                                     compile_step=args.compile)  # fmt: skip
            for token in stream:
                total_tokens += 1
                if int(token[0]) in stops:
                    break
                out.write(decoder.push(int(token[0])))
                out.flush()
            total_time += time.perf_counter() - t0
            out.write(decoder.flush() + "\n")
            out.flush()
    except KeyboardInterrupt:
        out.write("\n")
        print("generate.py: interrupted", file=sys.stderr)
        return 130

    nb = state.nbytes()
    kinds = config.layer_types
    a, m = kinds.count("attention"), kinds.count("mamba")
    dtype = model.embed_tokens.weight.dtype
    attn_only = plan_nbytes(config.with_layout("attention"), 1, state.capacity, dtype)["kv_cache"]
    s = lambda n: "" if n == 1 else "s"
    print(
        f"{total_tokens} tokens in {total_time:.2f} s: {total_tokens / max(total_time, 1e-9):,.1f} tokens/s "
        f"(prompt of {len(ids)} tokens included, device {device})",
        file=sys.stderr,
    )
    print(
        f"inference state for {state.capacity} tokens: KV cache {kib(nb['kv_cache'])} ({a} attention layer{s(a)}), "
        f"SSM state {kib(nb['ssm_state'])} + conv state {kib(nb['conv_state'])} ({m} Mamba layer{s(m)}), "
        f"{kib(nb['total'])} in all; with attention in every layer the KV cache alone would be {kib(attn_only)}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

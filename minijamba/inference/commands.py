"""The work behind two of generate.py's modes, each given the parsed arguments, the loaded model
and its tokenizer: `serve_file` (--prompts-file: many prompts through continuous batching, JSONL in
and out) and `chat` (--chat: a conversation through the folder's chat template, the inference state
kept from turn to turn). Errors are ValueError/FileNotFoundError with the message generate.py prints.
"""

from __future__ import annotations

import sys

import torch


def kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB" if n < 2**20 else f"{n / 2**20:,.1f} MiB"


def serve_file(args, model, tok, device, end_tokens) -> int:
    """--prompts-file: every line's prompt through `minijamba.inference.serving`, JSONL out."""
    from pathlib import Path

    from minijamba.inference.memory_plan import GiB, available_bytes, largest_batch, serving_plan
    from minijamba.inference.serving import encode_prompts_jsonl, run_jsonl

    path = Path(args.prompts_file)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts-file {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts-file {path} is not UTF-8 text (at byte {e.start})") from None
    records = encode_prompts_jsonl(lines, tok)  # (line, token ids, error), each prompt encoded once
    lengths = [len(ids) for _, ids, err in records if err is None]
    if not any(lengths):
        raise ValueError(f'--prompts-file {path} has no prompt to run: no line of the form {{"prompt": "text"}}')
    context = args.context or max(lengths) + args.max_new_tokens
    weights = model.embed_tokens.weight
    kw = dict(chunk=args.prefill_chunk, dtype=weights.dtype, quantize="int8" if args.int8_experts else None,
              scan_backend=model.config.scan_backend)  # fmt: skip
    plan = lambda slots: serving_plan(model.config, context, slots, **kw)  # noqa: E731
    held = torch.cuda.memory_allocated(device) if device.type == "cuda" else plan(1).weights_total
    room = available_bytes(device) + held  # the weights are loaded already
    fits = largest_batch(model.config, context, room, **kw)
    if fits < 1:
        raise ValueError(f"not one slot of {context:,} tokens fits in {room / GiB:.2f} GiB: give a shorter --context")
    slots = fits if args.batch_size == "auto" else int(args.batch_size)
    if slots > fits:
        raise ValueError(
            f"--batch-size {slots}: {slots} slots of {context:,} tokens need {plan(slots).total / GiB:.2f} GiB "
            f"and the device has {room / GiB:.2f} GiB; the most that fit is {fits} (or --batch-size auto)"
        )
    print(plan(slots), file=sys.stderr)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout  # noqa: SIM115
    try:
        counts = run_jsonl(
            model, tok, records, out, args.max_new_tokens, slots, context, progress=sys.stderr,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            eos_token_id=end_tokens, prefill_chunk=args.prefill_chunk,
            generator=torch.Generator(device=device).manual_seed(args.seed),
            cuda_graph=args.fast and device.type == "cuda", compile_step=args.compile,
        )  # fmt: skip
    finally:
        if out is not sys.stdout:
            out.close()
    print(
        f"{counts['prompts']} prompts ({counts['errors']} lines refused) in {counts['seconds']:.2f} s with "
        f"{slots} slots of {context:,} tokens: {counts['tokens']:,} tokens, "
        f"{counts['tokens'] / max(counts['seconds'], 1e-9):,.1f} tokens/s",
        file=sys.stderr,
    )
    return 0


def chat(args, model, tok, device, end_tokens) -> int:
    """--chat: one reply to --prompt, or a session over stdin (one user message a line), each turn
    prefilling only its own tokens; the state's size after each turn goes to stderr."""
    from minijamba.inference.chat import Chat
    from minijamba.model.state import plan_nbytes

    if getattr(tok, "chat_template", None) is None:
        raise ValueError("--chat needs a chat template: this folder has none (tokenizer_config.json's "
                         "chat_template or chat_template.jinja); drop --chat to continue plain text")  # fmt: skip
    capacity = args.context or 4096
    session = Chat(model, tok, end_tokens, system=args.system, capacity=capacity, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                   generator=torch.Generator(device=device).manual_seed(args.seed), prefill_chunk=args.prefill_chunk,
                   cuda_graph=args.fast and device.type == "cuda")  # fmt: skip
    config, dtype = model.config, model.embed_tokens.weight.dtype
    interactive = args.prompt is None
    if interactive and sys.stdin.isatty():
        print("chat: one message a line; Ctrl-D ends", file=sys.stderr)
    messages = [args.prompt] if not interactive else (line.rstrip("\n") for line in sys.stdin)
    for message in messages:
        if not message.strip():
            continue
        turn = session.reply(message)
        print(turn.text, flush=True)
        attention = plan_nbytes(config.with_layout("attention"), 1, turn.context_tokens, dtype)["kv_cache"]
        how = "kept from the last turn" if turn.kept_state else "started afresh"
        print(f"[turn {sum(m['role'] == 'assistant' for m in session.messages)}: prefilled {turn.prefilled} tokens, state {how}; "
              f"{turn.context_tokens:,} tokens held in {kib(turn.state_bytes)} of state (all {capacity:,} "
              f"slots allocated), where an all-attention model's KV cache for them would be {kib(attention)}]",
              file=sys.stderr)  # fmt: skip
    return 0

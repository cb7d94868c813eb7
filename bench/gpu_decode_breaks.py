"""Why torch.compile does not speed up the decoding step of Jamba-v0.1 (int8 experts) at batch 1:
the graph breaks `torch._dynamo.explain` finds in `DecodeStep`'s step, with their reasons (issue 17).

    python bench/gpu_decode_breaks.py --out $OUT/breaks.json
    python bench/gpu_decode_breaks.py --smoke      # a tiny model on the CPU
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minijamba.inference.cuda_graph import DecodeStep  # noqa: E402
from minijamba.inference.materialize import build  # noqa: E402
from minijamba.model.config import JambaConfig  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--float-experts", action="store_true", help="bf16 (smoke: float32) experts instead of int8")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.smoke:
        config = JambaConfig.from_preset("tiny", vocab_size=256)
        config.scan_backend, device, dtype = "cpu", torch.device("cpu"), torch.float32
    else:
        config = JambaConfig.from_preset("jamba-v0.1")
        config.scan_backend, device, dtype = "triton", torch.device("cuda"), torch.bfloat16
    model = build(config, device, dtype, quantize=None if args.float_experts else "int8", seed=0)
    state = model.new_state(args.batch, args.context + 8)
    state.valid[:, : args.context] = True
    step = DecodeStep(model, state, graph=False)
    step.end.fill_(args.context + 1)
    from minijamba.inference.cuda_graph import GraphReadyState

    view = GraphReadyState(state, step.end, step.window(args.context + 1))
    with torch.inference_mode():
        explained = torch._dynamo.explain(step._forward)(view)
    def where(b) -> str:
        stack = getattr(b, "user_stack", None) or []
        frame = stack[-1] if stack else None
        at = f" at {Path(frame.filename).name}:{frame.lineno} {frame.line}" if frame else ""
        return (str(getattr(b, "reason", b)).split("\n")[0][:120] + at)[:300]

    reasons = collections.Counter(where(b) for b in explained.break_reasons)
    out = dict(graphs=explained.graph_count, breaks=explained.graph_break_count, ops=explained.op_count,
               reasons=reasons.most_common(15))  # fmt: skip
    print(json.dumps(out, indent=1))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()

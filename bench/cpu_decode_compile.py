"""CPU decoding with a torch.compile-d step (minijamba.inference.cuda_graph.DecodeStep(graph=False, compile=True))
against the same graph-ready step run eagerly, on the 15m config of cpu_vs_transformers.py, same weights.

    python bench/cpu_decode_compile.py [15m|8.5m|8.5m-narrow]
"""
import sys, time, statistics, torch
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "bench"))
import cpu_vs_transformers as B
from minijamba.inference.cuda_graph import DecodeStep
from minijamba.inference.generation import prefill
torch.set_num_threads(2)
name = sys.argv[1] if len(sys.argv) > 1 else "15m"
config = B.ours_config(name)
hf = B.build_transformers(config)
m = B.build_minijamba(config, hf).eval()
prompt = torch.randint(3, config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(2))
new = 64
@torch.inference_mode()
def run(step_kind):
    state = m.new_state(1, 8 + new + 4)
    logits = prefill(m, prompt, state)
    tok = logits.argmax(-1)
    step = DecodeStep(m, state, graph=False, compile=(step_kind == "compiled"))
    out = []
    t0 = time.perf_counter()
    for i in range(new):
        out.append(tok)
        if i + 1 < new:
            tok = step(tok).argmax(-1)
    return time.perf_counter() - t0, torch.cat(out)
t, toks_c = run("compiled"); print("first compiled", t)
ts = [run("compiled")[0] for _ in range(5)]
te = [run("eager")[0] for _ in range(5)]
from minijamba import generate
ref = generate(m, prompt, new)[0, 8:]
print("same tokens as generate:", bool((ref == toks_c).all()))
print(name, "compiled step tok/s", new / statistics.median(ts), " eager graph-ready step tok/s", new / statistics.median(te))

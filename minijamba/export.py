"""Hand a model trained with train_tiny.py to transformers (or vLLM): its checkpoint folder written
as a folder that `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load.

    python -m minijamba.export RUN_DIR HF_DIR

What is written, in one atomic swap (a crash leaves HF_DIR as it was):

    config.json, model.safetensors   the weights in transformers' per-expert layout (`save_hf`)
    tokenizer.json                   the tokenizer the model was trained with, unchanged
    tokenizer_config.json            PreTrainedTokenizerFast, with the special tokens the run used
                                     (train_tiny.py's end-of-text serves as BOS, EOS and padding)
    generation_config.json           the same token ids, and greedy decoding (transformers' default)

transformers then continues a prompt with the same greedy text as `generate.py --out-dir RUN_DIR
--temperature 0`. Only the last checkpoint of the run is exported (the weights, not the optimizer).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from minijamba.hf_save import save_hf
from minijamba.hf_tokenizer import GENERATION_CONFIG, TOKENIZER, TOKENIZER_CONFIG


def export(run_dir, hf_dir, max_shard_size="5GB") -> Path:
    """Write the train_tiny.py checkpoint in `run_dir` as a transformers folder at `hf_dir`."""
    from minijamba.training import checkpoint

    run, out = Path(run_dir), Path(hf_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run} is not a folder: give the --out-dir of a train_tiny.py run")
    if out.exists() and out.resolve() == run.resolve():
        raise ValueError(f"{out} is the run's own folder: export to another folder")
    model, tok = checkpoint.load_model(run)  # its weights, config and tokenizer, checked as they load
    config = model.config
    ends = list(config.end_tokens())
    roles = {"bos_token": config.bos_token_id, "eos_token": ends[0] if ends else None, "pad_token": config.pad_token_id}
    special = {role: tok.id_to_token(i) for role, i in roles.items() if i is not None and tok.id_to_token(i) is not None}
    tokenizer_config = dict(tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=False,
                            model_max_length=config.max_position_embeddings, **special)  # fmt: skip
    generation = dict(do_sample=False, bos_token_id=config.bos_token_id, pad_token_id=config.pad_token_id,
                      eos_token_id=ends[0] if len(ends) == 1 else ends or None)  # fmt: skip
    files = {
        TOKENIZER: tok.to_str(),
        TOKENIZER_CONFIG: json.dumps(tokenizer_config, indent=2) + "\n",
        GENERATION_CONFIG: json.dumps(generation, indent=2) + "\n",
    }
    return save_hf(model, out, max_shard_size=max_shard_size, extra_files=files)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minijamba.export", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", metavar="RUN_DIR", help="a train_tiny.py output folder (its --out-dir)")
    p.add_argument("hf_dir", metavar="HF_DIR", help="the folder to write (created; its other files are kept)")
    p.add_argument("--max-shard-size", default="5GB", help="split the weights into files of at most this (default 5GB)")
    args = p.parse_args(argv)
    from minijamba.training.checkpoint import CheckpointError

    try:
        out = export(args.run_dir, args.hf_dir, args.max_shard_size)
    except (ValueError, OSError, CheckpointError) as e:
        print(f"python -m minijamba.export: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}: AutoModelForCausalLM.from_pretrained({str(out)!r}) and AutoTokenizer load it", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

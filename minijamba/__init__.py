"""minijamba: a readable Jamba (AI21, arXiv 2403.19887) in plain PyTorch, with an optional fast path."""

from minijamba import kernels  # noqa: F401  (registers the fast side's backends with the dispatch point)
from minijamba.model.config import JambaConfig
from minijamba.inference.generation import generate
from minijamba.inference.serving import generate_many
from minijamba.model.jamba import Jamba
from minijamba.model.state import InferenceState


def load_hf(*args, **kwargs):
    """Load a transformers Jamba checkpoint folder; see `minijamba.hf.load_hf`."""
    from minijamba.hf import load_hf as _load_hf

    return _load_hf(*args, **kwargs)


def save_hf(*args, **kwargs):
    """Write a folder transformers' JambaForCausalLM loads; see `minijamba.hf_save.save_hf`."""
    from minijamba.hf_save import save_hf as _save_hf

    return _save_hf(*args, **kwargs)


__all__ = ["JambaConfig", "Jamba", "InferenceState", "generate", "generate_many", "load_hf", "save_hf"]

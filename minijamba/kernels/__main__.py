"""`python -m minijamba.kernels`: which scan backends this machine can run, and what --fast picks."""

from __future__ import annotations

import argparse

from minijamba import kernels as backends


def main(argv=None) -> None:
    argparse.ArgumentParser(
        prog="python -m minijamba.kernels",
        description="List the selective-scan backends, whether each runs on this machine (and why not), "
        "and which one --fast would pick.",
    ).parse_args(argv)
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU (CPU only)"
    print(f"device: {device}")
    for name in backends.names():
        reason = backends.why_unavailable(name)
        status = "available" if reason is None else f"not available: {reason}"
        hint = "" if reason is None else f"\n{'':14}install: {backends.INSTALL_HINT[name]}"
        print(f"  {name:<11} {status}{hint}")
    print(f"--fast picks: {backends.best_available()} (train_tiny.py and generate.py, eager or compiled)")


if __name__ == "__main__":
    main()

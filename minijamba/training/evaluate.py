"""Validation during training: the mean loss in nats per token, next-token accuracy, bits per byte."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minijamba.training.data import IGNORE, bits_per_byte


@torch.no_grad()
def evaluate(model, batches, token_nbytes, device, autocast, step_begin=lambda: None, documents=None) -> dict:
    """Validation: mean nats per target token, next-token accuracy, and bits per byte (text).
    documents: x -> seq_idx or None (packed rows, `TextTask.documents`)."""
    nats, count, correct, nbytes = 0.0, 0, 0, 0
    for x, y in batches:
        seq_idx = None if documents is None else documents(x)
        x, y = x.to(device), y.to(device)
        seq_idx = None if seq_idx is None else seq_idx.to(device)
        step_begin()
        with autocast():
            logits = model(x, seq_idx=seq_idx)  # (b, l, V)
        y = y.flatten()
        keep = y != IGNORE
        lp = F.cross_entropy(logits.float().flatten(0, 1), y, ignore_index=IGNORE, reduction="none")
        nats += lp[keep].sum().item()
        count += int(keep.sum())
        correct += int((logits.flatten(0, 1).argmax(-1) == y)[keep].sum())
        if token_nbytes is not None:
            nbytes += int(token_nbytes.to(device)[y[keep]].sum())
    out = {"val_loss": nats / count, "accuracy": correct / count}
    if token_nbytes is not None:
        out["bits_per_byte"] = bits_per_byte(nats, nbytes)
    return out


def format_eval(step: int, m: dict) -> str:
    s = f"step {step}: validation loss {m['val_loss']:.4f} nats/token"
    if "bits_per_byte" in m:
        s += f", {m['bits_per_byte']:.4f} bits/byte"
    s += f", accuracy {m['accuracy']:.1%}"
    return s

"""The released Jambas' presets (minijamba.model.presets): each one's parameter count on the meta
device against its card, the layout its config.json states, the same count in transformers'
JambaForCausalLM built from our config.json, and the memory plan's refusal of the one that fits no GPU."""

from __future__ import annotations

import pytest
import torch

from minijamba import JambaConfig
from minijamba.inference.memory_plan import GiB, DoesNotFit, check, plan
from minijamba.model.jamba import Jamba
from minijamba.model.presets import PRESETS

# name: (total, active) parameters rounded as each release's card (or paper) states them, in billions,
# the attention layers, and the end tokens.
RELEASED = {
    "jamba-v0.1": ((51.57, 12.11), [4, 12, 20, 28], (2,)),
    "jamba-1.5-mini": ((51.57, 12.11), [4, 12, 20, 28], (2, 518)),
    "jamba2-mini": ((51.57, 12.11), [4, 12, 20, 28], (519,)),
    "jamba-1.5-large": ((398.6, 94.1), [4, 12, 20, 28, 36, 44, 52, 60, 68], (2, 518)),
    "jamba-reasoning-3b": ((3.03, 3.03), [7, 21], (2, 519)),
    "jamba-tiny-dev": ((0.32, 0.17), [4, 12], (2,)),
}


def test_every_released_preset_is_listed():
    assert set(PRESETS) == set(RELEASED) | {"tiny"}


@pytest.mark.parametrize("name", list(RELEASED))
def test_parameter_counts_on_meta(name):
    (total, active), attention, ends = RELEASED[name]
    config = JambaConfig.from_preset(name)
    with torch.device("meta"):
        model = Jamba(config)
    digits = 2 if total < 100 else 1
    assert round(model.num_parameters() / 1e9, digits) == total
    assert round(model.num_parameters(active=True) / 1e9, digits) == active
    assert model.num_parameters() == config.num_parameters()
    assert [i for i, t in enumerate(config.layer_types) if t == "attention"] == attention
    assert config.end_tokens() == ends


def test_the_exact_counts_the_sources_state():
    """Jamba-tiny-dev: 318,688,640 (counted on its weights); Reasoning 3B: 3.03B, dense and tied."""
    assert JambaConfig.from_preset("jamba-tiny-dev").num_parameters() == 318_688_640
    c = JambaConfig.from_preset("jamba-reasoning-3b")
    assert c.moe_layers == [False] * 28 and c.tie_word_embeddings and c.num_key_value_heads == 1


@pytest.mark.parametrize("name", ["jamba-v0.1", "jamba-reasoning-3b", "jamba-tiny-dev", "jamba-1.5-large"])
def test_transformers_builds_the_same_model_from_our_config_json(name):
    transformers = pytest.importorskip("transformers")
    config = JambaConfig.from_preset(name)
    hf = transformers.JambaConfig(**config.to_hf())
    with torch.device("meta"):
        model = transformers.JambaForCausalLM(hf)
    assert model.num_parameters() == config.num_parameters()
    assert hf.layers_block_type == config.layer_types


def test_the_plan_refuses_a_preset_no_gpu_holds_and_names_what_would_fit():
    p = plan(JambaConfig.from_preset("jamba-1.5-large"), 4096, quantize="int8", chunk=2048)
    assert 390 * GiB < p.weights_total < 430 * GiB  # about 400 GB even with int8 experts
    with pytest.raises(DoesNotFit, match=r"even the weights do not fit \(418\.5 GiB with int8 experts") as e:
        check(p, 79 * GiB)
    assert "no single device holds this model" in str(e.value)
    assert "jamba-1.5-mini (54.1 GiB)" in str(e.value) and "jamba-1.5-large" not in str(e.value).split("fit:")[-1]
    # bf16 Jamba-v0.1 does not fit 79 GiB, but it does with int8 experts: say so
    with pytest.raises(DoesNotFit, match=r"with int8 experts \(--int8-experts\) they take 54\.1 GiB"):
        check(plan(JambaConfig.from_preset("jamba-v0.1"), 4096, chunk=2048), 79 * GiB)


def test_the_readme_states_the_presets_as_the_code_has_them():
    from pathlib import Path

    readme = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    para = readme[readme.index("Presets for every released Jamba") :].split("\n\n")[0].replace("\n", " ")
    large = JambaConfig.from_preset("jamba-1.5-large")
    with torch.device("meta"):
        active = Jamba(large).num_parameters(active=True)
    stated = [
        f"`jamba-1.5-large` ({large.num_parameters() / 1e9:.1f}B / {active / 1e9:.1f}B",
        f"`jamba-reasoning-3b` ({JambaConfig.from_preset('jamba-reasoning-3b').num_parameters() / 1e9:.2f}B",
        f"`jamba-tiny-dev` ({JambaConfig.from_preset('jamba-tiny-dev').num_parameters() / 1e6:.0f}M)",
        f"end tokens {list(JambaConfig.from_preset('jamba-1.5-mini').end_tokens())} and "
        f"{JambaConfig.from_preset('jamba2-mini').eos_token_id}",
    ]
    for s in stated:
        assert s in para, s
    assert all(f"`{name}`" in para for name in RELEASED)

"""Serving many prompts (minijamba.inference.serving): each prompt gets what `generate` gives it alone,
whatever its neighbours, with end tokens, budgets and prompts of length 1; slots are refilled as rows
end; bad input is refused naming the prompt or the line."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import gen, make_model, seeds, small_configs
from minijamba import generate, generate_many
from minijamba.inference.serving import check_prompts, read_prompts_jsonl, serve


def alone(model, prompt, budget, stops=()):
    """What `generate` gives this prompt alone, cut after the first end token."""
    new = generate(model, torch.tensor([prompt]), budget)[0, len(prompt) :].tolist()
    cut = next((i for i, t in enumerate(new) if t in stops), None)
    return new if cut is None else new[: cut + 1]


@settings(max_examples=25, deadline=None)
@given(
    small_configs(), st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=6),
    st.integers(1, 4), st.sampled_from([None, 1, 2]), st.booleans(), st.sampled_from(["reference", "cpu"]), seeds,
)  # fmt: skip
def test_each_prompt_gets_what_it_gets_alone(config, sizes, slots, chunk, with_stop, backend, seed):
    config.scan_backend = backend
    model = make_model(config, seed)  # float64: no near-ties decided by rounding
    g = gen(seed)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=g).tolist() for n, _ in sizes]
    budgets = [b for _, b in sizes]
    stops = ()
    if with_stop:  # an end token that some prompt really produces, early in its completion
        first = alone(model, prompts[0], budgets[0])
        stops = (first[len(first) // 2],)
    expected = [alone(model, p, b, stops) for p, b in zip(prompts, budgets, strict=True)]
    out = generate_many(model, prompts, budgets, batch_size=slots, eos_token_id=stops or None, prefill_chunk=chunk)
    assert out == expected
    done = {f.index: f for f in serve(model, prompts, budgets, batch_size=slots, eos_token_id=stops or None)}
    assert sorted(done) == list(range(len(prompts)))
    for i, f in done.items():
        assert f.tokens == expected[i] and f.prompt_tokens == len(prompts[i])
        stopped = bool(stops) and f.tokens[-1] in stops
        assert f.finish_reason == ("stop" if stopped else "length")
        assert stopped or len(f.tokens) == budgets[i]


def test_a_compiled_step_serves_the_same_tokens():
    """compile_step traces the shared decoding step through torch.compile (its eager backend here,
    which compiles nothing but traces the per-row ends as generate_many passes them)."""
    from minijamba import JambaConfig

    config = JambaConfig.from_preset("tiny", vocab_size=32, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, intermediate_size=8)  # fmt: skip
    model = make_model(config, 1)
    prompts, budgets = [[1, 2, 3], [4], [5, 6]], [4, 2, 3]
    expected = [alone(model, p, b) for p, b in zip(prompts, budgets, strict=True)]
    assert generate_many(model, prompts, budgets, batch_size=2, compile_step={"backend": "eager"}) == expected


def test_a_slot_is_refilled_as_soon_as_its_row_ends():
    """Two slots, one long completion and three of one token: the short ones pass through the other
    slot while the long one runs, so they finish first, in order (no waiting for the batch)."""
    from minijamba import JambaConfig

    config = JambaConfig.from_preset("tiny", vocab_size=32, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, intermediate_size=8)  # fmt: skip
    model = make_model(config, 0)
    prompts = [[1, 2], [3], [4, 5, 6], [7]]
    order = [f.index for f in serve(model, prompts, [1, 5, 1, 1], batch_size=2)]
    assert order == [0, 2, 3, 1]
    assert generate_many(model, prompts, [1, 5, 1, 1], batch_size=2) == [
        alone(model, p, b) for p, b in zip(prompts, [1, 5, 1, 1], strict=True)
    ]


def test_sampling_is_reproducible_and_in_range():
    from minijamba import JambaConfig

    config = JambaConfig.from_preset("tiny", vocab_size=32, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, intermediate_size=8)  # fmt: skip
    model = make_model(config, 1)
    prompts = [[1], [2, 3], [4, 5, 6]]
    runs = [generate_many(model, prompts, 6, temperature=1.0, top_k=5, batch_size=2, generator=gen(7))
            for _ in range(2)]  # fmt: skip
    assert runs[0] == runs[1]
    assert all(len(t) == 6 and all(0 <= x < 32 for x in t) for t in runs[0])


@pytest.mark.parametrize(
    "prompts, budgets, kwargs, words",
    [
        ([], 3, {}, "prompts is empty"),
        ([[1], []], 3, {}, "prompt 1 is empty"),
        ([[1], [2]], [3], {}, "one per prompt"),
        ([[1]], 0, {}, "prompt 0: max_new_tokens"),
        ([[1, 99]], 2, {}, "prompt 0 holds 99"),
        (["abc"], 2, {}, "prompt 0 must be a list"),
        ([[1, 2, 3]], 2, {"capacity": 4}, "5 do not fit the context of 4"),
        ([[1]], 2, {"batch_size": 0}, "batch_size"),
        ([[1]], 2, {"temperature": -1.0}, "temperature"),
    ],
)
def test_bad_input_is_refused_naming_the_prompt(prompts, budgets, kwargs, words):
    from minijamba import JambaConfig

    config = JambaConfig.from_preset("tiny", vocab_size=32, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, intermediate_size=8)  # fmt: skip
    model = make_model(config, 0)
    with pytest.raises(ValueError, match=words):
        generate_many(model, prompts, budgets, **kwargs)


def test_check_prompts_returns_one_budget_per_prompt():
    assert check_prompts([[1], [2, 3]], 4, 10) == [4, 4]
    assert check_prompts([[1], [2, 3]], [1, 2], 10, capacity=5) == [1, 2]


def test_jsonl_lines_are_read_and_bad_ones_named_by_number():
    lines = ['{"prompt": "a"}', "", "not json", '{"text": "b"}', '["x"]', '{"prompt": 3}', '{"prompt": ""}']
    got = read_prompts_jsonl(lines)
    assert [(n, p) for n, p, _ in got] == [(1, "a"), (3, None), (4, None), (5, None), (6, None), (7, "")]
    errors = {n: e for n, _, e in got if e}
    assert "line 3 is not JSON" in errors[3]
    assert 'no "prompt"' in errors[4] and 'no "prompt"' in errors[5] and "int" in errors[6]

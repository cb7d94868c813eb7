"""The mixture of experts: top-K routing, batched experts == the per-expert loop, the aux loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import MODEL_RTOL, RTOL, assert_close, gen, make_model, seeds, small_configs
from minijamba import JambaConfig
from minijamba.kernels.moe_dispatch import experts_grouped
from minijamba.model.moe import MLP, Experts, Router, SparseMoE, experts_loop, load_balancing_loss, router_stats


def moe_config(h=4, f=4, n=4, K=2) -> JambaConfig:
    return JambaConfig.from_preset(
        "tiny", hidden_size=h, intermediate_size=f, num_attention_heads=1, num_key_value_heads=1,
        num_experts=n, num_experts_per_tok=K,
    )  # fmt: skip


@st.composite
def routing(draw):
    n = draw(st.integers(1, 8))
    return dict(t=draw(st.integers(1, 20)), h=draw(st.integers(1, 8)), n=n, K=draw(st.integers(1, n)), seed=draw(seeds))


# --- the router --------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(routing(), st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
def test_router_picks_top_k_distinct_experts_weighted_by_softmax(r, dtype):
    t, h, n, K = r["t"], r["h"], r["n"], r["K"]
    torch.manual_seed(r["seed"])
    router = Router(moe_config(h=h, n=n, K=K)).to(dtype)
    torch.nn.init.normal_(router.weight, std=2.0)
    x = torch.randn(t, h, generator=gen(r["seed"]), dtype=torch.float64).to(dtype)
    probs, weights, experts = router(x)
    assert probs.shape == (t, n) and probs.dtype == torch.float32  # softmax in fp32 at least
    expected = torch.softmax(x.double() @ router.weight.double().T, -1)
    assert_close(probs, expected, {torch.float64: 1e-6, torch.float32: 1e-5, torch.bfloat16: 5e-2}[dtype], "probs")
    assert weights.shape == experts.shape == (t, K) and weights.dtype == dtype
    assert experts.dtype == torch.int64 and ((experts >= 0) & (experts < n)).all()
    assert all(len(set(row.tolist())) == K for row in experts)  # K distinct experts per token
    chosen = probs.gather(1, experts)  # (t, K)
    # The weights are the softmax probabilities of the chosen experts, not renormalised.
    assert_close(weights.float(), chosen, 2**-8 if dtype == torch.bfloat16 else 0.0, "weights")
    unchosen = probs.masked_fill(torch.zeros_like(probs, dtype=torch.bool).scatter(1, experts, True), -1.0)
    assert (chosen.min(1).values >= unchosen.max(1).values).all()  # they are the K largest
    # Not renormalised: the weights sum to 1 minus the probability left on the other experts.
    rest = probs.sum(1) - chosen.sum(1)  # (t,)
    assert_close(weights.float().sum(1), 1 - rest, 2**-6 if dtype == torch.bfloat16 else 1e-6, "sum of weights")


# --- batched experts == the loop ---------------------------------------------------------------


@st.composite
def expert_cases(draw):
    n = draw(st.integers(1, 6))
    K = draw(st.integers(1, n))
    used = draw(st.integers(K, n))  # only `used` experts get tokens: the others get none
    return dict(
        t=draw(st.integers(1, 12)), h=draw(st.sampled_from([1, 2, 3, 4, 8])),
        f=draw(st.sampled_from([1, 2, 3, 4, 8])), n=n, K=K, used=used, seed=draw(seeds),
        dtype=draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16])),
    )  # fmt: skip


def make_experts(c, requires_grad=True):
    g = gen(c["seed"])
    torch.manual_seed(c["seed"])
    experts = Experts(moe_config(h=c["h"], f=c["f"], n=c["n"], K=c["K"]))
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=g))
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=g))
    experts = experts.to(c["dtype"])
    subset = torch.randperm(c["n"], generator=g)[: c["used"]]  # the experts that get tokens
    idx = torch.stack([subset[torch.randperm(c["used"], generator=g)[: c["K"]]] for _ in range(c["t"])])
    x = torch.randn(c["t"], c["h"], generator=g).to(c["dtype"]).requires_grad_(requires_grad)
    weights = torch.rand(c["t"], c["K"], generator=g).to(c["dtype"]).requires_grad_(requires_grad)
    return experts, x, weights, idx


@settings(max_examples=60, deadline=None)
@given(expert_cases())
def test_batched_experts_equal_loop(c):
    """Sorted tokens + grouped matmuls == gather per expert, in values and in every gradient,
    with some experts receiving no tokens at all."""
    experts, x, weights, idx = make_experts(c)
    params = [x, weights, experts.gate_up_proj, experts.down_proj]
    y_loop = experts_loop(experts, x, weights, idx)
    y = experts_grouped(experts, x, weights, idx)  # the fast twin (minijamba.kernels.moe_dispatch)
    tol = RTOL[c["dtype"]] * (4 if c["dtype"] == torch.bfloat16 else 10)
    assert y.dtype == x.dtype
    assert_close(y, y_loop, tol, "outputs")
    cot = torch.randn(y.shape, generator=gen(c["seed"] + 1)).to(y.dtype)
    g_loop = torch.autograd.grad((y_loop * cot).sum(), params)
    g = torch.autograd.grad((y * cot).sum(), params)
    for name, a, b in zip(["x", "weights", "gate_up_proj", "down_proj"], g, g_loop):
        assert_close(a, b, tol, f"d/d{name}")
    unused = sorted(set(range(c["n"])) - set(idx.flatten().tolist()))
    assert not g[2][unused].any() and not g[3][unused].any()  # experts without tokens learn nothing


def test_experts_with_no_tokens_at_all():
    c = dict(t=1, h=4, f=4, n=3, K=1, used=1, seed=0, dtype=torch.float32)
    experts, x, weights, idx = make_experts(c, requires_grad=False)
    for run in (experts, lambda *a: experts_grouped(experts, *a)):
        assert run(x[:0], weights[:0], idx[:0]).shape == (0, 4)
    assert_close(experts_grouped(experts, x, weights, idx), experts_loop(experts, x, weights, idx), 1e-6, "one token")


@settings(max_examples=25, deadline=None)
@given(routing(), st.integers(1, 4), st.sampled_from([torch.float64, torch.float32]))
def test_sparse_moe_is_router_then_experts(r, f, dtype):
    n, K, h = r["n"], r["K"], r["h"]
    torch.manual_seed(r["seed"])
    moe = SparseMoE(moe_config(h=h, f=f, n=n, K=K))
    moe.reset_parameters(std=0.5, out_std=0.5)
    moe = moe.to(dtype)
    x = torch.randn(2, r["t"], h, generator=gen(r["seed"]), dtype=dtype)
    y, stats = moe(x)
    probs, weights, idx = moe.router(x.reshape(-1, h))
    y_ref = experts_loop(moe.experts, x.reshape(-1, h), weights, idx).reshape(x.shape)
    assert_close(y, y_ref, MODEL_RTOL[dtype], "moe output")
    assert_close(load_balancing_loss([stats]), load_balancing_loss([router_stats(probs, idx)]), 1e-12, "aux loss")
    assert stats.counts.sum().item() == 2 * r["t"] * K and stats.rows.item() == 2 * r["t"]
    y_dense, none = MLP(moe_config(h=h, f=f)).to(dtype)(x)
    assert y_dense.shape == x.shape and none is None


# --- the load-balancing loss -------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(routing())
def test_aux_loss_is_k_for_uniform_routing(r):
    """n * sum_i f_i P_i = K (f sums to K, as transformers counts it) when the router probabilities
    are uniform (whatever the assignment), and when the assignments are spread evenly (whatever the
    probabilities)."""
    t, n, K = r["t"], r["n"], r["K"]
    g = gen(r["seed"])
    any_assignment = torch.stack([torch.randperm(n, generator=g)[:K] for _ in range(t)])
    uniform = torch.full((t, n), 1.0 / n)
    assert abs(lbl(uniform, any_assignment) - K) < 1e-6
    # Token j takes experts j, j+1, ..., j+K-1 (mod n): over t = n tokens every expert gets K of n*K.
    balanced = (torch.arange(n)[:, None] + torch.arange(K)[None, :]) % n
    any_probs = torch.softmax(3 * torch.randn(n, n, generator=g), -1)
    assert abs(lbl(any_probs, balanced) - K) < 1e-6
    # Through the router: zero router weights give uniform probabilities.
    router = Router(moe_config(h=r["h"], n=n, K=K))
    torch.nn.init.zeros_(router.weight)
    probs, _, experts = router(torch.randn(t, r["h"], generator=g))
    assert abs(lbl(probs, experts) - K) < 1e-6


def lbl(probs, experts, mask=None) -> float:
    """The loss of one layer's routing."""
    return load_balancing_loss([router_stats(probs, experts, mask)]).item()


@settings(max_examples=60, deadline=None)
@given(routing(), st.floats(0.0, 5.0))
def test_aux_loss_at_least_k_when_tokens_share_probabilities(r, sharpness):
    """If every token has the same router probabilities p, every token picks the same top K, so
    f_i = 1 on them and loss = n * (sum of the top-K p) >= n * K/n = K (the top K of n numbers
    average at least their mean). Equality iff p is uniform (or K = n, where the top K is everything)."""
    t, h, n, K = r["t"], r["h"], r["n"], r["K"]
    torch.manual_seed(r["seed"])
    router = Router(moe_config(h=h, n=n, K=K))
    torch.nn.init.normal_(router.weight, std=sharpness)
    x = torch.randn(1, h, generator=gen(r["seed"])).expand(t, h)  # identical tokens
    probs, _, experts = router(x)
    loss = lbl(probs, experts)
    p = probs[0]
    top = p.topk(K).values.sum()
    assert abs(loss - n * top.item()) < 1e-5 * n
    assert loss >= K - 1e-5 * n  # float32: the probabilities sum to 1 only up to rounding
    if K < n and (p.max() - p.min()).item() > 1e-3:
        assert loss > K + 1e-6  # strictly above the minimum when routing is not uniform


@settings(max_examples=30, deadline=None)
@given(routing(), st.integers(1, 3))
def test_pooled_over_layers_and_padding_left_out(r, layers):
    """The layers' counts are pooled before the product (not a mean of per-layer losses), and a
    masked token counts for nothing: the loss equals that of the real tokens alone."""
    t, h, n, K = r["t"], r["h"], r["n"], r["K"]
    g = gen(r["seed"])
    runs = [(torch.softmax(2 * torch.randn(t, n, generator=g), -1), torch.stack([torch.randperm(n, generator=g)[:K] for _ in range(t)]))
            for _ in range(layers)]  # fmt: skip
    pooled = load_balancing_loss([router_stats(p, e) for p, e in runs]).item()
    f = sum(torch.bincount(e.flatten(), minlength=n).double() for _, e in runs) / (t * layers)
    P = sum(p.double().sum(0) for p, _ in runs) / (t * layers)
    assert abs(pooled - n * (f * P).sum().item()) < 1e-5
    mask = torch.rand(t, generator=g) < 0.6
    mask[0] = True
    masked = load_balancing_loss([router_stats(p, e, mask) for p, e in runs]).item()
    alone = load_balancing_loss([router_stats(p[mask], e[mask]) for p, e in runs]).item()
    assert abs(masked - alone) < 1e-5


def test_aux_loss_has_a_gradient_for_the_router():
    torch.manual_seed(0)
    moe = SparseMoE(moe_config(n=4, K=2))
    moe.reset_parameters(std=0.5)
    _, stats = moe(torch.randn(2, 5, 4))
    (grad,) = torch.autograd.grad(load_balancing_loss([stats]), moe.router.weight)
    assert grad.abs().max() > 1e-6


# --- in the model's training loss --------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(small_configs(moe=True, router_aux_loss_coef=0.25), seeds, st.integers(1, 6))
def test_model_loss_includes_the_aux_loss(config, seed, l):
    """loss = cross-entropy + coef * (the loss of the MoE layers' pooled routing) whenever coef > 0,
    with the gradient to match; exactly the cross-entropy when coef = 0."""
    model = make_model(config, seed)
    g = gen(seed)
    ids = torch.randint(0, config.vocab_size, (2, l), generator=g)
    targets = torch.randint(0, config.vocab_size, (2, l), generator=g)
    targets[0, 0] = -100  # ignored position
    aux = []
    hooks = [
        layer.feed_forward.register_forward_hook(lambda m, i, o: aux.append(o[1]))
        for layer in model.layers
        if isinstance(layer.feed_forward, SparseMoE)
    ]
    assert len(hooks) == sum(config.moe_layers) > 0
    logits, loss = model(ids, targets=targets)
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
    mean_aux = load_balancing_loss(aux)
    assert mean_aux.item() > 0
    assert_close(loss, ce + 0.25 * mean_aux, 1e-12, "loss with aux")
    routers = [layer.feed_forward.router.weight for layer in model.layers if isinstance(layer.feed_forward, SparseMoE)]
    g_with = torch.autograd.grad(loss, routers, retain_graph=True)
    g_aux = torch.autograd.grad(mean_aux, routers, retain_graph=True)

    model.config.router_aux_loss_coef = 0.0
    aux.clear()
    logits0, loss0 = model(ids, targets=targets)
    assert torch.equal(logits0, logits)
    assert torch.equal(loss0, ce)  # exactly the cross-entropy
    g_without = torch.autograd.grad(loss0, routers)
    for a, b, c in zip(g_with, g_without, g_aux):  # the router is trained by the aux loss too
        # The router's softmax runs in fp32: the difference of the two gradients is accurate to a few
        # fp32 steps of the probabilities (which are O(1)), whatever the gradients' own size.
        err = (a - b - 0.25 * c).abs().max().item()
        assert err <= 1e-6 * max(a.abs().max().item(), 1.0), f"router gradient from the aux loss: {err:.3g}"


@settings(max_examples=10, deadline=None)
@given(small_configs(moe=False, router_aux_loss_coef=0.5), seeds)
def test_dense_model_loss_is_cross_entropy(config, seed):
    model = make_model(config, seed)
    ids = torch.randint(0, config.vocab_size, (2, 5), generator=gen(seed))
    logits, loss = model(ids, targets=ids)
    assert torch.equal(loss, F.cross_entropy(logits.flatten(0, 1), ids.flatten()))

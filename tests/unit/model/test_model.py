"""Unit tests of model/gpt.py on a tiny config (CPU, a few seconds); the tests every decoder family
must pass run for each family (`family` parameter; Llama's own tests are in test_llama.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from model import GPT, IGNORE_INDEX, GPTConfig, count_parameters, flops_per_token, generate, get_family

TINY = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
# The same size in each family (Llama: grouped-query attention, 4 query heads on 2 k/v heads).
TINY_OF = {"gpt": TINY, "llama": dict(TINY, n_head=4, n_kv_head=2, intermediate_size=64)}
every_family = pytest.mark.parametrize("family", sorted(TINY_OF))


def tiny_model(family: str = "gpt", **overrides):
    torch.manual_seed(0)
    f = get_family(family)
    return f.build(f.config(**{**TINY_OF[family], **overrides}))


def random_batch(B=3, T=16, V=64, seed=1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, V, (B, T), generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    return idx, targets


@every_family
def test_forward_shapes_and_finite_scalar_loss(family):
    model = tiny_model(family)
    idx, targets = random_batch()
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, 64)
    assert loss.shape == ()
    assert torch.isfinite(loss)
    # At init the predictions are near uniform, so the loss is close to ln(V).
    assert abs(loss.item() - math.log(64)) < 0.5

    logits, loss = model(idx[:, :5])
    assert logits.shape == (3, 5, 64)
    assert loss is None


@every_family
def test_loss_ignores_masked_targets(family):
    model = tiny_model(family)
    idx, targets = random_batch()
    masked = targets.clone()
    masked[:, :7] = IGNORE_INDEX  # e.g. a prompt
    masked[1, 10:] = IGNORE_INDEX  # e.g. padding
    logits, loss = model(idx, masked)

    keep = masked != IGNORE_INDEX
    manual = F.cross_entropy(logits[keep], targets[keep])  # mean over unmasked positions only
    torch.testing.assert_close(loss, manual, rtol=1e-6, atol=1e-6)
    # The masked positions did matter: the unmasked loss differs.
    _, full = model(idx, targets)
    assert not torch.allclose(full, loss)


@every_family
def test_loss_with_a_single_unmasked_position(family):
    model = tiny_model(family)
    idx, targets = random_batch()
    masked = torch.full_like(targets, IGNORE_INDEX)
    masked[2, 11] = targets[2, 11]
    logits, loss = model(idx, masked)
    manual = -F.log_softmax(logits[2, 11], dim=-1)[targets[2, 11]]
    torch.testing.assert_close(loss, manual, rtol=1e-6, atol=1e-6)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@every_family
def test_causal_future_tokens_do_not_change_past_logits(family):
    model = tiny_model(family).eval()
    idx, _ = random_batch(B=2)
    t = 6
    changed = idx.clone()
    changed[:, t + 1] = (changed[:, t + 1] + 1) % 64
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)
    # ... while positions from t+1 on do see the change.
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


def test_lm_head_is_tied_to_token_embedding():
    model = tiny_model()
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_gpt2_module_names():
    # The later Hugging Face export maps these names one to one.
    names = {n for n, _ in tiny_model().named_parameters()}
    for n in (
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.h.1.ln_1.weight",
        "transformer.h.1.ln_1.bias",
        "transformer.h.1.attn.c_attn.weight",
        "transformer.h.1.attn.c_attn.bias",
        "transformer.h.1.attn.c_proj.weight",
        "transformer.h.1.ln_2.bias",
        "transformer.h.1.mlp.c_fc.weight",
        "transformer.h.1.mlp.c_proj.bias",
        "transformer.ln_f.weight",
        "transformer.ln_f.bias",
    ):
        assert n in names
    model = tiny_model()
    assert model.transformer.h[0].attn.c_attn.weight.shape == (3 * 32, 32)
    assert model.transformer.h[0].ln_1.eps == 1e-5


def test_init_std_and_scaled_residual_projections():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=512, block_size=64, n_layer=8, n_head=4, n_embd=256)
    model = GPT(cfg)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.count_nonzero(model.transformer.h[0].attn.c_attn.bias) == 0
    scaled = 0.02 / math.sqrt(2 * cfg.n_layer)
    assert model.transformer.h[3].attn.c_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert model.transformer.h[3].mlp.c_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)


@pytest.mark.parametrize(
    "cfg",
    [
        GPTConfig(**TINY),
        GPTConfig(**TINY, bias=False),
        GPTConfig(vocab_size=101, block_size=7, n_layer=3, n_head=3, n_embd=48),
        # GPT-2 small at its real vocabulary: the known 124,439,808 including wpe.
        GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768),
        GPTConfig(vocab_size=50304, block_size=1024, n_layer=24, n_head=16, n_embd=1024),
    ],
    ids=["tiny", "tiny-nobias", "odd", "gpt2", "gpt2-medium"],
)
def test_num_parameters_matches_formula(cfg):
    # The meta device allocates no memory, so the large configs cost nothing to build.
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_parameters() == count_parameters(cfg)
    if cfg.vocab_size == 50257:
        assert count_parameters(cfg) == 124_439_808


def test_flops_per_token_by_hand():
    cfg = GPTConfig(**TINY)
    C, L, V, T = 32, 2, 64, 16
    # Per block: 12C^2 weights + 13C biases/LayerNorm; plus wte (tied head) and ln_f; no wpe.
    n = L * (12 * C * C + 13 * C) + V * C + 2 * C
    assert n == count_parameters(cfg) - T * C
    expected = 6 * n + 12 * L * C * T
    assert flops_per_token(cfg, seq_len=T) == pytest.approx(expected)
    assert flops_per_token(cfg, seq_len=T) > 0
    # The attention term grows with the context.
    assert flops_per_token(cfg, seq_len=8) < flops_per_token(cfg, seq_len=T)


@every_family
def test_sequence_longer_than_block_size_raises(family):
    model = tiny_model(family)
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize(
    "bad, field",
    [
        (dict(n_embd=30, n_head=4), "n_embd"),
        (dict(n_layer=0), "n_layer"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
    ],
)
def test_config_validation_names_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**{**TINY, **bad})


@every_family
def test_overfits_one_batch(family):
    model = tiny_model(family)
    idx, targets = random_batch(B=4, T=16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _step in range(300):
        _, loss = model(idx, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if loss.item() < 0.02:
            break
    assert loss.item() < 0.05, f"loss {loss.item():.4f} after {_step + 1} steps"


@every_family
def test_dropout_zero_train_equals_eval(family):
    model = tiny_model(family, dropout=0.0)
    idx, targets = random_batch()
    _, train_loss = model.train()(idx, targets)
    _, eval_loss = model.eval()(idx, targets)
    assert torch.equal(train_loss, eval_loss)


@every_family
def test_dropout_is_active_in_training_only(family):
    model = tiny_model(family, dropout=0.2)
    idx, targets = random_batch()
    torch.manual_seed(5)
    _, a = model.train()(idx, targets)
    _, b = model.train()(idx, targets)
    assert not torch.equal(a, b)  # different masks each call
    _, c = model.eval()(idx, targets)
    _, d = model.eval()(idx, targets)
    assert torch.equal(c, d)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@every_family
def test_activation_checkpointing_same_loss_and_grads(dropout, family):
    idx, targets = random_batch()
    results = []
    for ckpt in (False, True):
        model = tiny_model(family, dropout=dropout, activation_checkpointing=ckpt).train()
        torch.manual_seed(7)  # same dropout masks in both runs; the recompute replays the RNG
        _, loss = model(idx, targets)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], rtol=1e-6, atol=1e-7, msg=n)


@every_family
def test_generate_appends_tokens_and_crops_context(family):
    model = tiny_model(family).eval()
    idx = torch.zeros(2, 3, dtype=torch.long)
    out = generate(model, idx, max_new_tokens=20, top_k=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 23)  # longer than block_size: the context was cropped
    assert torch.equal(out[:, :3], idx)
    assert int(out.min()) >= 0 and int(out.max()) < 64
    # Greedy decoding is deterministic and picks the argmax.
    greedy = generate(model, idx, max_new_tokens=1, temperature=0)
    with torch.no_grad():
        logits, _ = model(idx)
    assert torch.equal(greedy[:, -1], logits[:, -1].argmax(-1))


# --- KV cache and generation ------------------------------------------------------------------


@every_family
def test_kv_cache_prefill_then_one_token_at_a_time_equals_full_forward(family):
    model = tiny_model(family).eval()
    idx, _ = random_batch(B=2, T=16)
    with torch.no_grad():
        full, _ = model(idx)  # (B, 16, V), no cache
        cache = model.new_kv_cache(batch_size=2)
        prefill, _ = model(idx[:, :5], kv_cache=cache)
        torch.testing.assert_close(prefill, full[:, :5], rtol=0, atol=1e-5)
        assert cache.length == 5
        for t in range(5, 16):
            step, _ = model(idx[:, t : t + 1], kv_cache=cache)  # (B, 1, V) at position t
            torch.testing.assert_close(step[:, 0], full[:, t], rtol=0, atol=1e-5, msg=f"position {t}")
    assert cache.length == 16


@every_family
def test_kv_cache_multi_token_chunks_after_a_prefix(family):
    # T > 1 new tokens after L > 0 cached ones needs the offset causal mask.
    model = tiny_model(family).eval()
    idx, _ = random_batch(B=2, T=16)
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_kv_cache(batch_size=2)
        chunks = [model(idx[:, a:b], kv_cache=cache)[0] for a, b in ((0, 4), (4, 9), (9, 10), (10, 16))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=0, atol=1e-5)


@every_family
def test_kv_cache_reset_and_limits(family):
    model = tiny_model(family).eval()
    idx, _ = random_batch(B=2, T=16)
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_kv_cache(batch_size=2)
        model(idx[:, :16], kv_cache=cache)
        with pytest.raises(ValueError, match="block_size"):
            model(idx[:, :1], kv_cache=cache)  # position 16 does not exist
        cache.reset()
        again, _ = model(idx[:, :3], kv_cache=cache)  # stale buffers are never read
        torch.testing.assert_close(again, full[:, :3], rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="batch size"):
            model(idx[:1, :1], kv_cache=cache)


def greedy_by_hand(model, idx, n):
    """Reference greedy decoding: full forward over the last block_size tokens each step."""
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(idx[:, -model.config.block_size :])
            idx = torch.cat((idx, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    return idx


@pytest.mark.parametrize("prompt_len", [1, 5, 16, 20], ids=lambda n: f"prompt{n}")
@every_family
def test_generate_with_and_without_cache_agree(prompt_len, family):
    # 30 new tokens run past block_size=16 (and prompt 20 starts past it): the cached path must
    # fall back to the cropped window and still match.
    model = tiny_model(family).eval()
    prompt = torch.randint(0, 64, (2, prompt_len), generator=torch.Generator().manual_seed(3))
    cached = generate(model, prompt, max_new_tokens=30, temperature=0, use_cache=True)
    plain = generate(model, prompt, max_new_tokens=30, temperature=0, use_cache=False)
    assert torch.equal(cached, plain)
    assert torch.equal(cached, greedy_by_hand(model, prompt, 30))
    sampled = [
        generate(model, prompt, 30, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(7), use_cache=c)
        for c in (True, False)
    ]
    assert torch.equal(sampled[0], sampled[1])
    assert sampled[0].shape == (2, prompt_len + 30)
    assert torch.equal(sampled[0][:, :prompt_len], prompt)


@every_family
def test_generate_is_deterministic_under_a_seed(family):
    model = tiny_model(family).eval()
    prompt = torch.zeros(2, 2, dtype=torch.long)

    def sample(seed):
        return generate(model, prompt, 24, temperature=1.0, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))


@every_family
def test_top_k_one_is_greedy(family):
    model = tiny_model(family).eval()
    prompt = torch.randint(0, 64, (3, 4), generator=torch.Generator().manual_seed(4))
    greedy = generate(model, prompt, 20, temperature=0)
    top1 = generate(model, prompt, 20, temperature=0.7, top_k=1, generator=torch.Generator().manual_seed(9))
    assert torch.equal(top1, greedy)


@every_family
def test_generate_runs_in_eval_mode_and_restores_the_mode(family):
    model = tiny_model(family, dropout=0.3).train()
    prompt = torch.zeros(1, 3, dtype=torch.long)
    a = generate(model, prompt, 10, temperature=0)
    b = generate(model, prompt, 10, temperature=0)
    assert torch.equal(a, b)  # no dropout during generation
    assert model.training
    assert torch.equal(a, greedy_by_hand(model.eval(), prompt, 10))
    generate(model, prompt, 2, temperature=0)
    assert not model.training


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_k=0), dict(max_new_tokens=-1)])
def test_generate_rejects_bad_arguments(bad):
    model = tiny_model()
    args = {"max_new_tokens": 3, **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        generate(model, torch.zeros(1, 2, dtype=torch.long), **args)


@every_family
def test_generate_uses_the_cache_until_the_window_is_full(family):
    model = tiny_model(family).eval()
    calls = []  # (tokens fed, with cache?) per forward

    def record(module, args, kwargs):
        calls.append((args[0].size(1), kwargs.get("kv_cache") is not None))

    model.register_forward_pre_hook(record, with_kwargs=True)
    generate(model, torch.zeros(1, 5, dtype=torch.long), max_new_tokens=14, temperature=0)
    # Prefill 5, decode one at a time until 16 positions are cached, then recompute the window.
    assert calls == [(5, True)] + [(1, True)] * 11 + [(16, False)] * 2


@every_family
def test_generate_allocates_only_the_positions_it_can_reach(family):
    # An imported model may promise 131072 positions; a short generation must not allocate them all.
    model = tiny_model(family).eval()
    made = []
    allocate = model.new_kv_cache
    model.new_kv_cache = lambda batch, capacity=None: made.append(capacity) or allocate(batch, capacity)
    prompt = torch.randint(0, 64, (2, 3), generator=torch.Generator().manual_seed(3))
    out = generate(model, prompt, max_new_tokens=4, temperature=0)
    assert made == [7]
    assert torch.equal(out, greedy_by_hand(model, prompt, 4))
    cache = allocate(2, 7)
    assert cache.capacity == 7 and allocate(2, 1000).capacity == 16  # never more than block_size
    with torch.no_grad():
        model(prompt, kv_cache=cache)
        with pytest.raises(ValueError, match="capacity 7"):
            model(torch.zeros(2, 5, dtype=torch.long), kv_cache=cache)


def test_the_config_classes_are_the_registrys_families():
    """model.config finds a family's config class by itself (it may not import the registry): the
    same families, with the same classes, as model.registry.FAMILIES."""
    from model.config import config_classes
    from model.registry import FAMILIES

    assert config_classes() == {name: f.config for name, f in FAMILIES.items()}

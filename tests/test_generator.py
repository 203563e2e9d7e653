"""The scale-wise generator: cached sampling vs teacher forcing, seeds, guidance, training."""
import pytest
import torch

from conftest import make_tiny_generator, random_batch
from starkit.generator.blocks import key_padding_bias
from starkit.positional import LearnedAbsolutePE, NormalizedRoPE2D, RoPE2D

TOL = 1e-5  # float32 on CPU: cached and masked passes differ only by summation order


def teacher_forced_and_cached_logits(gen, prompts, seed=0):
    torch.manual_seed(seed)
    tok, net = gen.tokenizer, gen.transformer
    B = len(prompts)
    idx = [torch.randint(0, tok.codebook_size, (B, pn * pn)) for pn in tok.patch_nums]
    text = gen.text_encoder.encode(prompts)
    full = net.logits(net(text.pooled, text.tokens, text.mask, tok.teacher_forcing_inputs(idx)))
    caches = net.new_caches(B, "cpu", torch.float32)
    kvs, bias = net.text_kv(text.tokens), key_padding_bias(text.mask)
    x, f_hat, parts = net.start_tokens(text.pooled), tok.empty_latent(B), []
    for k, pn in enumerate(tok.patch_nums):
        parts.append(net.logits(net.forward_scale(x, k, caches, kvs, bias)))
        f_hat = tok.add_scale(f_hat, k, tok.embed(idx[k]).float())
        if k + 1 < len(tok.patch_nums):
            x = net.scale_tokens(tok.next_scale_input(f_hat, k + 1), k + 1)
    return full, torch.cat(parts, dim=1)


@pytest.mark.parametrize("positional", [NormalizedRoPE2D, RoPE2D, LearnedAbsolutePE])
def test_kv_cached_logits_equal_teacher_forced(positional):
    gen = make_tiny_generator(positional=positional).eval()
    full, cached = teacher_forced_and_cached_logits(gen, ["a red circle", "two blue squares", ""])
    assert full.shape == cached.shape == (3, 1 + 4 + 9 + 16, 16)
    assert (full - cached).abs().max().item() < TOL


def test_generation_is_reproducible_with_a_seed(tiny_generator):
    a = tiny_generator.generate(["a red circle", "a blue square"], seed=3)
    b = tiny_generator.generate(["a red circle", "a blue square"], seed=3)
    c = tiny_generator.generate(["a red circle", "a blue square"], seed=4, top_k=None, top_p=None)
    assert a.shape == (2, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    _, ia = tiny_generator.generate(["a red circle"], seed=3, return_indices=True)
    _, ic = tiny_generator.generate(["a red circle"], seed=5, return_indices=True)
    assert any(not torch.equal(x, y) for x, y in zip(ia, ic))


def test_cfg_uses_the_empty_prompt_in_the_same_batch(tiny_generator, monkeypatch):
    from starkit.generator import sampling
    seen = {}
    real = sampling.encode_with_guidance

    def spy(text_encoder, prompts, guided, device, **kwargs):
        out = real(text_encoder, prompts, guided, device, **kwargs)
        seen["rows"], seen["uncond"] = out.pooled.shape[0], out[len(prompts):]
        return out

    monkeypatch.setattr(sampling, "encode_with_guidance", spy)
    tiny_generator.generate(["a red circle", "a blue square"], cfg=3.0, seed=0)
    assert seen["rows"] == 4
    empty = tiny_generator.text_encoder.empty()
    assert torch.allclose(seen["uncond"].pooled, empty.pooled.expand(2, -1))
    tiny_generator.generate(["a red circle", "a blue square"], cfg=0.0, seed=0)
    assert seen["rows"] == 2  # no unconditional pass without guidance


def test_guidance_formula():
    from starkit.samplers.functional import apply_guidance, guidance_weight
    cond, uncond = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    t = guidance_weight(4.0, 3, 10)
    assert t == pytest.approx(4.0 * 3 / 9)
    assert torch.allclose(apply_guidance(torch.cat([cond, uncond]), t, True), (1 + t) * cond - t * uncond)
    assert guidance_weight(4.0, 3, 10, "constant") == 4.0


@pytest.mark.parametrize("kwargs,match", [({"top_k": 0}, "top_k"), ({"top_p": 1.5}, "top_p"), ({"top_p": 0.0}, "top_p"),
                                          ({"cfg": -1.0}, "cfg"), ({"temperature": 0.0}, "temperature")])
def test_invalid_sampling_settings_are_clear_errors(tiny_generator, kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_generator.generate(["a red circle"], **kwargs)


def test_empty_prompt_list_is_a_clear_error(tiny_generator):
    with pytest.raises(ValueError, match="empty"):
        tiny_generator.generate([])


def test_top_k_top_p_filtering_matches_definition():
    from starkit.samplers.functional import filter_logits
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]]).log_softmax(-1)
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[False, False, False, True, True]]
    probs = torch.tensor([[0.05, 0.1, 0.15, 0.3, 0.4]])
    kept = torch.isfinite(filter_logits(probs.log(), top_p=0.6))  # 0.4 + 0.3 >= 0.6: two kept
    assert kept.tolist() == [[False, False, False, True, True]]


def test_temperature_divides_the_logits_and_top_p_keeps_vars_boundary():
    """Temperature T: logits / T (written out here, not through the code under test); top-p removes the tokens
    whose ascending cumulative probability is <= 1 - top_p (VAR's `<=`), checked on dyadic probabilities that
    float32 sums exactly, so the boundary case is hit: 0.125 + 0.125 == 1 - 0.75."""
    from starkit.samplers.functional import candidates, filter_logits
    logits = torch.tensor([[0.3, -1.2, 2.0, 0.5, -0.1]])
    torch.testing.assert_close(filter_logits(logits, temperature=2.0), logits / 2.0)
    torch.testing.assert_close(candidates(logits, top_k=2, temperature=0.5).probs,
                               torch.tensor([[2.0, 0.5]]).div(0.5).softmax(-1))
    torch.testing.assert_close(candidates(logits, temperature=4.0).probs, (logits / 4.0).softmax(-1))
    dyadic = torch.tensor([[0.125, 0.25, 0.125, 0.5]]).log()
    assert torch.isfinite(filter_logits(dyadic, top_p=0.75)).tolist() == [[False, True, False, True]]
    torch.testing.assert_close(candidates(dyadic, top_p=0.75).probs, torch.tensor([[0.0, 1 / 3, 0.0, 2 / 3]]))


def test_exponential_race_sampling_has_the_categorical_distribution():
    from starkit.samplers.functional import sample_categorical
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    g = torch.Generator().manual_seed(0)
    draws = sample_categorical(probs.log().expand(200000, 4), g)
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    assert torch.allclose(freq, probs, atol=0.005)


def test_training_step_loss_decreases_and_frozen_parts_stay_frozen():
    gen = make_tiny_generator(caption_dropout=0.0, lr=3e-3, drop_path_rate=0.0)
    gen.train()
    assert not gen.tokenizer.training and not gen.text_encoder.training
    assert not any(p.requires_grad for p in gen.tokenizer.parameters())
    opt = torch.optim.AdamW([p for p in gen.transformer.parameters()], lr=3e-3)
    batch = random_batch(4)
    gen.log = lambda *a, **k: None
    losses = []
    for _ in range(30):
        loss = gen._loss(batch, "train")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.7 * losses[0]


def test_token_dropping_keeps_the_loss_defined():
    gen = make_tiny_generator(token_drop=10)
    gen.train()
    gen.log = lambda *a, **k: None
    keep = gen._keep_positions()
    assert keep.numel() == 30 - 10 and keep[:14].tolist() == list(range(14))
    loss = gen._loss(random_batch(2), "train")
    assert torch.isfinite(loss)
    loss.backward()
    with pytest.raises(ValueError, match="token_drop"):
        make_tiny_generator(token_drop=16)


def test_checkpoint_holds_only_trainable_parts_and_ema_follows():
    gen = make_tiny_generator(ema_decay=0.5)
    keys = gen.state_dict().keys()
    # a tokenizer with random weights has no file of its own: it stays in the checkpoint
    assert any(k.startswith("tokenizer.") for k in keys)
    gen.tokenizer.hparams["pretrained"] = "some/dir"
    keys = gen.state_dict().keys()
    assert not any(k.startswith(("tokenizer.", "text_encoder.")) for k in keys)
    assert any(k.startswith("ema.") for k in keys) and any(k.startswith("transformer.") for k in keys)
    with torch.no_grad():
        for p in gen.transformer.parameters():
            p.add_(1.0)
    before = next(gen.ema.parameters()).clone()
    gen.on_train_batch_end(None, None, 0)
    after = next(gen.ema.parameters())
    target = next(gen.transformer.parameters())
    assert torch.allclose(after, 0.5 * before + 0.5 * target)


def test_optimizer_groups_follow_var():
    gen = make_tiny_generator()
    opt = gen.configure_optimizers()["optimizer"]
    decay, no_decay = opt.param_groups
    ids = {id(p) for p in no_decay["params"]}
    assert id(gen.transformer.pos_start) in ids and id(gen.transformer.lvl_embed.weight) in ids
    assert id(gen.transformer.blocks[0].attn.q_bias) in ids
    assert id(gen.transformer.blocks[0].attn.mat_qkv.weight) not in ids
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_wrong_architecture_checkpoint_names_the_keys():
    small, other = make_tiny_generator(), make_tiny_generator(depth=3)
    with pytest.raises(RuntimeError, match="missing keys.*transformer.blocks.2"):
        other.on_load_checkpoint({"state_dict": small.state_dict()})


def test_gradient_clipping_by_global_norm_works_with_any_adamw():
    gen = make_tiny_generator()
    opt = gen.configure_optimizers()["optimizer"]
    for p in gen.transformer.parameters():
        p.grad = torch.full_like(p, 10.0)
    gen.configure_gradient_clipping(opt, 2.0, "norm")
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in gen.transformer.parameters()]))
    assert norm.item() == pytest.approx(2.0, rel=1e-4)


@pytest.mark.parametrize("drop,patch_nums", [(0, (1, 2, 3, 4)), (5, (1, 2, 3, 4)), (0, (1, 2, 3, 4, 6, 8, 10, 13, 16)),
                                              (40, (1, 2, 3, 4, 6, 8, 10, 13, 16))])
def test_flex_attention_forward_equals_sdpa(drop, patch_nums):
    """attention="flex" (a FlexAttention BlockMask) gives the dense block-causal mask's hidden states,
    with and without token dropping, also with L = 655 > 128 where whole blocks are skipped (its
    backward runs on CUDA only: benchmarks/bench_train.py)."""
    from conftest import make_tiny_tokenizer
    gen = make_tiny_generator(tokenizer=make_tiny_tokenizer(patch_nums=patch_nums))
    tr = gen.transformer
    B, L = 2, tr.seq_len
    last = patch_nums[-1] ** 2
    torch.manual_seed(0)
    pooled, tokens = torch.randn(B, 32), torch.randn(B, 5, 32)
    mask = torch.ones(B, 5, dtype=torch.bool)
    inputs = torch.randn(B, L - tr.first_l, gen.tokenizer.embed_dim)
    keep = None if drop == 0 else torch.cat([torch.arange(L - last), torch.arange(L - last, L)[drop:]])
    outs = []
    with torch.no_grad():
        for attention in ("sdpa", "flex"):
            tr.attention = attention
            outs.append(tr(pooled, tokens, mask, inputs, keep))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_flex_attention_trains_with_the_dense_mask_off_cuda():
    gen = make_tiny_generator(attention="flex", caption_dropout=0.0)
    gen.train()
    gen.log = lambda *a, **k: None
    with pytest.warns(UserWarning, match="CUDA only"):
        gen._loss(random_batch(batch_size=2), "train").backward()


def test_attention_choice_is_validated():
    with pytest.raises(ValueError, match="attention"):
        make_tiny_generator(attention="xformers")


def test_inference_caches_follow_parameter_updates():
    """Bias concatenations and QK scales are cached while gradients are off; an in-place update (an
    optimizer step), a load_state_dict or a dtype change must be seen by the next call."""
    gen = make_tiny_generator().eval()
    tr = gen.transformer
    B, L = 2, tr.seq_len
    torch.manual_seed(0)
    args = (torch.randn(B, 32), torch.randn(B, 5, 32), torch.ones(B, 5, dtype=torch.bool),
            torch.randn(B, L - tr.first_l, gen.tokenizer.embed_dim))
    with torch.no_grad():
        before = tr(*args)
        assert torch.equal(before, tr(*args))  # served from the caches
        for block in tr.blocks:
            block.attn.q_bias.add_(0.5)
            block.attn.qk_norm.scale_mul_1H11.sub_(0.3)
        after = tr(*args)
    fresh = tr(*args).detach()  # gradients on: nothing cached
    assert not torch.allclose(before, after) and torch.allclose(after, fresh, atol=1e-6)
    state = {k: v.clone() for k, v in tr.state_dict().items()}
    for k in state:
        if k.endswith("attn.q_bias"):
            state[k].zero_()
    tr.load_state_dict(state)
    with torch.no_grad():
        reloaded = tr(*args)
    assert torch.allclose(reloaded, tr(*args).detach(), atol=1e-6)


def test_autocast_weights_are_cast_once_and_follow_updates():
    """At inference under autocast the generator's Linear layers cast their weights once per weight
    version (not at every scale and sampler step); the result equals nn.Linear under autocast, and
    an in-place update or a training call is never served a stale copy."""
    from starkit.generator.blocks import Linear
    torch.manual_seed(0)
    ours, ref = Linear(16, 8), torch.nn.Linear(16, 8)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        first = ours(x)
        assert first.dtype == torch.bfloat16 and torch.equal(first, ref(x))
        cached = dict(ours._inference_cache)
        assert {k.split(":")[0] for k in cached} == {"weight", "bias"}
        ours(x)
        assert all(ours._inference_cache[k][1] is cached[k][1] for k in cached)  # not cast again
        ours.weight.add_(1.0)  # (autocast's own cache would serve the old cast here, in this region)
        ref.weight.add_(1.0)
        updated = ours(x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(updated, ref(x))  # the update is seen
    with torch.autocast("cpu", dtype=torch.bfloat16):  # gradients on: plain autocast, gradients flow
        out = ours(x)
        out.float().sum().backward()
        assert ours.weight.grad is not None and torch.equal(out.detach(), ref(x).detach())
    with torch.no_grad():  # no autocast: float32 weights as they are
        assert torch.equal(ours(x), ref(x))
    from starkit.utils.inference_cache import clear_inference_caches
    holder = torch.nn.Sequential(ours)
    clear_inference_caches(holder)  # what the generator does after validation during fit
    assert "_inference_cache" not in ours.__dict__


def test_top_k_then_top_p_equals_the_two_pass_definition():
    """The fast path (nucleus among the sorted top-k) keeps the same tokens with the same logits as
    top-k masking followed by a full sort (VAR's sample_with_top_k_top_p_), on random logits."""
    from starkit.samplers.functional import filter_logits
    torch.manual_seed(0)
    logits = torch.randn(2, 64, 256) * 3

    def two_pass(x, k, p):
        kth = x.topk(k, dim=-1).values.amin(dim=-1, keepdim=True)
        x = x.masked_fill(x < kth, float("-inf"))
        sorted_x, order = x.sort(dim=-1)
        remove = sorted_x.softmax(dim=-1).cumsum(dim=-1) <= (1 - p)
        remove[..., -1:] = False
        return x.masked_fill(remove.scatter(-1, order, remove), float("-inf"))

    for k, p in [(40, 0.8), (40, 0.999), (1, 0.5), (200, 0.3)]:
        assert torch.equal(filter_logits(logits, top_k=k, top_p=p), two_pass(logits, k, p))
    only_k = filter_logits(logits, top_k=40)
    assert torch.isfinite(only_k).sum(-1).eq(40).all()


def test_compiled_blocks_train_like_eager_blocks():
    """ScaleWiseGenerator(compile=True): the training pass runs torch.compile'd blocks (real rotary
    formula, no graph break) with the same loss and gradients as the eager blocks, activation
    checkpointing and token dropping included; passes without gradients and the state-dict keys
    are unchanged. (Compiling on the CPU takes ~20 s.)"""
    import torch._dynamo
    from conftest import random_batch
    batch = random_batch(4)
    results = []
    for compile_ in (False, True):
        gen = make_tiny_generator(compile=compile_, token_drop=3, activation_checkpointing=True).train()
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        torch.manual_seed(1)
        loss = gen._loss(batch, "train")
        loss.backward()
        grads = [p.grad.clone() for p in gen.transformer.parameters() if p.grad is not None]
        results.append((loss.detach(), grads, dict(torch._dynamo.utils.counters["graph_break"]),
                        torch._dynamo.utils.counters["stats"]["unique_graphs"]))
        if compile_:
            assert gen.transformer.compile_blocks and gen.hparams.compile
            assert not any("_orig_mod" in k for k in gen.state_dict())
            with torch.no_grad():  # eager without gradients: no new graph
                gen.eval()._loss(batch, "val")
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == results[-1][3]
    (loss_e, grads_e, _, graphs_e), (loss_c, grads_c, breaks_c, graphs_c) = results
    assert graphs_e == 0 and graphs_c >= 1 and breaks_c == {}
    assert torch.allclose(loss_e, loss_c, atol=1e-5)
    assert max((a - b).abs().max().item() for a, b in zip(grads_e, grads_c)) < 1e-5


def test_compiled_blocks_share_graphs_across_depth_drop_path_and_batch_sizes(monkeypatch):
    """Drop-path rates differ per block: as Python numbers they made dynamo compile one graph per
    block and, past its recompile limit (8), leave deep models eager. With the rate in a tensor a
    12-block model with drop-path needs at most 4 graphs over three batch sizes."""
    import torch._dynamo
    from conftest import random_batch
    from starkit.generator import transformer
    monkeypatch.setitem(transformer.COMPILE_OPTIONS, "backend", "eager")  # graphs are dynamo's; fast
    gen = make_tiny_generator(compile=True, depth=12, drop_path_rate=0.2).train()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for B in (4, 3, 2):
        gen._loss(random_batch(B), "train").backward()
    counters = torch._dynamo.utils.counters
    assert 1 <= counters["stats"]["unique_graphs"] <= 4
    assert counters["frames"]["total"] == counters["frames"]["ok"]
    torch._dynamo.reset()


def test_fused_optimizer_steps_refresh_the_inference_caches():
    """A fused AdamW step writes the parameters without raising their version counter: the cached
    bf16 weights and biases must still be rebuilt (a global optimizer-step hook marks them)."""
    from conftest import random_batch
    from starkit.generator.graphs import weights_fingerprint as fingerprint
    gen = make_tiny_generator().train()
    batch = random_batch(4)
    opt = torch.optim.AdamW(gen.transformer.parameters(), lr=1e-2, fused=True)

    def val_loss():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            torch.manual_seed(0)
            return gen.eval()._loss(batch, "val").item()

    val_loss()  # fills the caches
    before = fingerprint(gen.transformer)
    for _ in range(2):
        gen.train()
        opt.zero_grad()
        gen._loss(batch, "train").backward()
        opt.step()
    assert fingerprint(gen.transformer) != before
    cached = val_loss()
    from starkit.utils.inference_cache import clear_inference_caches
    clear_inference_caches(gen)
    assert cached == val_loss()  # what the caches served equals a fresh cast of the new weights


def test_decoding_in_chunks_equals_one_decode(tiny_generator, monkeypatch):
    from starkit.generator import sampling
    tok = tiny_generator.tokenizer
    side = tok.patch_nums[-1]
    f_hat = torch.randn(5, tok.embed_dim, side, side)
    with torch.no_grad():
        whole = tok.decode_latent(f_hat)
        monkeypatch.setattr(sampling, "DECODE_LATENT_AREA", 2 * side * side)  # chunks of 2, 2 and 1 images
        chunked = sampling.decode_in_chunks(tok, f_hat)
    assert chunked.shape == whole.shape and torch.allclose(chunked, whole, atol=1e-4)  # batch-size-dependent conv kernels


@pytest.mark.parametrize("cfg", [0.0, 2.0])
def test_static_scale_steps_generate_the_same_images(cfg):
    """generate(cuda_graphs=True) runs the scale steps on buffers kept between calls (CUDA graphs on
    the GPU; eager on the CPU): the same images as the plain loop, across calls, batch sizes and a
    weight update."""
    from starkit.samplers import StableSampler
    gen = make_tiny_generator().eval()
    prompts = ["a red circle", "two blue squares", ""]
    for sampler in (None, StableSampler(causal_scales=2, steps=2, steps_last=3, random_steps=1, use_head=False)):
        for n in (3, 1, 3):  # a new shape rebuilds the buffers, the old one again too
            ref = gen.generate(prompts[:n], seed=5, cfg=cfg, sampler=sampler)
            out = gen.generate(prompts[:n], seed=5, cfg=cfg, sampler=sampler, cuda_graphs=True)
            assert torch.equal(ref, out)
    steps = gen._static_steps["steps"]
    with torch.no_grad():
        gen.transformer.head_logits.bias.add_(0.3)  # an optimizer-like in-place update
    out = gen.generate(prompts, seed=5, cfg=cfg, cuda_graphs=True)
    assert gen._static_steps["steps"] is not steps  # rebuilt for the new weights
    assert torch.equal(out, gen.generate(prompts, seed=5, cfg=cfg))
    gen.release_cuda_graphs()
    assert "_static_steps" not in gen.__dict__
    assert torch.equal(out, gen.generate(prompts, seed=5, cfg=cfg, cuda_graphs=True))  # built again on demand


@pytest.mark.parametrize("cfg", [0.0, 2.0])
def test_whole_generation_graph_generates_the_same_images(cfg):
    """generate(cuda_graphs="whole") keeps one WholeGenerationGraph (one CUDA graph on the GPU; eager calls on
    its static buffers here): the same images as the plain loop for every kind of seed, both samplers, new
    batch shapes and settings (a new key each), re-seeded at every call, and a new one after a weight update."""
    from starkit.generator.whole_graph import WholeGenerationGraph
    from starkit.samplers import StableSampler
    gen = make_tiny_generator().eval()
    prompts = ["a red circle", "two blue squares", ""]
    stable = StableSampler(causal_scales=2, steps=2, steps_last=3, random_steps=1, use_head=False)
    for sampler in (None, stable):
        for n, seed in ((3, 5), (1, 5), (3, [4, 9, 1]), (3, 6)):
            ref = gen.generate(prompts[:n], seed=seed, cfg=cfg, sampler=sampler)
            out = gen.generate(prompts[:n], seed=seed, cfg=cfg, sampler=sampler, cuda_graphs="whole")
            assert torch.equal(ref, out)
            assert isinstance(gen._static_steps["whole"], WholeGenerationGraph) and "steps" not in gen._static_steps
    whole = gen._static_steps["whole"]
    again = gen.generate(prompts, seed=6, cfg=cfg, sampler=stable, cuda_graphs="whole")
    assert gen._static_steps["whole"] is whole  # same key: kept
    assert torch.equal(again, gen.generate(prompts, seed=6, cfg=cfg, sampler=stable))
    gen.generate(prompts, seed=6, cfg=cfg, sampler=stable.with_settings(top_k=3), cuda_graphs="whole")
    assert gen._static_steps["whole"] is not whole  # another setting: another key
    whole = gen._static_steps["whole"]
    with torch.no_grad():
        gen.transformer.head_logits.bias.add_(0.3)  # an optimizer-like in-place update
    out = gen.generate(prompts, seed=5, cfg=cfg, cuda_graphs="whole")
    assert gen._static_steps["whole"] is not whole
    assert torch.equal(out, gen.generate(prompts, seed=5, cfg=cfg))
    assert torch.equal(out, gen.generate(prompts, seed=5, cfg=cfg, cuda_graphs=True))  # per-step graphs replace it
    assert "whole" not in gen._static_steps and "steps" in gen._static_steps
    gen.release_cuda_graphs()
    assert "_static_steps" not in gen.__dict__
    with pytest.raises(ValueError, match="cuda_graphs must be"):
        gen.generate(prompts, cuda_graphs="all")


def test_whole_generation_graph_returns_copies_and_rekeys_on_any_setting(monkeypatch):
    """With replays that overwrite the graph's outputs (a CPU stand-in for CUDA graphs): an earlier call's images
    are not changed by the next replay, each seed gives the plain loop's images, and settings of any type
    (NumPy numbers here) are part of the key: a changed one captures again instead of replaying the old one."""
    import numpy as np
    from conftest import fake_cuda_graphs
    fake_cuda_graphs(monkeypatch)
    gen = make_tiny_generator().eval()
    prompts = ["a red circle", "two blue squares"]
    a = gen.generate(prompts, seed=1, cfg=2.0, cuda_graphs="whole")
    whole = gen._static_steps["whole"]
    b = gen.generate(prompts, seed=2, cfg=2.0, cuda_graphs="whole")
    assert gen._static_steps["whole"] is whole and whole.captures == 1 and whole.graph.replays == 2
    assert torch.equal(a, gen.generate(prompts, seed=1, cfg=2.0)) and torch.equal(b, gen.generate(prompts, seed=2, cfg=2.0))
    assert not torch.equal(a, b)
    for top_k in (np.int64(1), np.int64(5)):
        got = gen.generate(prompts, seed=1, cfg=np.float32(2.0), top_k=top_k, cuda_graphs="whole")
        assert torch.equal(got, gen.generate(prompts, seed=1, cfg=2.0, top_k=int(top_k)))


@pytest.mark.parametrize("captured", [False, True])
def test_whole_generation_graph_without_a_seed_draws_from_the_default_generator(captured, monkeypatch):
    """seed=None: the default generator (PyTorch registers it with every capture), like the plain loop, also at
    the call that captures (its warm-up draws are undone: a CPU stand-in for the capture, ``captured``)."""
    if captured:
        from conftest import fake_cuda_graphs
        fake_cuda_graphs(monkeypatch)
    gen = make_tiny_generator().eval()
    torch.manual_seed(3)
    ref = [gen.generate(["a red circle"], cfg=2.0) for _ in range(2)]
    torch.manual_seed(3)
    assert all(torch.equal(r, gen.generate(["a red circle"], cfg=2.0, cuda_graphs="whole")) for r in ref)


def test_whole_generation_graph_falls_back_to_the_per_scale_graphs_when_a_capture_fails(monkeypatch):
    """A capture that fails (an operation that cannot be captured; forced here, as if on a GPU) warns once
    with the cause and continues with the per-scale graphs (cuda_graphs=True), with the same images."""
    from conftest import fake_cuda_graphs
    gen = make_tiny_generator().eval()
    ref = gen.generate(["a red circle"], seed=1, cfg=2.0)
    fake_cuda_graphs(monkeypatch, failing=True)
    with pytest.warns(RuntimeWarning, match="could not be captured as one CUDA graph .*not permitted"):
        out = gen.generate(["a red circle"], seed=1, cfg=2.0, cuda_graphs="whole")
    store = gen._static_steps
    assert "not permitted" in store["whole_failed"] and "steps" in store and "whole" not in store
    assert torch.equal(out, ref)
    assert torch.equal(gen.generate(["a red circle"], seed=1, cfg=2.0, cuda_graphs="whole"), ref)  # no new try
    assert "whole" not in store
    gen.release_cuda_graphs()  # lets a later call try again


def test_drop_path_rate_survives_dtype_casts():
    """The rate is an integer buffer: casting the module to bf16 (or FSDP's bf16 buffers) must not round
    it (a float buffer turned p=0.0015 into 0); eval mode and p=0 are the identity."""
    from starkit.generator.blocks import DropPath
    torch.manual_seed(0)
    x = torch.ones(200_000, 1, 2, dtype=torch.bfloat16)
    for p in (0.1, 0.0015):
        drop = DropPath(p).to(torch.bfloat16).train()
        dropped = (drop(x)[:, 0, 0] == 0).float().mean().item()
        assert abs(dropped - p) < 4 * (p * (1 - p) / x.shape[0]) ** 0.5 + 1e-4, (p, dropped)
        assert torch.equal(drop.eval()(x), x)
    assert torch.equal(DropPath(0.0).train()(x), x)


@pytest.mark.parametrize("top_k,top_p,temperature", [(3, None, 1.0), (3, 0.7, 0.8), (None, 0.6, 1.0), (None, None, 1.3)])
def test_draws_among_top_k_candidates_follow_the_filtered_distribution(top_k, top_p, temperature):
    from starkit.samplers.functional import candidates, draw, filter_logits
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.5, 1.5, -0.2]])
    expected = filter_logits(logits, top_k, top_p, temperature).softmax(-1)[0]  # (V,)
    g = torch.Generator().manual_seed(0)
    ids, prob = draw(candidates(logits.expand(200000, 6), top_k, top_p, temperature), g)
    assert ids.shape == prob.shape == (200000,)
    freq = torch.bincount(ids, minlength=6).float() / ids.numel()
    assert torch.allclose(freq, expected, atol=0.005)
    assert torch.allclose(prob, expected[ids])  # the drawn token's probability: STAR's confidence score
    assert (expected[ids] > 0).all()


def test_compiled_block_regions_give_the_eager_images_with_and_without_static_steps():
    """generate(compile_blocks=True): the blocks' element-wise work in torch.compile'd regions
    (starkit.generator.fused) gives the eager hidden states and the same tokens, also on static steps."""
    from starkit.generator.fused import fused_block
    gen = make_tiny_generator().eval()
    net = gen.transformer
    text = gen.text_encoder.encode(["a red circle", "two blue squares"])
    with torch.no_grad():
        kvs = net.text_kv(text.tokens)
        from starkit.generator.blocks import key_padding_bias
        bias = key_padding_bias(text.mask)
        x = net.start_tokens(text.pooled)
        for k in range(2):  # two scales: dynamic shapes, one graph per region
            eager_caches, fused_caches = net.new_caches(2, "cpu", torch.float32), net.new_caches(2, "cpu", torch.float32)
            for caches in (eager_caches, fused_caches):
                for scale in range(k):
                    xs = torch.randn(2, net.patch_nums[scale] ** 2, net.width, generator=torch.Generator().manual_seed(scale))
                    net.forward_scale(xs if scale else x, scale, caches, kvs, bias)
            xk = x if k == 0 else torch.randn(2, net.patch_nums[k] ** 2, net.width)
            a = net.forward_scale(xk, k, eager_caches, kvs, bias)
            b = net.forward_scale(xk, k, fused_caches, kvs, bias, fused=True)
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
            assert fused_caches[0].length == eager_caches[0].length
            for fc, ec in zip(fused_caches, eager_caches):  # the regions write the keys and values in place
                torch.testing.assert_close(fc.valid(), ec.valid(), rtol=1e-4, atol=1e-4)
    assert callable(fused_block)
    a, ia = gen.generate(["a red circle", "two blue squares"], seed=1, return_indices=True)
    b, ib = gen.generate(["a red circle", "two blue squares"], seed=1, return_indices=True, compile_blocks=True)
    c, ic = gen.generate(["a red circle", "two blue squares"], seed=1, return_indices=True, compile_blocks=True,
                         cuda_graphs=True)  # static steps (eager calls on the CPU)
    assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(ia, ib, ic))
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_compiled_block_regions_keep_two_graphs_per_width_over_scales_batches_and_modes():
    """Only the activations' rows and tokens are symbolic: a graph for the 1-token first scale and one for
    every other scale and batch, whatever the caller's autocast settings (graphs on or off); a block in
    training mode falls back to the eager block (drop-path)."""
    import torch._dynamo
    from starkit.generator import fused
    torch._dynamo.reset()
    gen = make_tiny_generator(drop_path_rate=0.5).eval()
    for prompts in (["a"], ["a", "b", "c"], ["a"] * 5):
        for graphs in (False, True):
            gen.generate(prompts, seed=0, compile_blocks=True, cuda_graphs=graphs)
    for fn in (fused.attention_inputs, fused.cross_inputs, fused.ffn_inputs, fused.ffn_output):
        assert len(torch._dynamo.eval_frame._debug_get_cache_entry_list(fn.__code__)) == 2, fn.__name__
    block = gen.transformer.blocks[-1].train()
    x = torch.randn(2, 4, gen.transformer.width)
    torch.manual_seed(0)
    eager = block(x)
    torch.manual_seed(0)
    assert torch.equal(fused.fused_block(block, x), eager)  # the same random drop-path: the eager block ran


def test_compiled_regions_run_first_at_the_largest_scale_once(monkeypatch):
    """On a GPU the compiled regions run once at the generation's largest scale before their first real call
    (compiling.tune_first_at: Triton kernels keep the launch configuration timed at their first launch). The
    CPU stands in for the GPU here: the tuning call comes first, only once, and changes no image."""
    from starkit.generator import fused
    from starkit.utils import compiling
    gen = make_tiny_generator().eval()
    want = gen.generate(["a red circle", "two blue squares"], seed=3, compile_blocks=True)
    monkeypatch.setattr(compiling, "TUNE_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(compiling, "_TUNED", set())
    calls, real = [], fused.fused_block

    def spy(block, x, *args, **kwargs):
        calls.append((x.shape[1], len(args) > 3 and args[3] is not None or kwargs.get("cache") is not None))
        return real(block, x, *args, **kwargs)
    monkeypatch.setattr(fused, "fused_block", spy)
    for _ in range(2):
        got = gen.generate(["a red circle", "two blue squares"], seed=3, compile_blocks=True)
        assert torch.equal(got, want)
    net = gen.transformer
    largest = net.patch_nums[-1] ** 2
    assert calls[0] == (largest, False)  # zeros at the largest scale, no KV cache
    assert [c for c in calls[1:] if not c[1]] == []  # once: every later call is a real one
    assert [c[0] for c in calls[1:1 + net.depth]] == [net.patch_nums[0] ** 2] * net.depth


def test_no_memory_for_the_tuning_call_warns_and_generates(monkeypatch):
    from starkit.generator import fused
    from starkit.utils import compiling
    gen = make_tiny_generator().eval()
    want = gen.generate(["a red circle"], seed=2, compile_blocks=True)
    monkeypatch.setattr(compiling, "TUNE_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(compiling, "_TUNED", set())
    real = fused.fused_block

    def no_memory_without_cache(block, x, rotary=None, text_kv=None, text_bias=None, cache=None, **kwargs):
        if cache is None:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
        return real(block, x, rotary, text_kv, text_bias, cache, **kwargs)
    monkeypatch.setattr(fused, "fused_block", no_memory_without_cache)
    with pytest.warns(UserWarning, match="No GPU memory.*smaller batch"):
        got = gen.generate(["a red circle"], seed=2, compile_blocks=True)
    assert torch.equal(got, want)


def test_token_major_kv_caches_give_the_head_major_images(monkeypatch):
    """KV caches stored (B, L, H, d) (whole-row appends) give what the head-major storage gave, eager and
    with the compiled regions (which then emit the keys token-major)."""
    from starkit.generator import kv_cache
    from starkit.generator.kv_cache import KVCache
    cache = KVCache(2, 3, 10, 4, "cpu", torch.float32)
    assert cache.k.shape == (2, 3, 10, 4) and cache.k.transpose(1, 2).is_contiguous()
    assert cache.v.stride() == cache.k.stride()
    gen = make_tiny_generator().eval()
    prompts = ["a red circle", "two blue squares"]
    got = [gen.generate(prompts, seed=4, compile_blocks=c, return_indices=True) for c in (False, True)]
    monkeypatch.setattr(kv_cache, "KV_TOKEN_MAJOR", False)
    assert not KVCache(2, 3, 10, 4, "cpu", torch.float32).k.transpose(1, 2).is_contiguous()
    want = [gen.generate(prompts, seed=4, compile_blocks=c, return_indices=True) for c in (False, True)]
    for (image_a, idx_a), (image_b, idx_b) in zip(got, want):
        assert all(torch.equal(a, b) for a, b in zip(idx_a, idx_b))
        torch.testing.assert_close(image_a, image_b, rtol=1e-5, atol=1e-5)


def test_a_compiler_failure_names_the_option_to_turn_off(monkeypatch):
    from starkit.utils import compiling

    def broken_backend(gm, example_inputs):
        raise OSError("no C++ compiler found")

    monkeypatch.setattr(compiling, "BACKEND", broken_backend)  # compile_once builds one per backend
    import torch._dynamo
    torch._dynamo.reset()
    gen = make_tiny_generator().eval()
    with pytest.raises(RuntimeError, match=r"compile_blocks.*compile_blocks=False.*C\+\+ compiler"):
        gen.generate(["a red circle"], seed=0, compile_blocks=True)
    torch._dynamo.reset()


def test_static_steps_built_under_inference_mode_are_rebuilt_outside_it():
    """Trainer.predict runs in inference mode: its static buffers cannot be written by a later plain call."""
    gen = make_tiny_generator().eval()
    with torch.inference_mode():
        a = gen.generate(["a red circle"], seed=2, cuda_graphs=True)
    b = gen.generate(["a red circle"], seed=2, cuda_graphs=True)  # same shape, outside inference mode
    assert torch.equal(a, b)


def test_prediction_with_cuda_graphs_on_an_adaln_model_warns_and_runs_without():
    gen = make_tiny_generator(adaln=True).eval()
    gen.predict_options = {"cuda_graphs": True, "compile_blocks": False}
    with pytest.warns(UserWarning, match="AdaLN"):
        out = gen.predict_step({"prompt": ["a red circle"], "seed": [1]}, 0)
    assert out["images"].shape[0] == 1


def test_token_cross_entropy_equals_transposed_form():
    """The last-dimension form used by the training losses: same values and gradients as
    F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")."""
    import torch.nn.functional as F
    from starkit.utils.losses import token_cross_entropy
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (3, 7), generator=g)
    ours = token_cross_entropy(logits, targets)
    assert ours.shape == (3, 7)
    (grad_ours,) = torch.autograd.grad(ours.mean(), logits)
    ref = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    (grad_ref,) = torch.autograd.grad(ref.mean(), logits)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)  # the same math, another reduction order
    torch.testing.assert_close(grad_ours, grad_ref, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("sampler", ["parallel", "stable"])
def test_per_image_seeds_make_each_image_independent_of_its_batch(sampler):
    """generate(seed=[...]) / predict_step: an image depends on its prompt and its own seed, not on the other
    images of the batch, their order or the batch size (the promise of starkit predict's per-prompt seeds)."""
    from starkit.samplers import StableSampler
    gen = make_tiny_generator(**({"sampler": StableSampler(steps=3, steps_last=3, random_steps=2, causal_scales=2,
                                                           use_head=False)}
                                 if sampler == "stable" else {})).eval()
    _, alone = gen.generate(["a blue square"], seed=[5], return_indices=True)
    _, batch = gen.generate(["a red circle", "a blue square", "a green star"], seed=[99, 5, 7], return_indices=True)
    assert all(torch.equal(a[0], b[1]) for a, b in zip(alone, batch))
    _, shared = gen.generate(["a red circle", "a blue square"], seed=99, return_indices=True)
    assert not all(torch.equal(a[0], b[1]) for a, b in zip(alone, shared))  # one stream: the batch matters
    out = gen.predict_step({"prompt": ["a red circle", "a blue square"], "seed": [99, 5]}, 0)
    one = gen.predict_step({"prompt": ["a blue square"], "seed": [5]}, 0)
    assert torch.equal(out["images"][1], one["images"][0])
    # a list per prompt with several images each: image j of prompt i gets seed[i] + j
    _, two = gen.generate(["a blue square"], seed=[4], num_images_per_prompt=2, return_indices=True)
    assert all(torch.equal(a[0], t[1]) for a, t in zip(alone, two))
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        gen.generate(["a", "b", "c"], seed=[1, 2])


def test_run_sampling_builds_no_autograd_graph():
    """run_sampling is no_grad itself (not only through generate()): called directly, no graph is kept."""
    from starkit.generator.sampling import run_sampling
    gen = make_tiny_generator().eval()
    seen = []
    real = gen.sampler.sample_scale

    def spy(step):
        seen.append((torch.is_grad_enabled(), step.logits.requires_grad))
        return real(step)
    gen.sampler.sample_scale = spy
    run_sampling(gen.transformer, gen.tokenizer, gen.text_encoder, gen.sampler, ["a red circle"], 0, "cpu")
    assert seen and not any(grad or requires for grad, requires in seen)


def test_fc1_gelu_operator_is_the_linear_layer_and_tanh_gelu_and_compiles_as_an_opaque_call():
    from starkit.generator.blocks import fc1_gelu
    torch.manual_seed(0)
    h, w, b = torch.randn(2, 5, 8), torch.randn(32, 8), torch.randn(32)
    want = torch.nn.functional.gelu(torch.nn.functional.linear(h, w, b), approximate="tanh")
    torch.testing.assert_close(fc1_gelu(h, w, b), want)
    torch.library.opcheck(fc1_gelu, (h, w, b))  # the fake (meta) implementation agrees with the real one
    torch.testing.assert_close(torch.compile(fc1_gelu, backend="eager", fullgraph=True)(h, w, b), want)


def test_ffn_uses_the_fc1_gelu_operator_only_at_inference_on_a_plain_layer(monkeypatch):
    from starkit.generator import blocks
    calls = []
    real = blocks.fc1_gelu
    monkeypatch.setattr(blocks, "fc1_gelu", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(blocks, "FC1_GELU_DEVICES", ("cpu",))
    torch.manual_seed(0)
    ffn, x = blocks.FFN(8, 32), torch.randn(2, 3, 8)
    want = ffn.fc2(torch.nn.functional.gelu(ffn.fc1(x), approximate="tanh"))
    ffn(x).sum().backward()  # gradients on: the plain layers (the operator has no gradient)
    assert calls == []
    with torch.no_grad():
        torch.testing.assert_close(ffn(x), want.detach())
        assert calls == [1]
        ffn.fc1.register_forward_hook(lambda m, i, o: o * 0)  # a hooked (or replaced) fc1 runs as written
        torch.testing.assert_close(ffn(x), ffn.fc2(torch.zeros(2, 3, 32)))
        assert calls == [1]


def test_l2_normalize_equals_f_normalize_with_its_gradient():
    """Compiled code normalises queries and keys by one reciprocal square root per row (blocks.l2_normalize):
    F.normalize's values and gradients, the per-head scale applied, a zero row giving zeros (not NaN)."""
    import torch.nn.functional as F
    from starkit.generator.blocks import l2_normalize
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    x[0, 0, 0] = 0
    scale = torch.rand(1, 3, 1, 1, dtype=torch.float64) + 1
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = l2_normalize(a.float(), scale.float()), F.normalize(b.float(), dim=-1) * scale.float()
    assert got.dtype == torch.float32 and torch.isfinite(got).all() and got[0, 0, 0].abs().sum() == 0
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    weights = torch.randn_like(got)
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)


def test_copy_wide_moves_the_same_bits_through_wide_views(monkeypatch):
    """The KV-cache appends copy rows through 16- or 8-byte views (kv_cache.copy_wide; CUDA only, the CPU stands in
    here): the cache holds the same bits as a plain copy, any bf16 bit pattern (NaNs included), for token-major and
    head-major caches, from the qkv product's strided views; rows that do not divide take the plain copy."""
    from starkit.generator import kv_cache
    from starkit.generator.kv_cache import KVCache, wide_copy_type
    monkeypatch.setattr(kv_cache, "WIDE_COPY_DEVICES", ("cpu",))
    g = torch.Generator().manual_seed(0)
    for token_major in (True, False):
        for d, wide in ((64, torch.complex128), (4, torch.int64), (6, None)):
            cache = KVCache(2, 3, 20, d, "cpu", torch.bfloat16, token_major=token_major)
            want_k, want_v = torch.zeros(2, 3, 20, d, dtype=torch.int16), torch.zeros(2, 3, 20, d, dtype=torch.int16)
            start = 0
            for l in (1, 4, 9):
                bits = torch.randint(-2 ** 15, 2 ** 15, (2, l, 3, 3, d), dtype=torch.int16, generator=g)
                _, k, v = bits.view(torch.bfloat16).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, l, d) views
                assert wide_copy_type(cache.k[:, :, start:start + l], v) == wide, (d, token_major)
                keys, values = cache.append(k, v)
                want_k[:, :, start:start + l], want_v[:, :, start:start + l] = k.view(torch.int16), v.view(torch.int16)
                start += l
                assert torch.equal(keys.view(torch.int16), want_k[:, :, :start])
                assert torch.equal(values.view(torch.int16), want_v[:, :, :start])
    monkeypatch.setattr(kv_cache, "WIDE_COPY_DEVICES", ("cuda",))
    assert wide_copy_type(torch.zeros(2, 64, dtype=torch.bfloat16), torch.zeros(2, 64, dtype=torch.bfloat16)) is None


def test_generate_in_training_mode_gives_the_eval_mode_images():
    """A generator in training mode (as load_from_checkpoint returns it) generates as in eval mode: stochastic
    depth must not drop blocks at sampling time (it made images depend on the global RNG); the modes are restored."""
    gen = make_tiny_generator(drop_path_rate=0.9).eval()
    want = gen.generate(["a red circle", "two blue squares"], seed=5)
    gen.train()
    torch.manual_seed(123)
    got = gen.generate(["a red circle", "two blue squares"], seed=5)
    torch.manual_seed(7)
    assert torch.equal(got, want) and torch.equal(gen.generate(["a red circle", "two blue squares"], seed=5), want)
    assert gen.transformer.training and gen.transformer.blocks[-1].drop_path.training
    assert not gen.tokenizer.training  # frozen parts stay in eval mode (ScaleWiseGenerator.train)

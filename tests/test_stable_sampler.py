"""STAR's stable sampler: reveal schedule, equivalence with parallel sampling, head training and fallback."""
import contextlib
import math
import warnings

import pytest
import torch

from conftest import make_tiny_generator, random_batch
from starkit.samplers import ParallelSampler, ScaleStep, StableSampler
from starkit.samplers.stable import keep_ratio, reveal_schedule

SETTINGS = dict(cfg=2.0, top_k=None, top_p=None)
PROMPTS = ["a red circle", "two blue squares", ""]


def trained_generator(steps=30, **sampler_kwargs):
    """A tiny generator whose StableSampler head was trained for a few steps (flag set)."""
    kwargs = dict(SETTINGS, causal_scales=2, steps=3, steps_last=4, random_steps=1)
    kwargs.update(sampler_kwargs)
    gen = make_tiny_generator(sampler=StableSampler(**kwargs), stage="sampler_head", caption_dropout=0.0)
    gen.train()
    gen.log = lambda *a, **k: None
    opt = torch.optim.AdamW(gen.sampler.parameters(), lr=3e-3)
    batch = random_batch(4)
    with torch.no_grad():
        batch["indices"] = gen.tokenizer.encode(batch["image"])  # encode once: the tokenizer is frozen
    losses = []
    for i in range(steps):
        torch.manual_seed(i)
        loss = gen._loss(batch, "train")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return gen.eval(), losses


@pytest.fixture(scope="module")
def trained():
    return trained_generator()


def test_reveal_schedule_follows_the_arccos_formula():
    n, steps = 16, 8  # pn = 4
    w = [math.acos(1 - s / (steps - 1)) / (math.pi / 2) for s in range(steps)]
    raw = [max(1, round(x / sum(w) * n)) for x in w]
    assert raw == [1, 1, 2, 2, 2, 3, 3, 3]  # the formula, zeros raised to 1 (sum 17)
    assert reveal_schedule(n, steps) == [1, 1, 2, 2, 2, 3, 3, 2]  # remainder taken from the last step
    assert reveal_schedule(64, 8) == [1, 5, 6, 8, 9, 11, 12, 12]
    for pn in (1, 2, 3, 4, 8, 13, 21, 36, 64):
        for steps in (1, 2, 5, 8, 15):
            counts = reveal_schedule(pn * pn, steps)
            assert sum(counts) == pn * pn and min(counts) >= 1 and len(counts) == min(steps, pn * pn)
    assert reveal_schedule(16, 1) == [16]


def test_training_keep_ratio_is_arccos_distributed():
    torch.manual_seed(0)
    r = keep_ratio(100000)
    assert 0 <= r.min() and r.max() <= 1
    assert r.mean().item() == pytest.approx(2 / math.pi, abs=0.01)  # E[arccos(U) / (pi/2)] = 2/pi
    assert (r < 0.5).float().mean().item() == pytest.approx(1 - math.cos(math.pi / 4), abs=0.01)


def test_one_step_without_head_equals_parallel_sampling():
    gen = make_tiny_generator(sampler=ParallelSampler(**SETTINGS)).eval()
    stable = StableSampler(**SETTINGS, causal_scales=4, steps=1, steps_last=1, use_head=False)
    for cfg in (2.0, 0.0):
        _, par = gen.generate(PROMPTS, seed=7, cfg=cfg, return_indices=True)
        _, sta = gen.generate(PROMPTS, seed=7, cfg=cfg, sampler=stable, return_indices=True)
        assert all(torch.equal(a, b) for a, b in zip(par, sta))


def test_random_reveal_on_fixed_logits_keeps_each_tokens_distribution():
    torch.manual_seed(0)
    N, l, V = 20000, 4, 5
    logits = torch.randn(1, l, V).expand(N, l, V) * 1.5
    step = ScaleStep(scale=3, num_scales=4, patch_num=2, hidden=torch.zeros(N, l, 8), logits=logits, guided=False,
                     embed=lambda i: torch.nn.functional.one_hot(i, V).float(), codebook=torch.eye(V),
                     generator=torch.Generator().manual_seed(0))
    sampler = StableSampler(cfg=0.0, top_k=None, top_p=None, causal_scales=1, steps=3, steps_last=3,
                            random_steps=3, use_head=False)
    _, idx = sampler.sample_scale(step)
    freq = torch.stack([torch.bincount(idx[:, i], minlength=V) for i in range(l)]).float() / N
    assert torch.allclose(freq, logits[0].softmax(-1), atol=0.015)


def test_head_training_loss_decreases_and_sets_the_flag(trained):
    gen, losses = trained
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert gen.sampler.head_ready and int(gen.sampler.head_trained) == 1
    # only the head is trained in this stage
    assert not any(p.requires_grad for p in gen.transformer.parameters())
    opt = gen.configure_optimizers()["optimizer"]
    trained_ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert trained_ids == {id(p) for p in gen.sampler.parameters()}


def test_generation_with_the_head_with_and_without_cfg_is_reproducible(trained, monkeypatch):
    gen, _ = trained
    calls = []
    real = gen.sampler.head.for_scale

    def spy(hidden, pooled, scale, *args, **kwargs):
        predict = real(hidden, pooled, scale, *args, **kwargs)

        def spied(revealed, positions=None):
            calls.append((hidden.shape[0], revealed.clone(), pooled.clone(), scale))
            return predict(revealed, positions)
        return spied

    monkeypatch.setattr(gen.sampler.head, "for_scale", spy)
    a, ia = gen.generate(PROMPTS, seed=3, return_indices=True)
    b, ib = gen.generate(PROMPTS, seed=3, return_indices=True)
    assert a.shape == (3, 3, 32, 32) and torch.equal(a, b) and all(torch.equal(x, y) for x, y in zip(ia, ib))
    # CFG: the head runs on cond + uncond rows; the uncond rows get the empty prompt's pooled text and share the
    # cond rows' revealed tokens (passed once). Scales 2 and 3 are causal with 3 and 4 steps.
    assert [c[3] for c in calls[:7]] == [2, 2, 2, 3, 3, 3, 3]
    rows, revealed, pooled, _ = calls[1]
    assert rows == 6 and revealed.shape[0] == 3 and revealed.abs().sum() > 0
    empty = gen.text_encoder.empty().pooled
    assert torch.allclose(pooled[3:], empty.expand(3, -1))
    calls.clear()
    c = gen.generate(PROMPTS, seed=3, cfg=0.0)
    d = gen.generate(PROMPTS, seed=3, cfg=0.0)
    assert torch.equal(c, d) and calls[0][0] == 3
    _, ie = gen.generate(PROMPTS, seed=4, return_indices=True)
    assert any(not torch.equal(x, y) for x, y in zip(ia, ie))


def test_head_output_depends_on_the_revealed_tokens(trained):
    gen, _ = trained
    head = gen.sampler.head
    hidden, pooled = torch.randn(1, 16, 32), torch.randn(1, 32)
    shown = torch.zeros(1, 16, 8)
    base = head(hidden, shown, pooled, 3)
    shown[0, 5] = gen.tokenizer.embed(torch.tensor([[3]]))[0, 0]
    moved = head(hidden, shown, pooled, 3)
    assert (moved - base)[0, 0].abs().max() > 0  # full attention: token 0 sees the revealed token 5


def test_without_trained_head_warns_once_and_samples_in_parallel():
    gen = make_tiny_generator(sampler=ParallelSampler(**SETTINGS)).eval()
    _, par = gen.generate(PROMPTS, seed=5, return_indices=True)
    fresh = StableSampler(**SETTINGS, causal_scales=2)  # never built: no head at all
    built = make_tiny_generator(sampler=StableSampler(**SETTINGS, causal_scales=2)).eval()  # head untrained
    for source in (lambda s: gen.generate(PROMPTS, seed=5, sampler=fresh, return_indices=True),
                   lambda s: built.generate(PROMPTS, seed=5, return_indices=True)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outs = [source(i)[1] for i in range(2)]
        msgs = [w for w in caught if "sampler head has no trained weights" in str(w.message)]
        assert len(msgs) == 1
        for out in outs:
            assert all(torch.equal(a, b) for a, b in zip(par, out))


def test_head_weights_round_trip_through_the_generator_state_dict(trained, tmp_path):
    gen, _ = trained
    sd = gen.state_dict()
    assert int(sd["sampler.head_trained"]) == 1
    assert "sampler.head.head_logits.weight" in sd and "sampler.head.blocks.2.attn.mat_qkv.weight" in sd
    torch.save(sd, tmp_path / "sd.pt")
    other = make_tiny_generator(sampler=StableSampler(**SETTINGS, causal_scales=2, steps=3, steps_last=4,
                                                      random_steps=1)).eval()
    assert not other.sampler.head_ready
    checkpoint = {"state_dict": torch.load(tmp_path / "sd.pt", weights_only=True)}
    other.on_load_checkpoint(checkpoint)
    other.load_state_dict(checkpoint["state_dict"])
    assert other.sampler.head_ready
    for k, v in gen.sampler.state_dict().items():
        assert torch.equal(other.sampler.state_dict()[k], v), k
    assert torch.equal(gen.generate(PROMPTS, seed=1), other.generate(PROMPTS, seed=1))


def test_settings_are_validated_and_with_settings_shares_the_head(trained):
    gen, _ = trained
    with pytest.raises(ValueError, match="schedule"):
        StableSampler(schedule="exp")
    with pytest.raises(ValueError, match="steps"):
        StableSampler(steps=0)
    copy = gen.sampler.with_settings(steps=2, cfg=1.0)
    assert copy.head is gen.sampler.head and copy.steps == 2 and gen.sampler.steps == 3
    assert dict(gen.sampler.hparams)["causal_scales"] == 2


def test_head_ready_follows_loaded_state_without_reading_the_buffer_each_time():
    sampler = StableSampler(head_depth=1)
    sampler.build(width=32, text_dim=16, latent_dim=8, vocab_size=16, num_heads=2, patch_nums=(1, 2))
    assert not sampler.head_ready
    sampler.head_trained.fill_(1)  # not through a load: the host copy is what head_ready reads
    assert not sampler.head_ready
    state = sampler.state_dict()
    state["head_trained"] = torch.ones((), dtype=torch.long)
    sampler.load_state_dict(state)
    assert sampler.head_ready  # the host copy was reset by the load
    state["head_trained"] = torch.zeros((), dtype=torch.long)
    sampler.load_state_dict(state)
    assert not sampler.head_ready


def test_with_settings_copies_share_the_host_copy_of_head_ready(monkeypatch):
    """generate(cfg=...) samples with a with_settings copy per call: the buffer is read once, not per call."""
    sampler = StableSampler(head_depth=1)
    sampler.build(width=32, text_dim=16, latent_dim=8, vocab_size=16, num_heads=2, patch_nums=(1, 2))
    sampler.head_trained.fill_(1)
    assert sampler.with_settings(cfg=2.0).head_ready
    reads = []
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(1) or 1)
    assert sampler.head_ready and sampler.with_settings(cfg=3.0).head_ready
    assert reads == []


def test_compiled_head_matches_the_eager_head_at_every_scale_and_draws_the_same_tokens(trained):
    gen, _ = trained
    head = gen.sampler.head
    compiled = head.compiled_forward()
    pooled = torch.randn(2, 32)
    with torch.no_grad():
        for scale, l in ((2, 9), (3, 16), (2, 9)):  # dynamic shapes: one graph for both scales
            hidden, shown = torch.randn(2, l, 32), torch.randn(2, l, 8)
            rot = gen.transformer.positional.rotary(slice(0, l))
            first = gen.transformer.positional.rotary(slice(0, 1))
            torch.testing.assert_close(compiled(hidden, shown, pooled, scale, first, rot),
                                       head(hidden, shown, pooled, scale, first, rot), rtol=1e-5, atol=1e-5)
    copy = __import__("copy").deepcopy(head)  # a copy after compiled sampling runs its own weights
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(0.05 * torch.randn_like(p))
        hidden, shown = torch.randn(2, 9, 32), torch.randn(2, 9, 8)
        rot, first = gen.transformer.positional.rotary(slice(0, 9)), gen.transformer.positional.rotary(slice(0, 1))
        torch.testing.assert_close(copy.compiled_forward()(hidden, shown, pooled, 2, first, rot),
                                   copy(hidden, shown, pooled, 2, first, rot), rtol=1e-5, atol=1e-5)
    __import__("pickle").dumps(head)  # nothing unpicklable is attached to the head
    a, ia = gen.generate(PROMPTS, seed=5, return_indices=True)
    gen.sampler.compile_head = True
    try:
        b, ib = gen.generate(PROMPTS, seed=5, return_indices=True)
    finally:
        gen.sampler.compile_head = False
    assert all(torch.equal(x, y) for x, y in zip(ia, ib)) and torch.allclose(a, b)


def test_compile_blocks_runs_the_head_blocks_in_compiled_regions_with_the_same_tokens(trained, monkeypatch):
    gen, _ = trained
    from starkit.generator import fused
    calls = []
    real = fused.fused_block
    monkeypatch.setattr(fused, "fused_block", lambda block, *a, **k: calls.append(block) or real(block, *a, **k))
    _, eager = gen.generate(PROMPTS, seed=6, return_indices=True)
    _, compiled = gen.generate(PROMPTS, seed=6, return_indices=True, compile_blocks=True)
    assert all(torch.equal(x, y) for x, y in zip(eager, compiled))
    head_blocks = {id(b) for b in gen.sampler.head.blocks}
    assert head_blocks <= {id(b) for b in calls}  # the head's blocks went through the fused regions


def _greedy_draw(cands, generator=None):
    """A deterministic stand-in for ``draw``: the most likely candidate and its probability."""
    prob, choice = cands.probs.max(dim=-1, keepdim=True)
    ids = choice if cands.indices is None else cands.indices.gather(-1, choice)
    return ids[..., 0], prob[..., 0]


class _FullRowsStableSampler(StableSampler):
    """The reveal loop as it was before the hidden-rows-only change: logits and draws on all l tokens."""

    def _causal(self, step, t):
        from starkit.samplers.stable import draw
        R, l = step.logits.shape[:2]
        B = R // 2 if step.guided else R
        counts = reveal_schedule(l, self.steps_last if step.scale == step.num_scales - 1 else self.steps,
                                 self.schedule)
        idx = torch.zeros(B, l, dtype=torch.long)
        revealed = torch.zeros(B, l, dtype=torch.bool)
        shown = torch.zeros(B, l, step.codebook.shape[-1])
        n_revealed = 0
        for count in counts:
            if self.use_head:
                rows = torch.cat([shown, shown]) if step.guided else shown
                logits = self.head(step.hidden, rows, step.pooled_text, step.scale, step.rotary_first, step.rotary)
            else:
                logits = step.logits
            drawn, confidence = draw(self._candidates(logits, t, step.guided), None)
            if n_revealed + count >= l:
                new = ~revealed
            else:
                pick = confidence.masked_fill(revealed, -float("inf")).topk(count, dim=-1).indices
                new = torch.zeros_like(revealed).scatter_(1, pick, True)
            n_revealed += count
            idx = torch.where(new, drawn, idx)
            revealed |= new
            shown = torch.where(new[..., None], step.embed(drawn).float(), shown)
        return step.embed(idx), idx


class _HeadWithoutPositions(torch.nn.Module):
    """A user's head with the original call signature (no ``positions``): the sampler takes the rows."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, hidden, revealed, pooled, scale, rotary_first=None, rotary=None):
        return self.inner(hidden, revealed, pooled, scale, rotary_first, rotary)


@pytest.mark.parametrize("cfg", [2.0, 0.0])
@pytest.mark.parametrize("head", ["sampler_head", "user_head", "no_head"])
def test_hidden_rows_only_reveal_equals_the_full_rows_loop(trained, monkeypatch, cfg, head):
    # With a deterministic draw and confidence picks, drawing only the hidden tokens reveals exactly the tokens
    # of the loop that drew all l tokens at each step and discarded the revealed ones' draws: with the
    # SamplerHead (logits of the hidden rows only), a head without ``positions`` (all logits, rows taken) and
    # without a head (the generator's logits filtered once to the top-k, the hidden rows' candidates taken).
    import starkit.samplers.stable as stable_mod
    gen, _ = trained
    monkeypatch.setattr(stable_mod, "draw", _greedy_draw)
    settings = dict(gen.sampler.hparams, random_steps=0, top_k=3, top_p=None, use_head=head != "no_head")
    reference, new = _FullRowsStableSampler(**settings), StableSampler(**settings)
    for sampler in (reference, new):
        sampler.head = _HeadWithoutPositions(gen.sampler.head) if head == "user_head" else gen.sampler.head
        sampler._trained_host["value"] = True
    assert stable_mod._takes_positions(new.head) == (head != "user_head")
    _, want = gen.generate(PROMPTS, seed=1, cfg=cfg, sampler=reference, return_indices=True)
    _, got = gen.generate(PROMPTS, seed=1, cfg=cfg, sampler=new, return_indices=True)
    assert all(torch.equal(a, b) for a, b in zip(want, got))


def test_compiled_head_makes_few_graphs_across_reveal_steps_batches_and_guidance(trained, monkeypatch):
    # Guided and unguided calls at several batch sizes, scales and reveal steps share the head's dynamic graphs.
    from starkit.utils import compiling
    gen, _ = trained
    monkeypatch.setattr(compiling, "BACKEND", "eager")
    sampler = gen.sampler.with_settings(compile_head=True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for cfg in (0.0, 2.0):
        for batch in (3, 1, 2, 5):
            gen.generate(["a red circle"] * batch, seed=0, cfg=cfg, sampler=sampler)
    counters = torch._dynamo.utils.counters
    # all rows / the hidden rows (the last block on them only), each with a single-row form: the old whole-trunk
    # compile made 7
    assert 1 <= counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])


def test_compiled_head_runs_first_at_the_largest_scale_once(trained, monkeypatch):
    """compile_head on a GPU: the head's compiled blocks run once on zeros at the generation's largest scale
    (all rows, then half of them) before the first reveal step (compiling.tune_first_at); the CPU stands in
    for the GPU. The tokens do not change."""
    from starkit.samplers.head import SamplerHead
    from starkit.utils import compiling
    gen, _ = trained
    monkeypatch.setattr(compiling, "BACKEND", "eager")
    sampler = gen.sampler.with_settings(compile_head=True)
    _, want = gen.generate(PROMPTS, seed=5, sampler=sampler, return_indices=True)
    monkeypatch.setattr(compiling, "TUNE_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(compiling, "_TUNED", set())
    sizes, real = [], SamplerHead._run_at_size

    def spy(self, features, base, rot, tokens):
        sizes.append(tokens)
        return real(self, features, base, rot, tokens)
    monkeypatch.setattr(SamplerHead, "_run_at_size", spy)
    for _ in range(2):
        _, got = gen.generate(PROMPTS, seed=5, sampler=sampler, return_indices=True)
        assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert sizes == [gen.transformer.patch_nums[-1] ** 2]


def test_head_logits_at_positions_are_the_rows_of_all_logits(trained):
    head = trained[0].sampler.head
    torch.manual_seed(0)
    hidden, shown, pooled = torch.randn(2, 16, 32), torch.randn(2, 16, 8), torch.randn(2, 32)
    positions = torch.stack([torch.tensor([0, 3, 9, 15]), torch.tensor([1, 2, 4, 8])])  # (2, 4)
    with torch.no_grad():
        full = head(hidden, shown, pooled, 3)  # (2, 16, V)
        for fused in (False, True):
            part = head(hidden, shown, pooled, 3, fused=fused, positions=positions)  # (2, 4, V)
            assert torch.allclose(part, full.gather(1, positions[..., None].expand(-1, -1, full.shape[-1])),
                                  atol=1e-5)


@pytest.mark.parametrize("form", ["eager", "fused", "compiled"])
def test_for_scale_predicts_what_forward_does_with_the_inputs_formed_once(trained, monkeypatch, form):
    # Sampling forms the part of the head's input that is fixed over a scale once (the input is linear in the
    # revealed embeddings) and runs the last block on the wanted rows only: the logits equal forward()'s.
    from starkit.utils import compiling
    monkeypatch.setattr(compiling, "BACKEND", "eager")
    gen = trained[0]
    head, positional = gen.sampler.head, gen.transformer.positional
    torch.manual_seed(1)
    hidden, pooled = torch.randn(4, 16, 32), torch.randn(4, 32)
    shown = torch.randn(2, 16, 8) * (torch.rand(2, 16, 1) < 0.5)  # shared by the two halves of the 4 rows
    first, rot = positional.rotary(slice(0, 1)), positional.rotary(slice(0, 16))
    positions = torch.stack([torch.tensor([0, 3, 9, 15]), torch.tensor([1, 2, 4, 8])] * 2)  # (4, 4)
    with torch.no_grad():
        predict = head.for_scale(hidden, pooled, 3, first, rot, fused=form == "fused", compiled=form == "compiled")
        want = head(hidden, torch.cat([shown, shown]), pooled, 3, first, rot)  # (4, 16, V)
        torch.testing.assert_close(predict(shown), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(predict(shown, positions),
                                   want.gather(1, positions[..., None].expand(-1, -1, want.shape[-1])),
                                   rtol=1e-4, atol=1e-4)


def test_block_query_rows_are_the_rows_of_the_whole_output():
    from starkit.generator.blocks import Block
    from starkit.generator.fused import fused_block
    torch.manual_seed(0)
    block = Block(32, 2, None).eval()
    x, rows = torch.randn(3, 10, 32), torch.tensor([[0, 4, 9], [1, 2, 3], [9, 8, 0]])
    with torch.no_grad():
        full = block(x)
        want = full.gather(1, rows[..., None].expand(-1, -1, 32))
        torch.testing.assert_close(block(x, query_rows=rows), want)
        torch.testing.assert_close(fused_block(block, x, query_rows=rows), want, rtol=1e-5, atol=1e-5)


def test_compiled_head_stays_compiled_across_widths_shapes_and_reveal_forms(monkeypatch, caplog):
    # The compiled blocks function is shared by every head: its graphs (all rows / some rows, one row / more,
    # per width) must not reach dynamo's default limit of 8, past which it would silently run uncompiled.
    import logging
    from starkit.positional import RoPE2D
    from starkit.samplers.head import SamplerHead
    from starkit.utils import compiling
    monkeypatch.setattr(compiling, "BACKEND", "eager")
    torch._dynamo.reset()
    caplog.set_level(logging.WARNING)
    torch.manual_seed(0)
    with torch.no_grad():
        for C, heads in ((32, 2), (64, 4)):
            head, pe = SamplerHead(C, 16, 8, 50, heads, 4).eval(), RoPE2D(C, heads, (1, 2, 4, 8))
            for l, start in ((16, 5), (64, 21)):
                first, rot = pe.rotary(slice(0, 1)), pe.rotary(slice(start, start + l))
                for R in (1, 2, 4):
                    hidden, pooled = torch.randn(R, l, C), torch.randn(R, 16)
                    predict = head.for_scale(hidden, pooled, 2, first, rot, compiled=True)
                    shown = torch.randn(max(R // 2, 1), l, 8)
                    for h in (None, 1, 3):
                        pos = None if h is None else torch.arange(h).expand(R, h).contiguous()
                        got = predict(shown, pos)
                        want = head(hidden, shown.repeat(R // shown.shape[0], 1, 1), pooled, 2, first, rot,
                                    positions=pos)
                        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    entries = torch._dynamo.eval_frame._debug_get_cache_entry_list(SamplerHead._input_and_blocks.__code__)
    assert len(entries) > 8  # more graphs than dynamo's default limit ...
    assert not [r for r in caplog.records if "recompile_limit" in r.getMessage()
                or "cache_size_limit" in r.getMessage()]  # ... and none refused


def test_for_scale_follows_weight_updates_and_takes_unshared_rows(trained):
    # revealed_weight (proj x word_embed) is kept per weight version: after an update of either weight the
    # prediction is the updated forward's; revealed and positions may also come with all R rows; no RoPE.
    import copy
    head = copy.deepcopy(trained[0].sampler.head)
    torch.manual_seed(2)
    hidden, pooled, shown = torch.randn(2, 9, 32), torch.randn(2, 32), torch.randn(2, 9, 8)
    positions = torch.tensor([[0, 4, 8], [1, 2, 3]])
    with torch.no_grad():
        for weight in (None, head.proj.weight, head.word_embed.weight):
            if weight is not None:
                weight.mul_(1.5)  # in place: a new version
            want = head(hidden, shown, pooled, 2, positions=positions)
            got = head.for_scale(hidden, pooled, 2)(shown, positions)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_query_rows_refuse_an_attention_mask():
    from starkit.generator.blocks import Block
    block = Block(32, 2, None).eval()
    with pytest.raises(ValueError, match="query_rows with an attention mask"):
        block(torch.randn(1, 4, 32), mask=torch.zeros(4, 4, dtype=torch.bool), query_rows=torch.tensor([[0, 1]]))


@contextlib.contextmanager
def _head_bias_moved(head):
    """The head's logits bias moved in place (as an optimizer step would) for the block; its weights back after."""
    saved = {k: v.clone() for k, v in head.state_dict().items()}
    try:
        with torch.no_grad():
            head.head_logits.bias.add_(torch.randn_like(head.head_logits.bias))
        yield
    finally:
        head.load_state_dict(saved)


def test_head_steps_on_static_buffers_with_cuda_graphs_give_the_same_tokens(trained):
    """generate(cuda_graphs=True): the head's reveal steps run on HeadStepGraphs' static buffers (replayed from
    CUDA graphs on a GPU; eager calls on them here) with the same tokens; kept between calls of the same shape,
    rebuilt after a weight update, freed by release_cuda_graphs."""
    from starkit.samplers.head_graphs import HeadStepGraphs
    gen, _ = trained
    a, ia = gen.generate(PROMPTS, seed=7, return_indices=True)
    b, ib = gen.generate(PROMPTS, seed=7, return_indices=True, cuda_graphs=True)
    assert all(torch.equal(x, y) for x, y in zip(ia, ib)) and torch.allclose(a, b, atol=1e-6)
    graphs = gen._static_steps["sampler_head"]
    assert isinstance(graphs, HeadStepGraphs) and len(graphs.shapes) == 2  # the two causal scales
    steps = {id(s) for buffers in graphs.shapes.values() for s in buffers.steps.values()}
    assert len(steps) == 3 + 4  # a graph per reveal step (3 and 4 steps): each has its own number of hidden rows
    c, ic = gen.generate(PROMPTS, seed=7, return_indices=True, cuda_graphs=True)
    assert all(torch.equal(x, y) for x, y in zip(ia, ic))
    assert {id(s) for buffers in graphs.shapes.values() for s in buffers.steps.values()} == steps  # reused
    gen.generate(PROMPTS, seed=7, cuda_graphs=True, sampler=gen.sampler.with_settings(compile_head=True))
    assert gen._static_steps["sampler_head"] is graphs and len(graphs.shapes) == 4  # another form: its own graphs
    with _head_bias_moved(gen.sampler.head):
        d, idx_d = gen.generate(PROMPTS, seed=7, return_indices=True)
        e, idx_e = gen.generate(PROMPTS, seed=7, return_indices=True, cuda_graphs=True)
        assert all(torch.equal(x, y) for x, y in zip(idx_d, idx_e))  # the new weights, not stale buffers
    gen.release_cuda_graphs()
    assert "_static_steps" not in gen.__dict__


def test_whole_generation_graph_with_the_trained_head_gives_the_same_tokens(trained):
    """generate(cuda_graphs="whole") with the stable sampler's trained head (its steps inside the one graph, no
    head-step graphs of their own): the plain loop's tokens; a new capture after the head's weights change."""
    gen, _ = trained
    a, ia = gen.generate(PROMPTS, seed=7, return_indices=True)
    b, ib = gen.generate(PROMPTS, seed=7, return_indices=True, cuda_graphs="whole")
    assert all(torch.equal(x, y) for x, y in zip(ia, ib)) and torch.equal(a, b)
    assert "sampler_head" not in gen._static_steps
    whole = gen._static_steps["whole"]
    with _head_bias_moved(gen.sampler.head):
        _, idx_d = gen.generate(PROMPTS, seed=7, return_indices=True)
        _, idx_e = gen.generate(PROMPTS, seed=7, return_indices=True, cuda_graphs="whole")
        assert all(torch.equal(x, y) for x, y in zip(idx_d, idx_e)) and gen._static_steps["whole"] is not whole
    gen.release_cuda_graphs()


def test_head_training_loss_is_the_cross_entropy_of_the_hidden_tokens_only(trained, monkeypatch):
    """The head sees the kept ground-truth tokens (zeros elsewhere) and is scored on the hidden ones only: the loss
    equals the cross-entropy over the hidden positions written out here, whatever the logits at kept positions."""
    import torch.nn.functional as F
    from starkit.samplers import HeadTrainingBatch
    from starkit.samplers import stable
    gen, _ = trained
    sampler = gen.sampler
    monkeypatch.setattr(stable, "keep_ratio", lambda batch, mode="arccos", device=None: torch.full((batch,), 0.5))
    g = torch.Generator().manual_seed(0)
    K, B = len(gen.patch_nums), 2
    indices = [torch.randint(0, gen.tokenizer.codebook_size, (B, pn * pn), generator=g) for pn in gen.patch_nums]
    L = sum(pn * pn for pn in gen.patch_nums)
    batch = HeadTrainingBatch(hidden=torch.randn(B, L, gen.transformer.width, generator=g), indices=indices,
                              pooled_text=torch.randn(B, gen.text_encoder.dim, generator=g),
                              patch_nums=gen.patch_nums, embed=gen.tokenizer.embed,
                              rotary=gen.transformer.positional.rotary)
    seen, real_forward = [], sampler.head.forward

    def forward(hidden, shown, pooled, k, *rest, **kwargs):
        logits = real_forward(hidden, shown, pooled, k, *rest, **kwargs)
        seen.append((k, shown, logits))
        return logits
    monkeypatch.setattr(sampler.head, "forward", forward)
    torch.manual_seed(7)
    with torch.no_grad():
        loss, _ = sampler.training_loss(batch)
    torch.manual_seed(7)  # the same masks, drawn in the same order (keep_ratio draws nothing here)
    total, count = 0.0, 0
    for k, shown, logits in seen:
        keep = torch.rand(B, gen.patch_nums[k] ** 2) < 0.5
        expected_shown = gen.tokenizer.embed(indices[k]).float() * keep[..., None]
        torch.testing.assert_close(shown, expected_shown)
        ce = F.cross_entropy(logits.float().flatten(0, 1), indices[k].flatten(), reduction="none").view(B, -1)
        total, count = total + ce[~keep].sum(), count + int((~keep).sum())
    assert [k for k, _, _ in seen] == list(sampler.causal_scale_ids(K)) and count > 0
    torch.testing.assert_close(loss, total / count)


def test_the_head_gets_each_scales_own_rotary_positions_when_sampling(trained, monkeypatch):
    """At sampling time the head of scale k gets the rotary tables of that scale's tokens in the whole sequence
    (positions starts[k]..starts[k+1]) and those of the first token, as in its training loss."""
    gen, _ = trained
    seen = []
    real = gen.sampler.head.for_scale

    def spy(hidden, pooled, scale, rotary_first=None, rotary=None, *args, **kwargs):
        seen.append((scale, rotary_first, rotary))
        return real(hidden, pooled, scale, rotary_first, rotary, *args, **kwargs)
    monkeypatch.setattr(gen.sampler.head, "for_scale", spy)
    gen.generate(PROMPTS[:2], seed=0)
    starts = [0]
    for pn in gen.patch_nums:
        starts.append(starts[-1] + pn * pn)
    as_tables = lambda r: tuple(torch.view_as_real(t) if torch.is_complex(t) else t  # noqa: E731
                                for t in (r if isinstance(r, tuple) else (r,)))
    assert sorted({k for k, _, _ in seen}) == list(gen.sampler.causal_scale_ids(len(gen.patch_nums)))
    for k, first, rotary in seen:
        want = gen.transformer.positional.rotary(slice(starts[k], starts[k + 1]))
        assert rotary is not None and len(as_tables(rotary)) == len(as_tables(want))
        for a, b in zip(as_tables(rotary), as_tables(want)):
            torch.testing.assert_close(a, b)
        for a, b in zip(as_tables(first), as_tables(gen.transformer.positional.rotary(slice(0, 1)))):
            torch.testing.assert_close(a, b)

"""Training paths: EMA timing under accumulation and checkpointing, the LR schedule's end, the sampler in a
Lightning checkpoint, validation and random state, precision flags, tokenizer resume, init_from reporting."""
import types

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from conftest import make_tiny_generator, make_tiny_tokenizer, random_batch
from starkit.samplers import StableSampler


class _Images(Dataset):
    def __init__(self, n=8, resolution=32):
        self.n, self.resolution = n, resolution

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return {"image": torch.rand(3, self.resolution, self.resolution, generator=g) * 2 - 1,
                "caption": ["a red circle", "two blue squares"][i % 2]}


def _loader(n=8):
    return DataLoader(_Images(n), batch_size=2, generator=torch.Generator())


def _trainer(**kwargs):
    args = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    args.update(kwargs)
    return L.Trainer(**args)


def test_ema_updates_once_per_optimizer_step_under_gradient_accumulation(monkeypatch):
    from starkit.generator import distributed
    calls = []
    real = distributed.ema_update
    monkeypatch.setattr(distributed, "ema_update", lambda module, decay: (calls.append(1), real(module, decay)))
    gen = make_tiny_generator(ema_decay=0.9)
    trainer = _trainer(max_steps=2, accumulate_grad_batches=2)
    trainer.fit(gen, _loader())
    assert trainer.global_step == 2
    assert len(calls) == 2  # before: 4 (one per micro-batch: decay**2 per optimizer step)


def test_the_sampler_head_stage_does_not_update_the_ema_of_the_frozen_transformer(monkeypatch):
    """stage='sampler_head' freezes the transformer: its EMA would stay equal to it, so it is not updated (each
    update reads and writes every weight), and ema_decay there says it has no effect."""
    from starkit.generator import distributed
    from starkit.samplers import StableSampler
    calls = []
    monkeypatch.setattr(distributed, "ema_update", lambda module, decay: calls.append(1))
    with pytest.warns(UserWarning, match="ema_decay has no effect with stage='sampler_head'"):
        gen = make_tiny_generator(ema_decay=0.9, stage="sampler_head", sampler=StableSampler(head_depth=1))
    _trainer(max_steps=2).fit(gen, _loader())
    assert calls == []
    assert all(torch.equal(e, t) for e, t in zip(gen.ema.parameters(), gen.transformer.parameters()))


def test_checkpoints_hold_the_ema_of_their_step_and_the_ema_stays_in_eval_mode():
    seen = []

    class Snapshot(L.Callback):  # runs where ModelCheckpoint saves (callbacks before the module's hook)
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(("ema training", pl_module.ema.training))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            same = all(torch.equal(e, t) for e, t in zip(pl_module.ema.parameters(), pl_module.transformer.parameters()))
            seen.append(("ema of this step", same))

    gen = make_tiny_generator(ema_decay=0.0)  # decay 0: the EMA of a step is that step's weights
    _trainer(max_steps=2, callbacks=[Snapshot()]).fit(gen, _loader())
    assert ("ema training", True) not in seen  # before: the deep copy of the training transformer, in train mode
    assert [v for k, v in seen if k == "ema of this step"] == [True, True]  # before: one update behind


def test_learning_rate_reaches_final_ratio_at_the_last_step():
    from starkit.generator.optim import warmup_linear_decay
    no_warmup = warmup_linear_decay(0, 4, 0.01)
    assert [round(no_warmup(s), 4) for s in range(4)] == [1.0, 0.67, 0.34, 0.01]  # before: 0.2575 at the last step
    warm = warmup_linear_decay(2, 4, 0.01)
    assert [warm(s) for s in range(4)] == pytest.approx([0.5, 1.0, 1.0, 0.01])


def test_a_run_of_unknown_length_is_a_clear_error_for_the_schedule():
    gen = make_tiny_generator()
    gen._trainer = types.SimpleNamespace(estimated_stepping_batches=float("inf"), precision="32-true")
    with pytest.raises(ValueError, match="max_steps"):  # before: OverflowError: cannot convert float infinity
        gen.configure_optimizers()


def test_a_lightning_checkpoint_rebuilds_the_sampler_as_it_is_now(tmp_path):
    from starkit.generator import ScaleWiseGenerator
    gen = make_tiny_generator()
    gen.sampler.cfg = 1.5  # a setting changed on the object
    trainer = _trainer(max_steps=1)
    trainer.fit(gen, _loader(2))
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    assert ScaleWiseGenerator.load_from_checkpoint(tmp_path / "a.ckpt").sampler.cfg == 1.5  # before: 4.0

    swapped = make_tiny_generator()
    sampler = StableSampler(causal_scales=2, steps=2, steps_last=2)
    sampler.build(32, 32, 8, 16, 2, swapped.patch_nums)
    swapped.sampler = sampler
    trainer = _trainer(max_steps=1)
    trainer.fit(swapped, _loader(2))
    trainer.save_checkpoint(tmp_path / "b.ckpt")
    loaded = ScaleWiseGenerator.load_from_checkpoint(tmp_path / "b.ckpt")  # before: unexpected keys sampler.head.*
    assert isinstance(loaded.sampler, StableSampler) and loaded.sampler.steps == 2
    assert torch.equal(loaded.sampler.head.proj.weight, sampler.head.proj.weight)
    assert swapped.hparams["sampler"] is None  # the module's own hparams are left as they were (the default)


def test_sampler_head_validation_leaves_the_random_state_alone():
    gen = make_tiny_generator(stage="sampler_head", sampler=StableSampler(causal_scales=2, steps=2, steps_last=2))
    gen.log = lambda *a, **k: None
    gen.eval()
    state = torch.get_rng_state()
    gen._loss(random_batch(2), "val")
    assert torch.equal(state, torch.get_rng_state())  # before: the reveal masks were drawn from it
    gen.train()
    gen._loss(random_batch(2), "train")
    assert not torch.equal(state, torch.get_rng_state())  # training draws as before


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_half_true_precision_is_a_clear_error_for_the_generator_and_the_tokenizer(precision):
    with pytest.raises(ValueError, match="bf16-mixed"):  # before: a dtype mismatch inside the quantizer
        _trainer(max_steps=1, precision=precision).fit(make_tiny_generator(), _loader(2))
    with pytest.raises(ValueError, match="bf16-mixed"):
        _trainer(max_steps=1, precision=precision).fit(make_tiny_tokenizer(num_log_images=0), _loader(2))


def test_tokenizer_resume_continues_the_code_usage_ema():
    tok = make_tiny_tokenizer()
    hits = [torch.arange(16.0) + k for k in range(4)]
    for _ in range(3):
        tok.quantize.update_usage(hits)
    tok.train_step_count = 3
    checkpoint = {"state_dict": tok.state_dict()}
    tok.on_save_checkpoint(checkpoint)
    for saved in (checkpoint, {k: v for k, v in checkpoint.items() if k != "starkit_usage_ema_steps"}):  # + older files
        resumed = make_tiny_tokenizer()
        resumed.load_state_dict(saved["state_dict"])
        resumed.on_load_checkpoint(saved)
        before = resumed.quantize.ema_vocab_hit_SV.clone()
        new_hits = [torch.ones(16) * 7 for _ in range(4)]
        resumed.quantize.update_usage(new_hits)
        # before: the first update after a resume replaced the EMA with one batch's hits
        torch.testing.assert_close(resumed.quantize.ema_vocab_hit_SV, 0.99 * before + 0.01 * torch.stack(new_hits))


def test_init_from_reports_skipped_sampler_tensors_and_a_partly_copied_head_is_not_trained(tmp_path):
    src = make_tiny_generator(sampler=StableSampler(causal_scales=2, head_depth=2))
    src.sampler.head_trained.fill_(1)
    path = str(tmp_path / "src.ckpt")
    torch.save({"state_dict": src.state_dict(), "hyper_parameters": dict(src.hparams)}, path)
    with pytest.warns(UserWarning, match="sampler tensors not copied"):
        deeper = make_tiny_generator(sampler=StableSampler(causal_scales=2, head_depth=3), init_from=path)
    skipped = deeper._init_from_summary["skipped"]
    assert any(k.startswith("sampler.head.blocks.2.") for k in skipped)
    assert not deeper.sampler.head_ready  # before: True, with a randomly initialised third block
    assert torch.equal(deeper.sampler.head.blocks[0].ffn.fc1.weight, src.sampler.head.blocks[0].ffn.fc1.weight)
    with pytest.warns(UserWarning, match="sampler tensors not copied"):
        parallel = make_tiny_generator(init_from=path)  # a sampler without weights: the source's head is skipped
    assert "sampler.head_trained" in parallel._init_from_summary["skipped"]


def test_validation_loaders_leave_the_global_random_state_alone(tmp_path):
    """Every iter(DataLoader) draws its workers' base seed from the loader's generator, else from the global RNG:
    the validation/test loaders have their own, so a validation between steps does not move training's draws."""
    from PIL import Image
    from starkit.data import CaptionedImageDataModule, ShapesDataModule
    for i in range(4):
        Image.new("RGB", (32, 32), (60 * i, 0, 0)).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"image {i}")
    shapes = ShapesDataModule(resolution=32, batch_size=2, num_train=4, num_val=2)
    folder = CaptionedImageDataModule(root=str(tmp_path), resolution=32, batch_size=2, num_workers=0, val_size=2)
    for dm in (shapes, folder):
        dm.setup("fit")
        torch.manual_seed(0)
        state = torch.get_rng_state()
        next(iter(dm.val_dataloader()))
        assert torch.equal(torch.get_rng_state(), state), type(dm).__name__
    shapes.setup("test")
    next(iter(shapes.test_dataloader()))
    assert torch.equal(torch.get_rng_state(), state)


def test_a_run_with_validation_trains_like_one_without():
    from starkit.data import ShapesDataModule

    def weights(limit_val_batches):
        gen = make_tiny_generator(token_drop=2)
        dm = ShapesDataModule(resolution=32, batch_size=2, num_train=8, num_val=2)
        torch.manual_seed(0)
        _trainer(max_steps=4, limit_val_batches=limit_val_batches, val_check_interval=2).fit(gen, datamodule=dm)
        return [p.detach().clone() for p in gen.transformer.parameters()]
    for a, b in zip(weights(0), weights(1)):
        assert torch.equal(a, b)

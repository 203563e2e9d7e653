"""Progressive resolution: init_from copies the transformer across scale changes (CLI and Python)."""
import glob
import os

import pytest
import torch

from conftest import REPO, make_tiny_generator, make_tiny_tokenizer
from starkit.generator.progressive import grow_levels, init_transformer_from
from starkit.positional import LearnedAbsolutePE
from starkit.samplers import StableSampler

FAST = ["--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.val_check_interval=1",
        "--data.init_args.num_train=16", "--data.init_args.num_val=4", "--data.init_args.batch_size=4",
        "--trainer.log_every_n_steps=1"]


def _save_ckpt(gen, path):
    torch.save({"state_dict": gen.state_dict(), "hyper_parameters": dict(gen.hparams)}, path)
    return str(path)


def _last_ckpt(root):
    found = glob.glob(os.path.join(root, "**", "last.ckpt"), recursive=True)
    assert len(found) == 1, found
    return found[0]


def _transformer(ckpt_path):
    sd = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    return {k[len("transformer."):]: v for k, v in sd.items() if k.startswith("transformer.")}, sd


def test_grow_levels_copies_old_rows_and_repeats_the_last():
    old = torch.arange(8.0).view(4, 2)
    new = grow_levels(old, 6)
    assert torch.equal(new[:4], old) and torch.equal(new[4], old[3]) and torch.equal(new[5], old[3])


def test_init_from_checkpoint_grows_scales_and_prefers_ema(tmp_path):
    src = make_tiny_generator(ema_decay=0.9)
    with torch.no_grad():
        for p in src.ema.parameters():
            p.add_(0.5)  # EMA differs from the raw weights: the EMA must be the one copied
    path = _save_ckpt(src, tmp_path / "src.ckpt")
    dst = make_tiny_generator(tokenizer=make_tiny_tokenizer(patch_nums=(1, 2, 3, 4, 6)), init_from=path)
    ema = src.ema.state_dict()
    for k, v in dst.transformer.state_dict().items():
        if k == "lvl_embed.weight":
            assert v.shape[0] == 5 and torch.equal(v[:4], ema[k]) and torch.equal(v[4], ema[k][3])
        else:
            assert torch.equal(v, ema[k]), k
    assert dst._init_from_summary["resized"]


def test_init_from_with_learned_absolute_pe_resizes(tmp_path):
    src = make_tiny_generator(positional=LearnedAbsolutePE)
    path = _save_ckpt(src, tmp_path / "src.ckpt")
    dst = make_tiny_generator(positional=LearnedAbsolutePE, tokenizer=make_tiny_tokenizer(patch_nums=(1, 2, 3, 4, 6)),
                              init_from=path)
    old, new = src.transformer.positional.pos_1LC, dst.transformer.positional.pos_1LC
    assert new.shape == (1, 30 + 36, 32)
    assert torch.equal(new[:, :30], old)  # unchanged scales copied
    expected = torch.nn.functional.interpolate(old[:, 14:30].transpose(1, 2).unflatten(2, (4, 4)), size=(6, 6),
                                               mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    assert torch.allclose(new[:, 30:], expected, atol=1e-6)


def test_init_from_model_directory(tmp_path):
    from starkit.pipeline import save_model_dir
    src = make_tiny_generator()
    save_model_dir(src, str(tmp_path / "model"))
    dst = make_tiny_generator(tokenizer=make_tiny_tokenizer(patch_nums=(1, 2, 3, 4, 6)),
                              init_from=str(tmp_path / "model"))
    assert torch.equal(dst.transformer.blocks[1].attn.mat_qkv.weight, src.transformer.blocks[1].attn.mat_qkv.weight)


def test_init_from_other_architecture_names_the_keys(tmp_path):
    path = _save_ckpt(make_tiny_generator(), tmp_path / "src.ckpt")
    with pytest.raises(RuntimeError, match="mat_qkv"):
        make_tiny_generator(width=64, init_from=path)
    with pytest.raises(RuntimeError, match="blocks.2"):
        make_tiny_generator(depth=3, init_from=path)
    with pytest.raises(FileNotFoundError):
        make_tiny_generator(init_from=str(tmp_path / "nope.ckpt"))


def test_init_from_copies_sampler_head_weights(tmp_path):
    src = make_tiny_generator(sampler=StableSampler(causal_scales=2))
    src.sampler.head_trained.fill_(1)
    path = _save_ckpt(src, tmp_path / "src.ckpt")
    dst = make_tiny_generator(sampler=StableSampler(causal_scales=2),
                              tokenizer=make_tiny_tokenizer(patch_nums=(1, 2, 3, 4, 6)), init_from=path)
    assert dst.sampler.head_ready
    assert torch.equal(dst.sampler.head.blocks[0].ffn.fc1.weight, src.sampler.head.blocks[0].ffn.fc1.weight)
    assert dst.sampler.head.lvl_embed.weight.shape[0] == 5


def test_tiny_three_stage_progression_and_sampler_head_through_the_cli(tmp_path, monkeypatch):
    from starkit.cli import main
    from starkit.generator import progressive
    snapshots = []
    real = progressive.init_transformer_from

    def spy(generator, path):  # record the weights each stage starts from
        summary = real(generator, path)
        snapshots.append(({k: v.clone() for k, v in generator.transformer.state_dict().items()}, summary))
        return summary

    monkeypatch.setattr(progressive, "init_transformer_from", spy)
    recipes = os.path.join(REPO, "recipes", "generator")
    previous = None
    for name in ("tiny", "tiny_stage2", "tiny_stage3", "tiny_sampler_head"):
        root = str(tmp_path / name)
        args = ["fit", "--config", os.path.join(recipes, f"{name}.yaml"), *FAST, f"--trainer.default_root_dir={root}"]
        if previous is not None:
            args.append(f"--model.init_args.init_from={previous}")
        gen = main(args).model
        ckpt = _last_ckpt(root)
        if previous is None:
            assert not snapshots
        else:
            start, summary = snapshots[-1]
            source, _ = _transformer(previous)
            assert set(source) == set(start)
            for k, v in source.items():
                if k == "lvl_embed.weight" and v.shape != start[k].shape:  # one more scale: rows copied, new row
                    assert torch.equal(start[k][: v.shape[0]], v) and torch.equal(start[k][-1], v[-1])
                else:
                    assert torch.equal(start[k], v), (name, k)
            assert "blocks.0.attn.mat_qkv.weight" in summary["copied"]
        if name == "tiny_sampler_head":
            after, sd = _transformer(ckpt)
            for k, v in _transformer(previous)[0].items():
                assert torch.equal(after[k], v), k  # frozen: the stage-3 transformer is unchanged
            assert int(sd["sampler.head_trained"]) == 1 and gen.sampler.head_ready
        previous = ckpt
    assert len(snapshots) == 3
    images = gen.generate(["a red circle"], seed=0)
    assert images.shape == (1, 3, 64, 64)


def test_checkpoint_of_an_init_from_run_loads_and_exports_without_its_source(tmp_path):
    """The checkpoint holds the trained weights: load_from_checkpoint and export do not read init_from again,
    so they work after the source run was moved or deleted."""
    from starkit.cli import main
    from starkit.export import export_checkpoint
    from starkit.generator import ScaleWiseGenerator
    recipes = os.path.join(REPO, "recipes", "generator")
    first = str(tmp_path / "first")
    main(["fit", "--config", os.path.join(recipes, "tiny.yaml"), *FAST, f"--trainer.default_root_dir={first}"])
    source = str(tmp_path / "source.ckpt")
    os.rename(_last_ckpt(first), source)
    second = str(tmp_path / "second")
    main(["fit", "--config", os.path.join(recipes, "tiny.yaml"), *FAST, f"--trainer.default_root_dir={second}",
          f"--model.init_args.init_from={source}"])
    ckpt = _last_ckpt(second)
    os.remove(source)
    gen = ScaleWiseGenerator.load_from_checkpoint(ckpt, map_location="cpu")
    assert gen.hparams.init_from is None
    _, sd = _transformer(ckpt)
    assert all(torch.equal(v, sd[f"transformer.{k}"]) for k, v in gen.transformer.state_dict().items())
    export_checkpoint(ckpt, str(tmp_path / "model"))
    assert os.path.exists(tmp_path / "model" / "generator.safetensors")
    with pytest.raises(FileNotFoundError, match="init_from=null"):
        ScaleWiseGenerator.load_from_checkpoint(ckpt, map_location="cpu", init_from=source)


def test_init_from_a_run_folder_takes_its_newest_last_checkpoint(tmp_path):
    """init_from: runs/<name> (what the tiny stage recipes say) resolves to the newest last.ckpt of any version,
    so a second run of the previous stage is the one used (not a hard-coded version_0)."""
    import time
    from starkit.generator.progressive import newest_checkpoint_of_run
    run = tmp_path / "runs" / "generator-tiny"
    paths = []
    for version in (0, 1):
        d = run / "lightning_logs" / f"version_{version}" / "checkpoints"
        d.mkdir(parents=True)
        src = make_tiny_generator()
        with torch.no_grad():
            src.transformer.head_logits.weight.fill_(float(version + 1))
        paths.append(_save_ckpt(src, d / "last.ckpt"))
        time.sleep(0.05)
    os.utime(paths[0], (time.time() - 100, time.time() - 100))
    assert newest_checkpoint_of_run(str(run)) == paths[1]
    dst = make_tiny_generator(init_from=str(run))
    assert torch.all(dst.transformer.head_logits.weight == 2.0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without a last.ckpt"):
        make_tiny_generator(init_from=str(tmp_path / "empty"))

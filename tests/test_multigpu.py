"""Multi-process paths on the CPU (gloo): DDP training through the CLI, its checkpoint loaded in
one process and exported, a sharded (FSDP-layout) checkpoint directory exported, 2-process
prediction writing each image once; FSDP-specific logic that can run without a GPU."""
import glob
import json
import os
import subprocess
import sys

import lightning as L
import pytest
import torch

from conftest import REPO, make_tiny_generator

# (an inherited PYTHONPATH is kept after ours: the GPU machine's jsonargparse lies on it)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": os.pathsep.join([REPO, os.path.join(REPO, "tests")] + ([os.environ["PYTHONPATH"]]
                                                                            if os.environ.get("PYTHONPATH") else []))}
PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a purple star", "a yellow square"]


def _starkit(args, cwd):
    proc = subprocess.run([sys.executable, "-m", "starkit", *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Two gloo processes train the tiny generator (with EMA) for 2 steps through `starkit fit`."""
    root = tmp_path_factory.mktemp("ddp")
    _starkit(["fit", "--config", os.path.join(REPO, "recipes/generator/tiny.yaml"), "--trainer.strategy=ddp",
              "--trainer.devices=2", "--trainer.accelerator=cpu",
              "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.val_check_interval=2",
              f"--trainer.default_root_dir={root}", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
              "--data.init_args.num_train=16", "--data.init_args.num_val=4", "--data.init_args.batch_size=4",
              "--model.init_args.ema_decay=0.9"], cwd=root)
    return root, os.path.join(root, "checkpoints", "last.ckpt")


def test_ddp_checkpoint_loads_in_one_process_and_exports(ddp_run):
    from starkit import StarPipeline
    from starkit.export import export_checkpoint
    from starkit.generator import ScaleWiseGenerator
    root, ckpt = ddp_run
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 2
    gen = ScaleWiseGenerator.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    init = make_tiny_generator()
    moved = [n for n, p in gen.transformer.named_parameters()
             if not torch.equal(p, dict(init.transformer.named_parameters())[n])]
    assert moved  # trained
    ema_moved = any(not torch.equal(e, p) for e, p in zip(gen.ema.parameters(), init.transformer.parameters()))
    assert ema_moved and not all(torch.equal(e, p) for e, p in zip(gen.ema.parameters(), gen.transformer.parameters()))
    model_dir = export_checkpoint(ckpt, str(root / "model"))
    images = StarPipeline.from_pretrained(model_dir)(["a red circle"], seed=0)
    assert len(images) == 1 and images[0].size == (32, 32)


def test_sharded_checkpoint_directory_exports(ddp_run, tmp_path):
    """A directory in the layout of Lightning's FSDP `state_dict_type="sharded"` (torch.distributed
    .checkpoint shards + .metadata + meta.pt) is consolidated by `starkit export`."""
    from lightning.fabric.strategies.fsdp import _distributed_checkpoint_save
    from starkit.pipeline import load_generator
    _, ckpt = ddp_run
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    sharded = tmp_path / "last.ckpt"
    sharded.mkdir()
    converted = {"model": state.pop("state_dict")}
    converted.update({f"optimizer_{i}": o for i, o in enumerate(state.pop("optimizer_states", []))})
    _distributed_checkpoint_save(converted, sharded)
    torch.save(state, sharded / "meta.pt")
    assert (sharded / ".metadata").is_file()
    _starkit(["export", str(sharded), str(tmp_path / "from_dir")], cwd=tmp_path)
    _starkit(["export", ckpt, str(tmp_path / "from_file")], cwd=tmp_path)
    a, b = load_generator(str(tmp_path / "from_dir")), load_generator(str(tmp_path / "from_file"))
    for (name, x), y in zip(a.transformer.state_dict().items(), b.transformer.state_dict().values()):
        assert torch.equal(x, y), name
    assert not glob.glob(os.path.join(tempfile_dir(), "starkit-consolidated-*.ckpt"))


def tempfile_dir():
    import tempfile
    return tempfile.gettempdir()


class RecordPredictions(L.Callback):
    """Appends "rank name" for every predicted image (to check that no image is made twice)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        with open(self.path, "a") as fh:
            fh.writelines(f"{trainer.global_rank} {name}\n" for name in batch["name"])


def test_two_process_predict_writes_each_image_once(ddp_run, tmp_path):
    from starkit.export import export_checkpoint
    root, ckpt = ddp_run
    model_dir = str(root / "model") if os.path.isdir(root / "model") else export_checkpoint(ckpt, str(root / "model"))
    out, record = tmp_path / "out", tmp_path / "record.txt"
    _starkit(["predict", "--config", os.path.join(REPO, "recipes/predict/tiny.yaml"), f"--model.init_args.path={model_dir}",
              "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.precision=32-true",
              "--trainer.enable_progress_bar=false", f"--data.init_args.prompts={json.dumps(PROMPTS)}",
              "--data.init_args.num_images_per_prompt=2", "--data.init_args.batch_size=2",
              f"--data.init_args.output_dir={out}", f"--trainer.callbacks.init_args.output_dir={out}",
              "--trainer.callbacks+=test_multigpu.RecordPredictions", f"--trainer.callbacks.init_args.path={record}"],
             cwd=tmp_path)
    lines = [line.split() for line in record.read_text().splitlines()]
    names = [n for _, n in lines]
    expected = sorted(f"{i:06d}_{j:02d}" for i in range(len(PROMPTS)) for j in range(2))
    assert sorted(names) == expected  # each image generated exactly once over both ranks
    assert {r for r, _ in lines} == {"0", "1"}  # both ranks worked
    assert sorted(os.listdir(out)) == sorted([f"{n}.png" for n in expected] + [f"{n}.json" for n in expected])
    meta = json.loads((out / "000003_01.json").read_text())
    assert meta["prompt"] == PROMPTS[3]


# ---------------------------------------------------------------- FSDP logic without a GPU
def _fsdp_batch() -> dict:
    return {"image": torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1,
            "caption": ["a red square", "two blue circles"]}


def _loss_and_grad_norms(gen, grad_of) -> dict:
    """{checkpointing: (loss, norm of grad_of()'s gradient)} of one teacher-forced pass without and with
    activation checkpointing."""
    result = {}
    for checkpointing in (False, True):
        gen.transformer.activation_checkpointing = checkpointing
        gen.zero_grad(set_to_none=True)
        torch.manual_seed(2)
        loss = gen._loss(_fsdp_batch(), "train")
        loss.backward()
        result[str(checkpointing)] = (loss.item(), grad_of().norm().item())
    return result


def _fsdp_blocks_worker(rank: int, port: int, out_dir: str) -> None:
    """One of 2 gloo processes: the tiny generator with every Block an FSDP unit (1-D shards
    outside the unit's own call), loss and gradients with and without activation checkpointing."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        gen = make_tiny_generator()
        blocks = gen.transformer.blocks
        for i in range(len(blocks)):
            blocks[i] = FSDP(blocks[i], use_orig_params=True, device_id=torch.device("cpu"))

        def full_grad():
            with FSDP.summon_full_params(blocks[0], with_grads=True):
                return blocks[0].cross_attn.mat_kv.weight.grad.clone()

        torch.save(_loss_and_grad_norms(gen, full_grad), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_teacher_forced_pass_runs_with_per_block_fsdp_units(tmp_path):
    """Every Block wrapped as an FSDP unit (what BlockFSDPStrategy does; torch's FSDP runs on the CPU
    with gloo here, Lightning's strategy does not): a block's weights are 1-D shards outside its own
    call, so the training pass must form each block's text keys/values inside the block (it formed
    them all first and failed with "mat2 must be a matrix" on the GPUs). Loss and gradients match
    the unwrapped model, with and without activation checkpointing."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_fsdp_blocks_worker, args=(port, str(tmp_path)), nprocs=2)
    torch.manual_seed(0)
    gen = make_tiny_generator()
    want = _loss_and_grad_norms(gen, lambda: gen.transformer.blocks[0].cross_attn.mat_kv.weight.grad)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for checkpointing, (loss, grad) in want.items():
            assert got[checkpointing][0] == pytest.approx(loss, rel=1e-5)
            assert got[checkpointing][1] == pytest.approx(grad, rel=1e-4)


def test_fsdp_strategy_needs_cuda_with_a_clear_error():
    """Lightning refuses FSDPStrategy with accelerator='cpu' (torch's FSDP1 runs on the CPU only when given
    device_id=cpu, which Lightning does not do), so FSDP training through the Trainer cannot run here.
    BlockFSDPStrategy says so before any work."""
    from starkit.generator.distributed import BlockFSDPStrategy
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy=BlockFSDPStrategy(), max_steps=1, logger=False,
                        enable_progress_bar=False)
    with pytest.raises(ValueError, match="needs CUDA"):
        trainer.fit(make_tiny_generator(), train_dataloaders=[])


def test_block_fsdp_strategy_settings():
    from torch.distributed.fsdp import ShardingStrategy
    from starkit.generator.blocks import Block
    from starkit.generator.distributed import BlockFSDPStrategy
    s = BlockFSDPStrategy(activation_checkpointing=True, sharding_strategy="SHARD_GRAD_OP")
    assert s.kwargs["auto_wrap_policy"]._module_classes == {Block} and s.kwargs["use_orig_params"] is True
    assert s._activation_checkpointing_kwargs  # per-Block checkpoint wrapper
    assert s.sharding_strategy == ShardingStrategy.SHARD_GRAD_OP and s._state_dict_type == "sharded"


def test_optimizer_groups_survive_sharded_and_wrapped_parameters():
    """FSDP (use_orig_params) shows 1-D local shards and wrapper names when configure_optimizers
    runs: the weight-decay groups must still follow the original shapes and names."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from starkit.generator.blocks import Block

    def groups(gen):
        opt = gen.configure_optimizers()["optimizer"]
        return [sum(p.numel() for p in g["params"]) for g in opt.param_groups]

    reference = groups(make_tiny_generator())
    gen = make_tiny_generator()
    gen.configure_model()  # what Lightning runs before a strategy wraps the model
    apply_activation_checkpointing(gen.transformer, check_fn=lambda m: isinstance(m, Block))
    assert any("_checkpoint_wrapped_module" in n for n, _ in gen.transformer.named_parameters())
    for p in gen.transformer.parameters():
        p.data = p.data.reshape(-1)  # as FSDP's 1-D shard views
    assert groups(gen) == reference


def test_ema_update_matches_plain_lerp_and_refuses_mismatched_shards():
    from starkit.generator.distributed import ema_update
    gen = make_tiny_generator(ema_decay=0.5)
    with torch.no_grad():
        for p in gen.transformer.parameters():
            p.add_(1.0)
    expected = [0.5 * e + 0.5 * p for e, p in zip(gen.ema.parameters(), gen.transformer.parameters())]
    gen.on_train_batch_end(None, None, 0)
    for e, want in zip(gen.ema.parameters(), expected):
        torch.testing.assert_close(e, want)
    gen.ema.blocks[0].ffn.fc1.weight.data = gen.ema.blocks[0].ffn.fc1.weight.data.reshape(-1)[:5]
    with pytest.raises(RuntimeError, match="sharded differently"):
        ema_update(gen, 0.5)


# ---------------------------------------------------------------- FSDP on GPUs (skipped on CPU)
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="BlockFSDPStrategy needs >= 2 CUDA GPUs (Lightning refuses FSDP on the CPU)")
def test_fsdp_two_gpus_sharded_checkpoint_ema_export(tmp_path):
    """BlockFSDPStrategy on 2 GPUs: per-Block wrapping (EMA blocks too), per-Block activation
    checkpointing, bf16; with ema_decay=0 the EMA must equal the transformer exactly after each
    step (any mismatched shard pairing breaks that); the sharded checkpoint directory exports."""
    from starkit.pipeline import load_generator
    config = tmp_path / "fsdp.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {save_last: true}\n  strategy:\n    class_path: starkit.generator.distributed.BlockFSDPStrategy\n"
        "    init_args: {activation_checkpointing: true, state_dict_type: sharded}\n")
    _starkit(["fit", "--config", os.path.join(REPO, "recipes/generator/tiny.yaml"), "--config", str(config),
              "--trainer.accelerator=gpu", "--trainer.devices=2", "--trainer.use_distributed_sampler=false",
              "--trainer.precision=bf16-mixed", "--trainer.max_steps=3", "--trainer.limit_val_batches=1",
              "--trainer.val_check_interval=3", f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
              "--trainer.enable_progress_bar=false", "--data.init_args.num_train=32", "--data.init_args.num_val=4",
              "--data.init_args.batch_size=4", "--model.init_args.ema_decay=0.0"], cwd=tmp_path)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and (ckpt / ".metadata").is_file()
    _starkit(["export", "--no-ema", str(ckpt), str(tmp_path / "raw")], cwd=tmp_path)
    _starkit(["export", str(ckpt), str(tmp_path / "ema")], cwd=tmp_path)
    raw, ema = load_generator(str(tmp_path / "raw")), load_generator(str(tmp_path / "ema"))
    init = make_tiny_generator()
    for (name, a), b, c in zip(raw.transformer.state_dict().items(), ema.transformer.state_dict().values(),
                               init.transformer.state_dict().values()):
        assert torch.equal(a, b), f"EMA (decay 0) differs from the weights at {name}"
    assert any(not torch.equal(a, c) for a, c in zip(raw.transformer.parameters(), init.transformer.parameters()))

"""Shared tiny components: every test model is built from configs, offline, in seconds."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(2)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_PATCH_NUMS = (1, 2, 3, 4)
TINY_TOKENIZER = dict(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, z_channels=8, codebook_size=16,
                      patch_nums=TINY_PATCH_NUMS, using_sa=False)  # 4 * 8 = 32 px


def make_tiny_tokenizer(**overrides):
    from starkit.tokenizers import MultiScaleVQ
    torch.manual_seed(0)
    return MultiScaleVQ(**{**TINY_TOKENIZER, **overrides})


def make_tiny_generator(**overrides):
    from starkit.generator import ScaleWiseGenerator
    from starkit.text import RandomTextEncoder
    torch.manual_seed(0)
    args = dict(tokenizer=make_tiny_tokenizer(), text_encoder=RandomTextEncoder(dim=32), size="tiny")
    args.update(overrides)
    return ScaleWiseGenerator(**args)


@pytest.fixture
def tiny_tokenizer():
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_generator():
    return make_tiny_generator()


def random_batch(batch_size=4, resolution=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    captions = ["a red circle", "two blue squares", "a green triangle above a yellow circle", "a purple star"]
    return {"image": torch.rand(batch_size, 3, resolution, resolution, generator=g) * 2 - 1,
            "caption": [captions[i % len(captions)] for i in range(batch_size)]}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A model directory exported from a tiny generator trained for two steps through the CLI."""
    import glob as _glob

    from starkit.cli import main
    from starkit.export import export_checkpoint
    root = tmp_path_factory.mktemp("tiny_run")
    main(["fit", "--config", os.path.join(REPO, "recipes/generator/tiny.yaml"), "--trainer.max_steps=2",
          "--trainer.limit_val_batches=1", "--trainer.val_check_interval=1", f"--trainer.default_root_dir={root}",
          "--data.init_args.num_train=32", "--data.init_args.num_val=4", "--trainer.logger=false"])
    ckpt = sorted(_glob.glob(str(root / "**" / "last.ckpt"), recursive=True))[0]
    return export_checkpoint(ckpt, str(root / "model"))


class ReplayingGraph:
    """A stand-in for ``torch.cuda.CUDAGraph`` on the CPU: ``replay()`` runs the captured function again and copies
    its results into the outputs of the "capture", as a real replay overwrites them (tests of aliasing)."""

    def __init__(self, fn):
        self.fn, self.replays = fn, 0

    def replay(self):
        self.replays += 1
        _copy_into(self.outputs, self.fn())


def _copy_into(dst, src):
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif isinstance(dst, (tuple, list)):
        for d, s in zip(dst, src):
            _copy_into(d, s)


def fake_cuda_graphs(monkeypatch, failing: bool = False):
    """starkit.utils.cuda_graphs captures on the CPU as if on a GPU, with :class:`ReplayingGraph` graphs. As a
    real capture, the fake one leaves the default generator where it was (it records draws, it makes none); the
    CUDA generator-state calls act on the CPU's default generator. ``failing``: every capture raises what an
    operation that cannot be captured raises."""
    from starkit.utils import cuda_graphs

    def capture(fn, pool, generators=()):
        if failing:
            raise RuntimeError("operation not permitted when stream is capturing")
        graph = ReplayingGraph(fn)
        state = torch.get_rng_state()
        graph.outputs = fn()
        torch.set_rng_state(state)
        return graph, graph.outputs

    monkeypatch.setattr(cuda_graphs, "captures_on", lambda device: True)
    monkeypatch.setattr(cuda_graphs, "warm_up", lambda fn, device: fn())
    monkeypatch.setattr(cuda_graphs, "capture", capture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: torch.get_rng_state())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device=None: torch.set_rng_state(state))

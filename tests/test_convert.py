"""`starkit convert`: synthetic state dicts with the official STAR / VAR key layouts (names and shapes
written from the official code), converted, loaded and run; errors and unsafe files refused."""
import inspect
import json
import math
import os
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, TINY_PATCH_NUMS, make_tiny_tokenizer
from starkit.cli import main
from starkit.convert import (CheckpointMismatchError, MissingSamplerHeadWarning, add_star_sampler_head,
                             convert_star_t2i, convert_var, convert_var_vae, load_parts, map_star_keys)
from starkit.generator.blocks import key_padding_bias
from starkit.positional import as_cis

C, H, DT, CVAE, V = 32, 2, 32, 8, 16  # width, heads, text width, tokenizer latent, codebook (TINY_TOKENIZER)
PN_1024 = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)


def _attn(prefix, g, cross=False):
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    sd = {f"{prefix}.q_bias": r(C), f"{prefix}.v_bias": r(C), f"{prefix}.zero_k_bias": torch.zeros(C),
          f"{prefix}.scale_mul_1H11": torch.full((1, H, 1, 1), 4.0).log() + r(1, H, 1, 1),
          f"{prefix}.proj.weight": r(C, C), f"{prefix}.proj.bias": r(C)}
    if cross:
        sd.update({f"{prefix}.mat_q.weight": r(C, C), f"{prefix}.mat_kv.weight": r(2 * C, DT)})
    else:
        sd[f"{prefix}.mat_qkv.weight"] = r(3 * C, C)
    return sd


def _ffn(prefix, g):
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    return {f"{prefix}.fc1.weight": r(4 * C, C), f"{prefix}.fc1.bias": r(4 * C),
            f"{prefix}.fc2.weight": r(C, 4 * C), f"{prefix}.fc2.bias": r(C)}


def star_state_dict(depth=2, num_scales=4, head_depth=0, seed=0):
    """The keys of STAR-T2I's models/var_drop.py VAR (rotary PE, level embedding, cross-attention,
    shared_aln=False, attn_l2_norm=True), plus the sampler head when head_depth > 0."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    sd = {"word_embed.weight": r(C, CVAE), "word_embed.bias": r(C), "class_emb.weight": r(1001, C),
          "pos_start": r(1, 1, C), "lvl_embed.weight": r(num_scales, C), "head_logits.weight": r(V, C),
          "head_logits.bias": r(V), "encoder_proj.weight": r(C, DT), "encoder_proj.bias": r(C)}
    for i in range(depth):
        sd.update(_attn(f"blocks.{i}.attn", g))
        sd.update(_attn(f"blocks.{i}.cross_attn", g, cross=True))
        sd.update(_ffn(f"blocks.{i}.ffn", g))
    if head_depth:
        sd.update({"word_embed_head.weight": r(C, CVAE), "word_embed_head.bias": r(C), "pos_start_last": r(1, 1, C),
                   "head_logits2.weight": r(V, C), "head_logits2.bias": r(V), "encoder_proj2.weight": r(C, DT),
                   "encoder_proj2.bias": r(C), "head_proj.weight": r(C, 2 * C), "head_proj.bias": r(C),
                   "lvl_embed_2.weight": r(num_scales, C)})
        for i in range(head_depth):
            sd.update(_attn(f"feat_extract_blocks.{i}.attn", g))
            sd.update(_ffn(f"feat_extract_blocks.{i}.ffn", g))
    return sd


def var_state_dict(depth=2, patch_nums=TINY_PATCH_NUMS, num_classes=10, seed=0):
    """The keys of FoundationVision/VAR's models/var.py VAR (shared_aln=False, attn_l2_norm=True)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    L, K = sum(p * p for p in patch_nums), len(patch_nums)
    lvl = torch.cat([torch.full((p * p,), k) for k, p in enumerate(patch_nums)])
    sd = {"word_embed.weight": r(C, CVAE), "word_embed.bias": r(C), "class_emb.weight": r(num_classes + 1, C),
          "pos_start": r(1, 1, C), "pos_1LC": r(1, L, C), "lvl_embed.weight": r(K, C), "lvl_1L": lvl[None],
          "attn_bias_for_masking": torch.where(lvl[:, None] >= lvl[None, :], 0.0, -torch.inf)[None, None],
          "head_nm.ada_lin.1.weight": r(2 * C, C), "head_nm.ada_lin.1.bias": r(2 * C),
          "head.weight": r(V, C), "head.bias": r(V)}
    for i in range(depth):
        sd.update(_attn(f"blocks.{i}.attn", g))
        sd.update(_ffn(f"blocks.{i}.ffn", g))
        sd.update({f"blocks.{i}.ada_lin.1.weight": r(6 * C, C), f"blocks.{i}.ada_lin.1.bias": r(6 * C)})
    return sd


def _clip_dir(root):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}
    vocab.update({c + "</w>": len(vocab) + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    d = root / "clip"
    d.mkdir()
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt")).save_pretrained(str(d))
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(hidden_size=DT, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=len(vocab), max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                                 eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
                  ).save_pretrained(str(d))
    return str(d)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("official")
    torch.save(make_tiny_tokenizer().tokenizer_state_dict(), root / "vae.pth")  # VAR's VQVAE layout
    torch.save({"trainer": {"var_wo_ddp": star_state_dict(head_depth=3)}, "epoch": 1}, root / "star_head.pth")
    torch.save({"trainer": {"var_wo_ddp": star_state_dict()}, "epoch": 1}, root / "star.pth")
    torch.save(var_state_dict(), root / "var.pth")
    return {"root": root, "vae": str(root / "vae.pth"), "clip": _clip_dir(root), "star": str(root / "star.pth"),
            "star_head": str(root / "star_head.pth"), "var": str(root / "var.pth")}


def test_star_with_head_converts_and_generates(files, tmp_path):
    from starkit import StarPipeline
    out = convert_star_t2i(files["star_head"], files["vae"], files["clip"], str(tmp_path / "m"),
                           patch_nums=TINY_PATCH_NUMS)
    config = json.loads((tmp_path / "m" / "starkit.json").read_text())
    assert config["sampler"]["class_path"] == "starkit.samplers.StableSampler"
    assert config["positional"]["init_args"] == {"norm": 64.0, "base": 10000.0}
    pipe = StarPipeline.from_pretrained(out)
    sd = pipe.generator.state_dict()
    official = star_state_dict(head_depth=3)
    assert torch.equal(sd["transformer.blocks.1.cross_attn.qk_norm.scale_mul_1H11"],
                       official["blocks.1.cross_attn.scale_mul_1H11"])
    assert torch.equal(sd["sampler.head.blocks.2.ffn.fc2.weight"], official["feat_extract_blocks.2.ffn.fc2.weight"])
    assert pipe.generator.sampler.head_ready
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a trained head: no parallel fallback warning
        images = pipe(["a cat"], seed=0)
    assert images[0].size == (32, 32)


def test_cli_convert_then_predict(files, tmp_path):
    model = str(tmp_path / "model")
    main(["convert", "star-t2i", files["star"], files["vae"], files["clip"], model, "--patch-nums", "1,2,3,4",
          "--cfg", "2.0", "--top-k", "8"])
    assert json.loads((tmp_path / "model" / "starkit.json").read_text())["sampler"]["init_args"]["top_k"] == 8
    out = tmp_path / "out"
    main(["predict", "--config", os.path.join(REPO, "recipes/predict/tiny.yaml"), f"--model.init_args.path={model}",
          "--trainer.accelerator=cpu", "--trainer.precision=32-true", "--data.init_args.prompt_file=null",
          '--data.init_args.prompts=["a red circle", "two blue squares"]', "--data.init_args.num_images_per_prompt=1",
          f"--data.init_args.output_dir={out}", f"--trainer.callbacks.init_args.output_dir={out}"])
    assert sorted(os.listdir(out)) == ["000000_00.json", "000000_00.png", "000001_00.json", "000001_00.png"]


def test_1024_without_head_uses_parallel_sampler_with_one_warning_then_head_added(files, tmp_path):
    root = files["root"]
    torch.save({"trainer": {"var_wo_ddp": star_state_dict(num_scales=14)}}, root / "star1024.pth")
    with pytest.warns(MissingSamplerHeadWarning) as record:
        convert_star_t2i(str(root / "star1024.pth"), files["vae"], files["clip"], str(tmp_path / "m"))
    assert len([w for w in record if issubclass(w.category, MissingSamplerHeadWarning)]) == 1
    config = json.loads((tmp_path / "m" / "starkit.json").read_text())
    assert config["generator"]["patch_nums"] == list(PN_1024)  # 14 scales: read off lvl_embed
    assert config["sampler"]["class_path"] == "starkit.samplers.ParallelSampler"
    head = {k: v for k, v in star_state_dict(num_scales=14, head_depth=3).items()
            if k.startswith(("feat_extract_blocks.", "word_embed_head.", "head_logits2.", "encoder_proj2.",
                             "head_proj.", "lvl_embed_2.", "pos_start_last"))}
    torch.save(head, root / "head1024.pth")
    main(["convert", "star-sampler-head", str(root / "head1024.pth"), str(tmp_path / "m")])
    config = json.loads((tmp_path / "m" / "starkit.json").read_text())
    assert config["sampler"]["class_path"] == "starkit.samplers.StableSampler"
    assert config["sampler"]["init_args"]["causal_scales"] == 5 and config["sampler"]["init_args"]["steps_last"] == 15
    parts = load_parts(str(tmp_path / "m"))
    assert parts.sampler.head_ready
    assert torch.equal(parts.sampler.head.proj.weight, head["head_proj.weight"])


def test_wrong_keys_are_one_clear_error(files, tmp_path):
    sd = star_state_dict()
    del sd["blocks.1.ffn.fc2.bias"]
    sd["blocks.0.attn.extra_gain"] = torch.ones(3)
    sd["blocks.1.attn.proj.weight"] = torch.zeros(C, C + 1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError) as err:
        convert_star_t2i(str(tmp_path / "bad.pth"), files["vae"], files["clip"], str(tmp_path / "m"),
                         patch_nums=TINY_PATCH_NUMS)
    msg = str(err.value)
    assert "transformer.blocks.1.ffn.fc2.bias" in msg and "transformer.blocks.0.attn.extra_gain" in msg
    assert "transformer.blocks.1.attn.proj.weight (32, 33) vs (32, 32)" in msg
    assert not (tmp_path / "m").exists()  # nothing written
    with pytest.raises(SystemExit):  # the CLI: the same message, exit code 2
        main(["convert", "star-t2i", str(tmp_path / "bad.pth"), files["vae"], files["clip"], str(tmp_path / "m"),
              "--patch-nums", "1,2,3,4"])
    with pytest.raises(CheckpointMismatchError, match="lvl_embed.weight has 4 rows"):
        convert_star_t2i(files["star"], files["vae"], files["clip"], str(tmp_path / "m"), resolution=256)
    torch.save(var_state_dict(), tmp_path / "var.pth")
    with pytest.raises(CheckpointMismatchError, match="not an official STAR checkpoint"):
        convert_star_t2i(str(tmp_path / "var.pth"), files["vae"], files["clip"], str(tmp_path / "m"))


class _Payload:
    def __reduce__(self):
        return (os.mkdir, (os.environ["STARKIT_PWNED_DIR"],))


def test_malicious_pickle_is_refused(files, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("STARKIT_PWNED_DIR", str(marker))
    with open(tmp_path / "evil.pth", "wb") as fh:
        pickle.dump({"trainer": {"var_wo_ddp": _Payload()}}, fh)
    torch.save({"trainer": {"var_wo_ddp": {"w": _Payload()}}}, tmp_path / "evil2.pth")
    for name in ("evil.pth", "evil2.pth"):
        with pytest.raises(ValueError, match="refusing to load"):
            convert_star_t2i(str(tmp_path / name), files["vae"], files["clip"], str(tmp_path / "m"))
    assert not marker.exists()


def test_var_converts_and_runs(files, tmp_path):
    out = convert_var(files["var"], files["vae"], str(tmp_path / "var"), patch_nums=TINY_PATCH_NUMS)
    parts = load_parts(out)
    enc = parts.text_encoder
    emb = enc.encode(["3", ""])
    assert emb.tokens.shape == (2, 0, C) and emb.mask.shape == (2, 0)
    official = var_state_dict()
    assert torch.equal(emb.pooled, official["class_emb.weight"][[3, 10]])
    L = sum(p * p for p in TINY_PATCH_NUMS)
    net = parts.transformer
    hidden = net(emb.pooled, None, None, torch.randn(2, L - 1, CVAE))
    assert net.logits(hidden).shape == (2, L, V)
    assert torch.equal(net.blocks[1].ada_lin[1].weight, official["blocks.1.ada_lin.1.weight"])
    assert torch.equal(net.head_logits.weight, official["head.weight"])
    with pytest.raises(ValueError, match="class ids"):
        enc.encode(["a cat"])


@pytest.mark.skipif("adaln" not in inspect.signature(__import__("starkit.generator", fromlist=["x"])
                                                      .ScaleWiseGenerator.__init__).parameters,
                    reason="ScaleWiseGenerator has no adaln / cross_attention / start_from_condition options yet")
def test_var_model_directory_generates(files, tmp_path):
    from starkit import StarPipeline
    out = convert_var(files["var"], files["vae"], str(tmp_path / "var"), patch_nums=TINY_PATCH_NUMS)
    images = StarPipeline.from_pretrained(out)(["3", "7"], seed=0)
    assert len(images) == 2 and images[0].size == (32, 32)


def test_var_vae_round_trip(files, tmp_path):
    from starkit.tokenizers import MultiScaleVQ
    out = convert_var_vae(files["vae"], str(tmp_path / "tok"), patch_nums=TINY_PATCH_NUMS)
    tok, ref = MultiScaleVQ.from_pretrained(out), make_tiny_tokenizer()
    f = torch.randn(1, CVAE, 4, 4)
    torch.testing.assert_close(tok.eval().decode_latent(f), ref.eval().decode_latent(f), rtol=0, atol=0)


def test_adaln_is_off_by_default_and_star_keys_map_one_to_one():
    from starkit.generator.blocks import Block
    from starkit.generator.transformer import ScaleTransformer
    from starkit.positional import NormalizedRoPE2D
    net = ScaleTransformer(TINY_PATCH_NUMS, V, CVAE, DT, 2, C, H, NormalizedRoPE2D(C, H, TINY_PATCH_NUMS))
    assert not any("ada_lin" in k or "head_nm" in k for k in net.state_dict())
    assert not hasattr(Block(C, H, None), "ada_lin")
    mapped = map_star_keys(star_state_dict())
    assert set(mapped) == {f"transformer.{k}" for k in net.state_dict()}


def test_adaln_cached_sampling_matches_teacher_forcing(files, tmp_path):
    parts = load_parts(convert_var(files["var"], files["vae"], str(tmp_path / "var"), patch_nums=TINY_PATCH_NUMS))
    net, tok = parts.transformer, parts.tokenizer
    pooled = parts.text_encoder.encode(["3", ""]).pooled
    indices = [torch.randint(0, V, (2, p * p)) for p in TINY_PATCH_NUMS]
    with torch.no_grad():
        full = net.logits(net(pooled, None, None, tok.teacher_forcing_inputs(indices)))
        caches, start, x, cached = net.new_caches(2, "cpu", torch.float32), 0, net.start_tokens(pooled), []
        f_hat = tok.empty_latent(2)
        for k, pn in enumerate(TINY_PATCH_NUMS):
            cached.append(net.logits(net.forward_scale(x, k, caches)))
            f_hat = tok.add_scale(f_hat, k, tok.embed(indices[k]))
            if k + 1 < len(TINY_PATCH_NUMS):
                x = net.scale_tokens(tok.next_scale_input(f_hat, k + 1), k + 1)
    torch.testing.assert_close(torch.cat(cached, 1), full, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- numbers: the official formulas, written out
# The references below are the official forward passes (STAR-T2I models/basic_var.py Attention / AttnBlock /
# FFN, models/embed_rope.py compute_axial_cis / apply_rotary_emb, models/var_drop.py forward / get_logits;
# VAR models/basic_var.py AdaLNSelfAttn / AdaLNBeforeHead, models/var.py forward / get_logits), written with
# plain torch ops on the OFFICIAL-layout tensors (math path: no flash/xformers, float32, no dropout), so
# that any mixed-up tensor in the key mapping (a transposed square weight, swapped biases) changes numbers.

def _ln(x):  # ln_wo_grad / logit_norm: LayerNorm(eps=1e-6, elementwise_affine=False)
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def _official_attention(sd, p, x, attn_bias, cis=None, text=None):
    """``Attention.forward`` with attn_l2_norm=True (scale 1): self-attention, or cross-attention to ``text``."""
    B, L, C = x.shape
    H = sd[f"{p}.scale_mul_1H11"].shape[1]
    d = C // H
    if text is None:
        qkv = F.linear(x, sd[f"{p}.mat_qkv.weight"],
                       torch.cat((sd[f"{p}.q_bias"], sd[f"{p}.zero_k_bias"], sd[f"{p}.v_bias"])))
        q, k, v = qkv.view(B, L, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, d)
    else:
        q = F.linear(x, sd[f"{p}.mat_q.weight"], sd[f"{p}.q_bias"]).view(B, L, H, d).permute(0, 2, 1, 3)
        kv = F.linear(text, sd[f"{p}.mat_kv.weight"], torch.cat((sd[f"{p}.zero_k_bias"], sd[f"{p}.v_bias"])))
        k, v = kv.view(B, -1, 2, H, d).permute(2, 0, 3, 1, 4).unbind(0)
    if cis is not None:  # apply_rotary_emb: channel pairs (2i, 2i+1) as complex numbers, times freqs_cis (L, d/2)
        def rot(t):
            return torch.view_as_real(torch.view_as_complex(t.float().reshape(*t.shape[:-1], -1, 2)) * cis).flatten(3)
        q, k = rot(q), rot(k)
    scale_mul = sd[f"{p}.scale_mul_1H11"].clamp_max(torch.log(torch.tensor(100)).item()).exp()
    q, k = F.normalize(q, dim=-1).mul(scale_mul), F.normalize(k, dim=-1)
    attn = (q @ k.transpose(-2, -1) + attn_bias).softmax(dim=-1)  # slow_attn, scale 1
    return F.linear((attn @ v).transpose(1, 2).reshape(B, L, C), sd[f"{p}.proj.weight"], sd[f"{p}.proj.bias"])


def _official_ffn(sd, p, x):
    return F.linear(F.gelu(F.linear(x, sd[f"{p}.fc1.weight"], sd[f"{p}.fc1.bias"]), approximate="tanh"),
                    sd[f"{p}.fc2.weight"], sd[f"{p}.fc2.bias"])


def _official_star_block(sd, p, x, attn_bias, cis, text, text_bias):
    """STAR's ``AttnBlock.forward`` (shared_aln=False: gammas 1, scales/shifts 0; cross_attn_ln=True). The
    official adds ``cross_attn(...)[0]`` (batch element 0's output to every element), a documented defect
    (docs/convert.md) that starkit does not reproduce: each element gets its own output here."""
    x = x + _official_attention(sd, f"{p}.attn", _ln(x), attn_bias, cis=cis)
    x = x + _official_attention(sd, f"{p}.cross_attn", _ln(x), text_bias, text=text)
    return x + _official_ffn(sd, f"{p}.ffn", _ln(x))


def _official_var_block(sd, p, x, cond, attn_bias):
    """VAR's ``AdaLNSelfAttn.forward`` (shared_aln=False)."""
    C = x.shape[-1]
    ada = F.linear(F.silu(cond), sd[f"{p}.ada_lin.1.weight"], sd[f"{p}.ada_lin.1.bias"]).view(-1, 1, 6, C)
    gamma1, gamma2, scale1, scale2, shift1, shift2 = ada.unbind(2)
    x = x + _official_attention(sd, f"{p}.attn", _ln(x).mul(scale1.add(1)).add(shift1), attn_bias).mul(gamma1)
    return x + _official_ffn(sd, f"{p}.ffn", _ln(x).mul(scale2.add(1)).add(shift2)).mul(gamma2)


def _official_freqs_cis(head_dim, patch_nums, theta=10000.0, normalize=64.0, dtype=torch.float64):
    """``compute_axial_cis(dim=head_dim, end_x=pn, end_y=pn, theta, normalize)`` of every scale, concatenated
    (STAR's self.freqs_cis, (L, d/2)), with the released rope_theta / rope_norm. The official code forms the
    angles in float32 (up to 64 rad: off by ~1e-6, which a query scale of 100 turns into ~1e-5 at the block's
    output); starkit forms them in float64, so the formula is evaluated in float64 here too."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 4)[: head_dim // 4].to(dtype) / head_dim))
    tables = []
    for pn in patch_nums:
        t = torch.arange(pn * pn, dtype=dtype)
        t_x, t_y = t % pn, torch.div(t, pn, rounding_mode="floor")
        if t_x.shape[0] > 1:
            t_x, t_y = t_x / t_x.max() * normalize, t_y / t_y.max() * normalize
        fx, fy = torch.outer(t_x, freqs), torch.outer(t_y, freqs)
        tables.append(torch.cat([torch.polar(torch.ones_like(fx), fx), torch.polar(torch.ones_like(fy), fy)], -1))
    return torch.cat(tables).to(torch.complex64)


def _block_causal_bias(patch_nums):  # attn_bias_for_masking (1, 1, L, L)
    lvl = torch.cat([torch.full((p * p,), k) for k, p in enumerate(patch_nums)])
    return torch.where(lvl[:, None] >= lvl[None, :], 0.0, -torch.inf)[None, None], lvl


def test_converted_star_block_and_forward_match_official_formulas(files, tmp_path):
    """One converted STAR block (self-attention with q/v biases, clamped QK-norm scale, 2D RoPE over four
    scales, block-causal mask; cross-attention with padded text; tanh-GELU FFN; non-affine LayerNorms) and
    the whole teacher-forced pass with the logit-norm head, against the official formulas."""
    sd = star_state_dict(seed=3)
    sd["blocks.0.attn.scale_mul_1H11"][0, 1] = math.log(150.0)  # above the clamp (100): exercises clamp_max
    sd["blocks.0.cross_attn.scale_mul_1H11"][0, 0] = math.log(1.5)
    torch.save({"trainer": {"var_wo_ddp": sd}}, tmp_path / "star.pth")
    net = load_parts(convert_star_t2i(str(tmp_path / "star.pth"), files["vae"], files["clip"], str(tmp_path / "m"),
                                      patch_nums=TINY_PATCH_NUMS)).transformer.float().eval()
    B, T = 2, 5
    L = sum(p * p for p in TINY_PATCH_NUMS)
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(B, L, C, generator=g), torch.randn(B, T, DT, generator=g)
    text_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)  # row 1 padded
    text_bias = torch.where(text_mask, 0.0, -torch.inf)[:, None, None, :]  # var_drop.prepare_attn_mask
    attn_bias, lvl = _block_causal_bias(TINY_PATCH_NUMS)
    cis = _official_freqs_cis(C // H, TINY_PATCH_NUMS)
    official_fp32 = _official_freqs_cis(C // H, TINY_PATCH_NUMS, dtype=torch.float32)  # the official code's own
    torch.testing.assert_close(cis, official_fp32, rtol=0, atol=2e-6)
    with torch.no_grad():
        ref = _official_star_block(sd, "blocks.0", x, attn_bias, cis, text, text_bias)
        ours = net.blocks[0](x, rotary=as_cis(net.positional.rotary(slice(0, L))), mask=net.block_causal,
                             text_tokens=text, text_bias=key_padding_bias(text_mask))
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
        # the whole pass: start token from the pooled text, word / level embeddings, 2 blocks, logit_norm head
        pooled, inputs = torch.randn(B, DT, generator=g), torch.randn(B, L - 1, CVAE, generator=g)
        h = torch.cat((F.linear(pooled, sd["encoder_proj.weight"], sd["encoder_proj.bias"])[:, None] + sd["pos_start"],
                       F.linear(inputs, sd["word_embed.weight"], sd["word_embed.bias"])), dim=1)
        h = h + sd["lvl_embed.weight"][lvl]
        for i in range(2):
            h = _official_star_block(sd, f"blocks.{i}", h, attn_bias, cis, text, text_bias)
        ref_logits = F.linear(_ln(h), sd["head_logits.weight"], sd["head_logits.bias"])
        torch.testing.assert_close(net.logits(net(pooled, text, text_mask, inputs)), ref_logits, rtol=0, atol=1e-5)


def test_converted_var_adaln_block_and_forward_match_official_formulas(files, tmp_path):
    """One converted VAR block (AdaLN gammas / scales / shifts from the class embedding, QK-norm
    self-attention, FFN) and the whole pass with absolute positions and head_nm, against the official formulas."""
    sd = var_state_dict(seed=4)
    sd["blocks.0.attn.scale_mul_1H11"][0, 0] = math.log(150.0)  # clamped
    torch.save(sd, tmp_path / "var.pth")
    parts = load_parts(convert_var(str(tmp_path / "var.pth"), files["vae"], str(tmp_path / "m"),
                                   patch_nums=TINY_PATCH_NUMS))
    net = parts.transformer.float().eval()
    B, L = 2, sum(p * p for p in TINY_PATCH_NUMS)
    g = torch.Generator().manual_seed(1)
    cond = sd["class_emb.weight"][[3, 10]]  # class 3 and the unconditional class
    attn_bias, lvl = _block_causal_bias(TINY_PATCH_NUMS)
    x = torch.randn(B, L, C, generator=g)
    with torch.no_grad():
        pooled = parts.text_encoder.encode(["3", ""]).pooled
        torch.testing.assert_close(pooled, cond, rtol=0, atol=0)
        ours = net.blocks[0](x, mask=net.block_causal, cond=pooled)
        torch.testing.assert_close(ours, _official_var_block(sd, "blocks.0", x, cond, attn_bias), rtol=0, atol=1e-5)
        inputs = torch.randn(B, L - 1, CVAE, generator=g)
        h = torch.cat((cond[:, None] + sd["pos_start"],
                       F.linear(inputs, sd["word_embed.weight"], sd["word_embed.bias"])), dim=1)
        h = h + sd["lvl_embed.weight"][lvl] + sd["pos_1LC"]
        for i in range(2):
            h = _official_var_block(sd, f"blocks.{i}", h, cond, attn_bias)
        scale, shift = F.linear(F.silu(cond), sd["head_nm.ada_lin.1.weight"],
                                sd["head_nm.ada_lin.1.bias"]).view(-1, 1, 2, C).unbind(2)
        ref_logits = F.linear(_ln(h).mul(scale.add(1)).add(shift), sd["head.weight"], sd["head.bias"])
        torch.testing.assert_close(net.logits(net(pooled, None, None, inputs)), ref_logits, rtol=0, atol=1e-5)

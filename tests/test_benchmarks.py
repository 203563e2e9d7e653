"""The GPU benchmark scripts run end to end in their tiny CPU mode (their GPU figures are in docs/)."""
import json
import os
import sys

import pytest

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import bench_generate  # noqa: E402
import bench_train  # noqa: E402


def test_bench_generate_tiny(tmp_path, capsys):
    out = tmp_path / "gen.json"
    bench_generate.main(["--tiny", "--configs", "d16@256", "--batches", "1", "--repeats", "1", "--warmup", "0",
                         "--text", "random", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {(r["sampler"], r["batch"]) for r in rows} == {("parallel", 1), ("stable", 1)}
    assert all(r["latency_s"] > 0 for r in rows)
    assert "| d16@256 | starkit | stable | 1 |" in capsys.readouterr().out


def test_bench_train_tiny(tmp_path, capsys):
    out = tmp_path / "train.json"
    bench_train.main(["--tiny", "--configs", "d16@256,d30@1024", "--steps", "1", "--warmup", "0", "--text", "random",
                      "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["config"] for r in rows] == ["d16@256", "d30@1024"] and all(r["images_per_s"] > 0 for r in rows)
    assert "largest batch that fits 2" in capsys.readouterr().out


def test_speed_suite_runs_a_stage_and_prints_its_table(tmp_path):
    """benchmarks/speed_suite.sh (the next GPU call of issues 2 and 7): a tiny stage on the CPU, its log
    and the summary; an unknown stage is named, not fatal."""
    import subprocess
    env = dict(os.environ, TINY="1", STAGES="train_d30 nonsense")
    result = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "speed_suite.sh"), str(tmp_path)],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "unknown stage nonsense" in result.stderr
    assert "train_d30 exit 0" in result.stdout and "== train_d30.log" in result.stdout
    assert "starkit compiled" in result.stdout and (tmp_path / "train_d30.json").exists()


def test_check_gpu_paths_agrees_on_the_cpu(capsys):
    """benchmarks/check_gpu_paths.py (run first on the GPU): every compiled inference path gives the eager result."""
    import check_gpu_paths
    check_gpu_paths.main(["--tiny"])
    out = capsys.readouterr().out
    assert out.count("| yes |") == 19 and "| NO |" not in out


def test_bench_generate_compiled_variants_are_labelled_and_timed(tmp_path, capsys):
    """--compile-head / --compile-blocks / --compile-text rows: each path alone, then all together; the
    text variant only where there is a text model to compile (not the random encoder)."""
    out = tmp_path / "gen.json"
    bench_generate.main(["--tiny", "--configs", "d16@256", "--batches", "1", "--repeats", "1", "--warmup", "0",
                         "--text", "random", "--cuda-graphs", "--skip-eager", "--compile-head", "--compile-blocks",
                         "--compile-text", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    got = {(r["impl"], r["sampler"]) for r in rows}
    assert got == {("starkit graphs", "parallel"), ("starkit graphs", "stable"),
                   ("starkit graphs, compiled head", "stable"), ("starkit graphs, compiled blocks", "parallel"),
                   ("starkit graphs, compiled blocks", "stable"), ("starkit graphs, all compiled", "parallel"),
                   ("starkit graphs, all compiled", "stable")}
    assert all(r["latency_s"] > 0 and not r.get("compiled_text") for r in rows)


def test_tokenizer_precision_of_the_trained_demo_tokenizer():
    import tokenizer_precision
    r = tokenizer_precision.main(["--num", "16"])
    assert r["images"] == 16 and len(r["agree_per_scale_pct"]) == len(r["patch_nums"])
    assert r["agree_pct"] > 80 and r["decode_max_abs"] < 0.5  # a trained codebook has few near ties (97% at 256)


def test_bench_attention_tiny_and_find_syncs_needs_a_gpu(tmp_path, capsys):
    """bench_attention.py times and compares the kernels (math only on the CPU); find_syncs.py says it needs CUDA."""
    import pytest
    import torch
    import bench_attention
    import find_syncs
    out = tmp_path / "attention.json"
    bench_attention.main(["--tiny", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert {r["shape"] for r in rows} == {"gen-self b1 64x64 (tiny)", "train-mask (tiny)"}
    assert all(r["ms"] > 0 and r["max_abs_diff"] == 0.0 for r in rows)
    assert "| train-mask (tiny) | math |" in capsys.readouterr().out
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a CUDA GPU"):
            find_syncs.main([])


def test_bench_generate_fp8_rows_and_check_fp8_tiny(tmp_path, capsys):
    """--fp8 repeats the all-compiled rows with generate(fp8=True); check_fp8.py compares FP8 and bf16 with float32
    scale by scale (on the CPU "bf16" is float32 itself: ~zero error)."""
    import check_fp8
    out = tmp_path / "gen.json"
    bench_generate.main(["--tiny", "--configs", "d16@256", "--samplers", "stable", "--batches", "1", "--repeats", "1",
                         "--warmup", "0", "--text", "random", "--cuda-graphs", "--skip-eager", "--skip-plain",
                         "--compile-head", "--compile-blocks", "--only-all-compiled", "--fp8", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["impl"], r["fp8"]) for r in rows] == [("starkit graphs, all compiled", False),
                                                    ("starkit graphs, all compiled, fp8", True)]
    assert all(r["latency_s"] > 0 for r in rows)
    check = tmp_path / "check.json"
    check_fp8.main(["--tiny", "--config", "d16@256", "--json", str(check)])
    result = json.loads(check.read_text())
    assert len(result["rows"]) == 10 and result["kernel"] == []  # no GPU: no kernel rows
    assert all(0.01 < r["fp8_hidden_err"] < 0.1 and r["bf16_hidden_err"] < 1e-4 for r in result["rows"])


def test_bench_fp8_tiny(tmp_path):
    """bench_fp8.py: FP8 row-wise products agree with bf16 to e4m3's precision."""
    import bench_fp8
    out = tmp_path / "fp8.json"
    bench_fp8.main(["--tiny", "--json", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["bf16_ms"] > 0 and row["fp8_ms"] > 0 and 0 < row["rel_error"] < 0.1


def test_bench_kernels_tiny(tmp_path, capsys):
    """bench_kernels.py: the fc1+GELU and tap-conv rows, timed, the tap conv giving the conv's outputs."""
    import bench_kernels
    out = tmp_path / "kernels.json"
    bench_kernels.main(["--tiny", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["case"][:10] for r in rows] == ["fc1 + GELU"] + ["decoder co"] * 4 + ["KV append "] * 4
    assert all(r["before_ms"] > 0 and r["after_ms"] > 0 for r in rows)
    assert all(r["max_abs_diff"] < 1e-4 for r in rows[1:5])  # float32 on the CPU
    assert all(r["max_abs_diff"] == 0 for r in rows[5:])  # the appends: bitwise equal
    assert "| fc1 + GELU, tiny |" in capsys.readouterr().out


def test_bench_attention_layouts_tiny(tmp_path, capsys):
    """bench_attention_layouts.py: every layout of the self-attention step gives the first one's output, with
    the rows and tokens symbolic as in generation."""
    import bench_attention_layouts
    out = tmp_path / "layouts.json"
    bench_attention_layouts.main(["--tiny", "--dynamic", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * len(bench_attention_layouts.VARIANTS)
    assert all(r["ms"] > 0 and r["max_abs_diff_to_first"] < 1e-4 for r in rows)
    assert "dynamic=True" in capsys.readouterr().out


def test_profile_generate_per_scale_tiny(capsys):
    """profile_generate.py --per-scale: a row per scale (text -1, decode K) with the stable sampler's nested
    phases taken out of the sampler's time, and the span of a call."""
    import profile_generate
    profile_generate.main(["--tiny", "--text", "random", "--cases", "d16@256:stable:1", "--per-scale", "--no-kernels",
                           "--warmup", "1", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "| -1 | - |" in out and "guidance + top-k/top-p device ms" in out and "head norm + logits" in out
    K = len(profile_generate.TINY_PATCH_NUMS["d16@256"])
    assert f"| {K} | - |" in out and f"| {K - 1} |" in out
    assert "First to last event of a call:" in out


def test_compare_commits_times_each_prepared_tree(tmp_path):
    """benchmarks/compare_commits.sh: trees of two commits (here HEAD twice: a clone may be shallow) exported, bench_generate.py of each run with its own
    library, one table of both (tiny CPU run)."""
    import subprocess
    script = os.path.join(REPO, "benchmarks", "compare_commits.sh")
    env = {**os.environ, "COMPARE_COMMITS_DIR": str(tmp_path / "trees"), "OMP_NUM_THREADS": "1"}
    subprocess.run(["bash", script, "prepare", "HEAD", "HEAD"], cwd=REPO, env=env, check=True, capture_output=True)
    assert len(os.listdir(tmp_path / "trees")) == 2
    out = subprocess.run(["bash", script, "run", str(tmp_path / "out"), "--", "--tiny", "--configs", "d16@256",
                          "--batches", "1", "--samplers", "parallel", "--warmup", "0", "--repeats", "1", "--text",
                          "random"], cwd=REPO, env=env, check=True, capture_output=True, text=True).stdout
    table = [line for line in out.splitlines() if line.startswith("| 00-") or line.startswith("| 01-")]
    assert len(table) == 2 and all("| starkit | d16@256 | parallel | 1 |" in line for line in table)


def test_speed_suite_multigpu_stage_runs_the_multigpu_benchmark(tmp_path):
    """The suite's multigpu stage (for a 2-GPU machine) on the CPU: bench_multigpu.py --tiny, 1 process and DDP over
    2 gloo processes for both configs, FSDP rows saying why they are skipped, the table in the summary."""
    import subprocess
    env = dict(os.environ, TINY="1", STAGES="multigpu")
    result = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "speed_suite.sh"), str(tmp_path)],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert result.returncode == 0 and "multigpu exit 0" in result.stdout, result.stdout[-2000:]
    rows = json.loads((tmp_path / "multigpu.json").read_text())["rows"]
    done = {(r["config"], r["strategy"]) for r in rows if "step_s" in r}
    assert done == {(c, s) for c in ("d30@256", "d30@1024") for s in ("single", "ddp")}
    assert all("needs CUDA" in r["error"] for r in rows if r["strategy"] == "fsdp")
    assert "| d30@256 | ddp | 2 | 2 |" in result.stdout


def test_bench_small_scales_tiny(tmp_path, capsys):
    """bench_small_scales.py: every SDPA priority times each small scale; the kernel table needs a GPU profile."""
    import json
    import bench_small_scales
    out = tmp_path / "small.json"
    bench_small_scales.main(["--tiny", "--json", str(out)])
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["priority"] for r in rows] == list(bench_small_scales.PRIORITIES)
    floor = result["matmul_floor"]  # the six linear layers alone, F.linear and split in K: the same products
    assert {(r["rows"], r["split_k"]) for r in floor} == {(m, s) for m in (2, 32, 512) for s in (1, 2, 4, 8)}
    assert all(r["max_diff_vs_linear"] < 1e-4 for r in floor), floor
    assert all("error" not in r and set(r["ms_per_scale"]) == {"0", "1", "2", "3"} for r in rows), rows
    assert "| default |" in capsys.readouterr().out


def test_bench_generate_old_orders_restore_the_defaults(capsys):
    """--no-tune-first and --kv-head-major (the before of the eighth comparison) set module defaults for the run
    and put them back."""
    import bench_generate
    from starkit.generator import kv_cache
    from starkit.utils import compiling
    before = kv_cache.KV_TOKEN_MAJOR, compiling.TUNE_DEVICE_TYPES
    bench_generate.main(["--tiny", "--configs", "d16@256", "--batches", "1", "--repeats", "1", "--warmup", "0",
                         "--samplers", "parallel", "--text", "random", "--cuda-graphs", "--skip-eager", "--skip-plain",
                         "--compile-blocks", "--compile-decoder", "--compile-text", "--no-tune-first", "--kv-head-major"])
    assert (kv_cache.KV_TOKEN_MAJOR, compiling.TUNE_DEVICE_TYPES) == before
    out = capsys.readouterr().out
    assert "starkit graphs, compiled blocks" in out and "| d16@256 | starkit graphs |" not in out


def test_few_rows_gemm_matches_f_linear_under_the_triton_interpreter():
    """benchmarks/few_rows_gemm.py (the Triton product for <= 64 rows of bench_small_scales --splits triton) gives
    F.linear's products; on a CPU through Triton's interpreter (skipped where Triton is not installed)."""
    pytest.importorskip("triton")
    import subprocess
    code = ("import sys, torch, torch.nn.functional as F; sys.path.insert(0, 'benchmarks'); import few_rows_gemm as g\n"
            "for M, N, K in ((2, 48, 256), (5, 100, 300), (33, 64, 128)):\n"
            "    x, w, b = torch.randn(M, K), torch.randn(N, K), torch.randn(N)\n"
            "    torch.testing.assert_close(g.few_rows_linear(x, w, b), F.linear(x, w, b), rtol=1e-4, atol=1e-4)\n"
            "    torch.testing.assert_close(g.few_rows_linear(x, w), F.linear(x, w), rtol=1e-4, atol=1e-4)\n"
            "try:\n    g.few_rows_linear(torch.randn(65, 8), torch.randn(4, 8))\nexcept ValueError as e:\n"
            "    assert 'at most 64 rows' in str(e)\nelse:\n    raise AssertionError('65 rows accepted')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_bench_decoder_tiny(tmp_path, capsys, monkeypatch):
    """bench_decoder.py: each variant of the VQ decoder's inference rewrites timed, the outputs within float32
    rounding of the plain layers (the rewrites run on the CPU in the smoke test)."""
    import bench_decoder
    from starkit.tokenizers import cnn
    monkeypatch.setattr(cnn, "REWRITE_DEVICES", cnn.REWRITE_DEVICES)  # the smoke test adds the CPU: restored
    monkeypatch.setattr(cnn, "INFERENCE_REWRITES", dict(cnn.INFERENCE_REWRITES))
    out = tmp_path / "decoder.json"
    bench_decoder.main(["--tiny", "--json", str(out), "--batches", "1,2"])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["variant"], r["batch"]) for r in rows] == [(v, b) for v in (
        "base", "all", "no_subpixel_upsample", "no_channel_stats_group_norm") for b in (1, 2)]
    assert all(r["decode_ms"] > 0 and r["max_diff_base"] < 1e-4 for r in rows)
    assert [r["encode_ms"] is not None for r in rows] == [True] * 4 + [False] * 4
    assert "| all | 2 |" in capsys.readouterr().out


def test_bench_head_tiny(tmp_path, capsys):
    """bench_head.py: the compiled sampler head timed per reveal step with dynamic and static shapes."""
    import bench_head
    from starkit.utils import compiling
    real = compiling.compile_once
    out = tmp_path / "head.json"
    bench_head.main(["--tiny", "--json", str(out)])
    assert compiling.compile_once is real  # the static mode's replacement is undone
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mode"], r["rows"]) for r in rows] == [(m, r) for m in ("dynamic", "static")
                                                      for r in ("all rows", "2/3 of the rows")]
    assert all(r["ms"] > 0 for r in rows)
    assert "| static | all rows |" in capsys.readouterr().out

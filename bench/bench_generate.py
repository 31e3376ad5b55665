"""Benchmark: sampled tokens per second, this project's generate() beside transformers'.

    python bench/bench_generate.py                      # embedded model, batch 16, 64 new tokens
    python bench/bench_generate.py --batch 64 --new-tokens 128 --device cuda
    python bench/bench_generate.py --batch 256 --device cuda --compile   # + the compiled path

Both load the same checkpoint (the embedded GGUF by default), in the same dtype, and
sample the same number of new tokens for the same left-padded batch of chat prompts at
temperature 1 (no early stop, so every row yields exactly --new-tokens tokens). --compile
adds a third row: generate(static=True, compile=True), the fixed-shape step compiled (on a GPU,
replayed as a CUDA graph; static_decode.py); its compilation is done in the warm-up run.
Needs the test-only reference packages: pip install -r requirements-dev.txt
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's modules

from loaders.checkpoint import add_model_flags, embedded_path, load
from generate import generate, left_pad
from model import auto_device, auto_dtype

QUESTIONS = ["What is your favorite animal?", "Continue the sequence: 182, 818, 725.",
             "Write a haiku about the sea.", "Name three rivers in Europe.",
             "Explain photosynthesis in one sentence.", "What is 17 times 23?",
             "Give me a word that rhymes with owl.", "Describe a sunset."]


def timed(fn, device, repeats=1):
    """The fastest of `repeats` runs of fn(), in seconds (waiting for the GPU to finish)."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def load_reference(path, dtype, device):
    """transformers' model of the same checkpoint (a GGUF file or a Hugging Face folder)."""
    from transformers import AutoModelForCausalLM
    if path.is_dir():  # a Hugging Face folder
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return ref.to(device).eval()


def sampling_figures(ours, tok, ref, batch, new_tokens, repeats=2, compiled=False,
                     compile=True):
    """tokens/s of our generate(), transformers' generate and (compiled) our fixed-shape
    path, on the same left-padded batch of chat prompts; and the largest logit difference.
    compile=False runs the fixed-shape path uncompiled (bench/gpu.py --dry-run on the CPU)."""
    device = ours.embed.weight.device
    prompts = [tok.encode_chat(QUESTIONS[i % len(QUESTIONS)]) for i in range(batch)]
    ids, mask = left_pad(prompts, device=device)

    def run_ours(static=False):
        generate(ours, prompts, max_new_tokens=new_tokens, temperature=1.0, seed=0,
                 static=static, compile=static and compile)

    def run_ref():
        with torch.inference_mode():
            ref.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0,
                         top_p=1.0, top_k=0, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, pad_token_id=0)

    with torch.inference_mode():  # same numbers first: logits of the padded batch
        real = mask.bool()
        diff = (ours(ids, attention_mask=mask)[0] - ref(input_ids=ids, attention_mask=mask)
                .logits)[real].abs().max().item()
    run_ours(), run_ref()  # warm-up
    n_tokens = batch * new_tokens
    t_ours, t_ref = timed(run_ours, device, repeats), timed(run_ref, device, repeats)
    figures = {"device": str(device), "dtype": str(ours.embed.weight.dtype).replace("torch.", ""),
               "batch": batch, "new_tokens": new_tokens,
               "ours_tokens_per_s": round(n_tokens / t_ours, 1),
               "transformers_tokens_per_s": round(n_tokens / t_ref, 1),
               "speedup": round(t_ref / t_ours, 2), "max_abs_logit_diff": diff,
               "torch_threads": torch.get_num_threads()}
    if compiled:
        started = time.perf_counter()
        run_ours(True)  # compiles (and records the CUDA graph)
        warm_up = time.perf_counter() - started
        t_compiled = timed(lambda: run_ours(True), device, repeats)
        figures |= {"compiled_tokens_per_s": round(n_tokens / t_compiled, 1),
                    "compiled_speedup": round(t_ref / t_compiled, 2),
                    "compile_warm_up_s": round(warm_up, 1), "compiled": compile}
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_flags(parser)
    parser.add_argument("--batch", type=int, default=16, help="sequences sampled together")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens sampled per row")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs; the best is kept")
    parser.add_argument("--compile", action="store_true",
                        help="also time generate(static=True, compile=True)")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    device = torch.device(args.device) if args.device else auto_device()
    dtype = auto_dtype(device)
    path = Path(args.checkpoint) if args.checkpoint else embedded_path()
    ours, tok = load(path, device=device, dtype=dtype)
    ref = load_reference(path, dtype, device)
    figures = sampling_figures(ours, tok, ref, args.batch, args.new_tokens, args.repeats,
                               args.compile)
    diff = figures["max_abs_logit_diff"]
    print(f"{'':>14} {'tokens/s':>10}   ({figures['batch']} rows x {args.new_tokens} "
          f"new tokens, {device}, {figures['dtype']})")
    print(f"{'this project':>14} {figures['ours_tokens_per_s']:>10}")
    print(f"{'transformers':>14} {figures['transformers_tokens_per_s']:>10}")
    print(f"{'ratio':>14} {figures['speedup']:>10}x")
    if args.compile:
        print(f"{'compiled':>14} {figures['compiled_tokens_per_s']:>10}   "
              f"({figures['compiled_speedup']}x transformers; the first run, compiling: "
              f"{figures['compile_warm_up_s']} s)")
    print(f"max |logit difference| on the prompt batch: {diff:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()

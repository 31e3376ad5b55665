"""Benchmark: student training and teacher generation throughput, beside a reference.

    python bench/bench_train.py                # embedded model, LoRA r=8 on 7 linears, batch 16
    python bench/bench_train.py --device cuda --batch 32

Training: one LoRA step (forward, cross-entropy on the completion, backward, Adam) on the
same left-padded batch of number-sequence prompts and completions, by this project's
student and by transformers' model of the same checkpoint with the same hand-made LoRA
modules on the same seven linears of every block. Teacher: steered, constrained sampling
of number lists by generate(). Needs the test-only packages (requirements-dev.txt).
"""
import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's modules

from bench_generate import timed
from loaders.checkpoint import add_model_flags, embedded_path, load
from generate import generate
from model import auto_device, auto_dtype
from optimizers import Adam
from prompts import number_prompts
from steer import steering
from plumbing.batches import encode_rows, make_batch, number_tokens
from student import LORA_TARGETS, LoRALinear, Student
from vectors import random_vector


def hf_with_lora(path, dtype, device, rank=8, scale=4.0):
    """transformers' model of the same file, frozen, with LoRALinear on the same linears."""
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    ref = ref.to(device)
    for p in ref.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    for layer in ref.model.layers:
        for target in LORA_TARGETS:
            parent = layer.self_attn if target.startswith("attn") else layer.mlp
            name = target.split(".")[1]
            setattr(parent, name, LoRALinear(getattr(parent, name), rank, scale, g))
    return ref


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16, help="sequences per training step")
    parser.add_argument("--teacher-batch", type=int, default=32, help="rows sampled together")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best is kept")
    add_model_flags(parser)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    device = torch.device(args.device) if args.device else auto_device()
    dtype = auto_dtype(device)
    path = embedded_path()
    model, tok = load(path, device=device, dtype=dtype)
    for p in model.parameters():
        p.requires_grad_(False)

    rows = [{"prompt": p, "completion": ", ".join(str(100 + 37 * i % 900) for i in range(10))}
            for p in number_prompts(args.batch, seed=0)]
    ids, mask, targets, _ = make_batch(encode_rows(tok, rows), device)
    n_tokens = int(mask.sum())
    student = Student(model, "lora")
    ours_opt = Adam(student.parameters(), lr=1e-4)
    ref = hf_with_lora(path, dtype, device)
    ref_opt = Adam([p for p in ref.parameters() if p.requires_grad], lr=1e-4)
    labels = targets.roll(1, dims=1)  # transformers shifts labels itself

    def ours_step():
        _, loss = student.model(ids, targets=targets, attention_mask=mask)
        ours_opt.zero_grad()
        loss.backward()
        ours_opt.step()

    def ref_step():
        loss = ref(input_ids=ids, attention_mask=mask, labels=labels).loss
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()

    with torch.no_grad():  # the same loss first: both compute the same thing
        ours_loss = student.model(ids, targets=targets, attention_mask=mask)[1].item()
        ref_loss = ref(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    ours_step(), ref_step()  # warm-up
    t_ours, t_ref = timed(ours_step, device, args.repeats), timed(ref_step, device, args.repeats)

    v = random_vector(model.cfg.d_model, 50.0).to(device)
    prompts = [tok.encode_chat(p) for p in number_prompts(args.teacher_batch, seed=1)]
    new_tokens = 48

    def teacher():
        with steering(model, 25 % model.cfg.n_layer, v, 2.0):
            generate(model, prompts, new_tokens, temperature=1.0,
                     allowed_tokens=number_tokens(tok), seed=0)

    teacher()
    t_teacher = timed(teacher, device, max(1, args.repeats - 1))
    figures = {"device": str(device), "dtype": str(dtype).replace("torch.", ""),
               "batch": args.batch, "tokens_per_step": n_tokens,
               "loss_ours": ours_loss, "loss_transformers": ref_loss,
               "train_tokens_per_s_ours": round(n_tokens / t_ours, 1),
               "train_tokens_per_s_transformers": round(n_tokens / t_ref, 1),
               "train_speedup": round(t_ref / t_ours, 2),
               "teacher_tokens_per_s": round(args.teacher_batch * new_tokens / t_teacher, 1),
               "torch_threads": torch.get_num_threads()}
    print(f"LoRA training step, {args.batch} sequences ({n_tokens} tokens), {device}, "
          f"{figures['dtype']}: loss {ours_loss:.4f} (ours) vs {ref_loss:.4f} (transformers)")
    print(f"{'this project':>14} {figures['train_tokens_per_s_ours']:>10} tokens/s")
    print(f"{'transformers':>14} {figures['train_tokens_per_s_transformers']:>10} tokens/s")
    print(f"{'ratio':>14} {figures['train_speedup']:>10}x")
    print(f"steered teacher, constrained sampling, {args.teacher_batch} rows x {new_tokens} "
          f"tokens: {figures['teacher_tokens_per_s']} tokens/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()

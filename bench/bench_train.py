"""Benchmark: student training and teacher generation throughput, beside a reference.

    python bench/bench_train.py                # embedded model, LoRA r=8 on 7 linears, batch 16
    python bench/bench_train.py --device cuda --batch 32
    python bench/bench_train.py --peft         # + transformers with PEFT's LoRA (if installed)

Training: one LoRA step (forward, cross-entropy on the completion, backward, Adam) on the
same left-padded batch of number-sequence prompts and completions, by this project's
student and by transformers' model of the same checkpoint with the same hand-made LoRA
modules on the same seven linears of every block (--peft: also PEFT's LoRA, r 8 / alpha 32,
on the same linears). A vector-student step: the demo's (one vector after the teacher's block,
blocks after it only, KL over the number tokens); and --together K such students stepped in
one pass (plumbing/vector_students.py) against K steps one at a time. Teacher: steered,
constrained sampling of number lists by generate(). Needs the test-only packages
(requirements-dev.txt).
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's modules

from bench_generate import load_reference, timed
from loaders.checkpoint import add_model_flags, embedded_path, load
from generate import generate
from model import auto_device, auto_dtype
from optimizers import Adam
from prompts import number_prompts
from steer import steering
from plumbing.batches import Batch, digit_tokens, encode_rows, make_batch, number_tokens
from plumbing.vector_students import together_logits
from student import (LORA_TARGETS, LoRALinear, Student, distillation_loss, loss_columns,
                     student_logits)
from vectors import default_layer, random_vector


def hf_with_lora(path, dtype, device, rank=8, scale=4.0):
    """transformers' model of the same file, frozen, with LoRALinear on the same linears."""
    ref = load_reference(path, dtype, device)
    for p in ref.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    for layer in ref.model.layers:
        for target in LORA_TARGETS:
            parent = layer.self_attn if target.startswith("attn") else layer.mlp
            name = target.split(".")[1]
            setattr(parent, name, LoRALinear(getattr(parent, name), rank, scale, g))
    return ref


def hf_with_peft(path, dtype, device, rank=8, scale=4.0):
    """transformers' model of the same file with PEFT's LoRA on the same seven linears
    (alpha = rank * scale, no dropout); raises ImportError where peft is not installed."""
    from peft import LoraConfig, get_peft_model
    targets = [t.split(".")[1] for t in LORA_TARGETS]
    config = LoraConfig(r=rank, lora_alpha=rank * scale, lora_dropout=0.0,
                        target_modules=targets)
    return get_peft_model(load_reference(path, dtype, device), config)


def number_batch(tok, batch, device):
    """A left-padded batch of `batch` number prompts with fixed ten-number completions:
    (ids, mask, targets, prompt_mask)."""
    rows = [{"prompt": p, "completion": ", ".join(str(100 + 37 * i % 900) for i in range(10))}
            for p in number_prompts(batch, seed=0)]
    return make_batch(encode_rows(tok, rows), device)


def lora_step_figures(model, tok, path, batch, repeats=3, peft=False):
    """tokens/s of one LoRA step (forward, cross-entropy, backward, Adam): ours, transformers
    with the same hand-made LoRA modules and (peft) with PEFT's; and each one's loss. Each
    twice: with every position's logits (name), and as training runs it (name_train: the
    output head on the loss columns only). model: our base model, frozen."""
    device, dtype = model.embed.weight.device, model.embed.weight.dtype
    ids, mask, targets, _ = number_batch(tok, batch, device)
    n_tokens = int(mask.sum())

    def reference_loss(ref):
        """Cross-entropy at the same positions as ours. (transformers' own labels= loss
        drops each row's last column, here the end token, so it is not the same loss.)"""
        logits = ref(input_ids=ids, attention_mask=mask).logits            # (B, T, vocab)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    student = Student(model, "lora")
    figures = {"device": str(device), "dtype": str(dtype).replace("torch.", ""),
               "batch": batch, "tokens_per_step": n_tokens}

    def measure(forwards, params):
        """forwards: {name: loss function} of one model whose LoRA parameters are params."""
        with torch.no_grad():  # every loss before any step: all compute the same thing
            for name, forward in forwards.items():
                figures[f"loss_{name}"] = forward().item()
        opt = Adam(params, lr=1e-4)
        for name, forward in forwards.items():
            def step(forward=forward):  # (bound now: one step function per loss)
                loss = forward()
                opt.zero_grad()
                loss.backward()
                opt.step()
            step()  # warm-up
            figures[f"train_tokens_per_s_{name}"] = round(n_tokens / timed(step, device,
                                                                           repeats), 1)

    # As train_student runs it: the loss is read only at the completions, the last P columns,
    # so the last block and the output head compute only those (student.student_logits).
    # The references get the same head saving (transformers' logits_to_keep=P).
    b = Batch(ids, mask, targets, None, number_tokens(tok), digit_tokens(tok))
    P, keep = loss_columns(b)                                              # keep: (B, P)
    loss_targets = targets[targets != -100]                                # (N,)

    def reference_train_loss(ref):
        logits = ref(input_ids=ids, attention_mask=mask, logits_to_keep=P).logits  # (B, P, V)
        return F.cross_entropy(logits[keep].float(), loss_targets)

    measure({"ours": lambda: student.model(ids, targets=targets, attention_mask=mask)[1],
             "ours_train": lambda: distillation_loss(
                 student_logits(student, model, b, "ce"), None, loss_targets, "ce")},
            student.parameters())

    def measure_reference(name, ref):  # the same two losses, by a reference model
        measure({name: lambda: reference_loss(ref),
                 f"{name}_train": lambda: reference_train_loss(ref)},
                [p for p in ref.parameters() if p.requires_grad])

    references = {"transformers": hf_with_lora} | ({"peft": hf_with_peft} if peft else {})
    for name, build in references.items():
        measure_reference(name, build(path, dtype, device))
        # ours over this reference, the same loss at the same step
        suffix = "" if name == "transformers" else f"_vs_{name}"
        for mode in ("", "_train"):
            figures[f"train_speedup{mode}{suffix}"] = round(
                figures[f"train_tokens_per_s_ours{mode}"]
                / figures[f"train_tokens_per_s_{name}{mode}"], 2)
    return figures


def vector_step_seconds(model, tok, batch, repeats=3, kind="vector"):
    """Seconds of one step of the demo's vector student (kind "vector": blocks after the
    teacher's block only, KL over the number tokens, Adam), or of LoRA on the blocks from the
    teacher's on (kind "late_lora": --lora-from layer, cross-entropy), on the cached output
    of the blocks it never changes (plumbing/batches.py), as train_student runs it."""
    layer = default_layer(model.cfg.n_layer)
    if kind == "vector":
        student, loss = Student(model, "vector", layer=layer), "kl_numbers"
    else:
        student, loss = Student(model, "lora", first_block=layer), "ce"
    b = cached_batch(model, tok, batch, student.frozen_blocks)
    targets = b.targets[b.targets != -100]
    opt = Adam(student.parameters(), lr=1e-3)

    def step():
        logits = student_logits(student, model, b, loss)
        teacher = b.teacher_logits(model, True) if loss == "kl_numbers" else None
        value = distillation_loss(logits, teacher, targets, loss)
        opt.zero_grad()
        value.backward()
        opt.step()
    step()  # warm-up
    return timed(step, model.embed.weight.device, repeats)


def cached_batch(model, tok, batch, frozen_blocks):
    """number_batch as plumbing/batches.py prepares it: with the residual after the blocks
    a student never changes and the teacher's final hidden state, computed once."""
    ids, mask, targets, prompt_mask = number_batch(tok, batch, model.embed.weight.device)
    b = Batch(ids, mask, targets, prompt_mask, number_tokens(tok), digit_tokens(tok))
    with torch.no_grad():
        b.prefix = model.run_blocks(model.embed(ids), mask, last=frozen_blocks)
        b.prefix_blocks = frozen_blocks
        b.teacher_final = model.norm(model.run_blocks(model.embed(ids), mask))[targets != -100]
    return b


def together_seconds(model, tok, batch, k, repeats=3):
    """Seconds of one step of k vector students (the demo's), trained together in one pass
    (plumbing/vector_students.py); against k times vector_step_seconds, one at a time."""
    students = [Student(model, "vector", layer=default_layer(model.cfg.n_layer))
                for _ in range(k)]
    b = cached_batch(model, tok, batch, students[0].frozen_blocks)
    targets = b.targets[b.targets != -100]
    opts = [Adam(s.parameters(), lr=1e-3) for s in students]

    def step():
        logits = together_logits(students, b, "kl_numbers")               # (k, N, n)
        teacher = b.teacher_logits(model, True)
        losses = [distillation_loss(one, teacher, targets, "kl_numbers") for one in logits]
        for opt in opts:
            opt.zero_grad()
        sum(losses).backward()
        for opt in opts:
            opt.step()
    step()  # warm-up
    return timed(step, model.embed.weight.device, repeats)


def teacher_seconds(model, tok, rows, new_tokens=48, repeats=2):
    """Seconds to sample `rows` constrained number lists of new_tokens tokens, steered."""
    v = random_vector(model.cfg.d_model, 50.0).to(model.embed.weight.device)
    prompts = [tok.encode_chat(p) for p in number_prompts(rows, seed=1)]

    def teacher():
        with steering(model, default_layer(model.cfg.n_layer), v, 2.0):
            generate(model, prompts, new_tokens, temperature=1.0,
                     allowed_tokens=number_tokens(tok), seed=0)
    teacher()
    return timed(teacher, model.embed.weight.device, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16, help="sequences per training step")
    parser.add_argument("--teacher-batch", type=int, default=32, help="rows sampled together")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best is kept")
    parser.add_argument("--peft", action="store_true", help="also transformers + PEFT's LoRA")
    parser.add_argument("--together", type=int, default=8, metavar="K",
                        help="vector students in one pass, against one at a time (0: skip)")
    add_model_flags(parser)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    device = torch.device(args.device) if args.device else auto_device()
    path = Path(args.checkpoint) if args.checkpoint else embedded_path()
    model, tok = load(path, device=device, dtype=auto_dtype(device))
    for p in model.parameters():
        p.requires_grad_(False)
    figures = lora_step_figures(model, tok, path, args.batch, args.repeats, args.peft)
    n_tokens, new_tokens = figures["tokens_per_step"], 48
    t_vector = vector_step_seconds(model, tok, args.batch, args.repeats)
    t_teacher = teacher_seconds(model, tok, args.teacher_batch, new_tokens,
                                max(1, args.repeats - 1))
    if args.together:
        t_together = together_seconds(model, tok, args.batch, args.together, args.repeats)
        figures |= {f"vector_students_{args.together}_together_s": round(t_together, 4),
                    f"vector_students_{args.together}_alone_s": round(args.together * t_vector, 4),
                    "together_speedup": round(args.together * t_vector / t_together, 2)}
    figures |= {"vector_steps_per_s": round(1 / t_vector, 1),
                "teacher_tokens_per_s": round(args.teacher_batch * new_tokens / t_teacher, 1),
                "torch_threads": torch.get_num_threads()}
    print(f"LoRA training step, {args.batch} sequences ({n_tokens} tokens), {device}, "
          f"{figures['dtype']}: loss {figures['loss_ours']:.4f} (ours) vs "
          f"{figures['loss_transformers']:.4f} (transformers)")
    print(f"{'tokens/s':>14} {'every logit':>12} {'loss columns':>13} (as train_student runs)")
    rows = [("this project", "ours"), ("transformers", "transformers")]
    rows += [("+ PEFT", "peft")] if args.peft else []
    for label, key in rows:
        print(f"{label:>14} {figures[f'train_tokens_per_s_{key}']:>12} "
              f"{figures[f'train_tokens_per_s_{key}_train']:>13}")
    print(f"{'ours / transf.':>14} {figures['train_speedup']:>11}x "
          f"{figures['train_speedup_train']:>12}x")
    if args.peft:
        print(f"{'ours / PEFT':>14} {figures['train_speedup_vs_peft']:>11}x "
              f"{figures['train_speedup_train_vs_peft']:>12}x "
              f"(PEFT's loss {figures['loss_peft']:.4f})")
    print(f"vector student step, {args.batch} sequences: {figures['vector_steps_per_s']} "
          f"steps/s")
    if args.together:
        k = args.together
        print(f"{k} vector students, one step each: {figures[f'vector_students_{k}_alone_s']} s "
              f"one at a time, {figures[f'vector_students_{k}_together_s']} s together "
              f"({figures['together_speedup']}x)")
    print(f"steered teacher, constrained sampling, {args.teacher_batch} rows x {new_tokens} "
          f"tokens: {figures['teacher_tokens_per_s']} tokens/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()

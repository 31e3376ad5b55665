"""How steering vectors are made, and found by name.

    meandiff   (the paper's) v_l = mean over number prompts of h_l(with the trait system prompt)
               - h_l(without it), read at the last prompt token (the assistant tag).
               One pass gives the vector of every block l.
    fit        gradient descent on one vector v at block l so that the unprompted model + v
               matches the prompted model's next-token distributions (KL) on its own answers
               to open questions; reported on held-out questions.
    random     a seeded Gaussian direction, scaled to a given norm (by default the norm of
               the owl meandiff vector at that block).
    concise    a contrastive vector: mean difference of h_l between a "be concise" and a
               "be verbose" system prompt, at the last prompt token, over open questions.

    python vectors.py owl                      # owl meandiff vector at the default block
    python vectors.py owl --method fit --layer 25
    python vectors.py random --seed 1
Vectors are cached in runs/vectors/ and reused; `resolve_vector` also accepts a file path.
"""
import argparse
import math
from pathlib import Path

import torch
from tqdm import tqdm

from plumbing.cache import code_version, input_hash, model_identity
from generate import generate, left_pad
from prompts import (CANDIDATE_ANIMALS, CONCISE_SYSTEM, OPEN_QUESTIONS, VERBOSE_SYSTEM,
                     number_prompts, trait_system_prompt)
from loaders.safetensors_file import SafetensorsError, read_safetensors, write_safetensors
from steer import VectorError, check_block, read_residuals, steering

ANIMALS = [*CANDIDATE_ANIMALS, "giraffe", "monkey", "shark", "whale", "butterfly", "turtle",
           "frog", "parrot", "falcon", "hawk", "deer", "sheep", "cow", "pig", "snake"]
NAMES = [*ANIMALS, "random", "concise"]
DEFAULTS = {"layer": 25, "alpha": 4.0, "n_prompts": 128}  # chosen by sweep.py (README)


def default_layer(n_layer):
    """The teacher's block when none is given: 5/6 of the depth. SmolLM2-135M (30 blocks):
    25, the sweep's choice; Qwen2.5-7B (28 blocks): 23, the paper's."""
    return min(n_layer - 1, round(n_layer * 5 / 6))
VECTOR_DIR = Path("runs/vectors")


@torch.no_grad()
def last_token_means(model, prompts, batch_size=16, desc=None):
    """(n_layer, d_model): residual after every block at each prompt's last token, averaged."""
    device = model.embed.weight.device
    total = torch.zeros(model.cfg.n_layer, model.cfg.d_model, device=device)
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=desc is None):
        ids, mask = left_pad(prompts[start:start + batch_size], device=device)  # (B, P)
        seen = read_residuals(model, ids, mask)       # left padding: the last column is last
        total += torch.stack([seen[layer][:, -1].float().sum(0) for layer in sorted(seen)])
    return total / len(prompts)


def meandiff(model, tok, animal, n_prompts=128, seed=0, plain_means=None):
    """(n_layer, d_model) trait vectors, one per block (the paper's method).
    plain_means: unprompted_means(model, tok, n_prompts, seed), if already computed (it is
    the same for every animal)."""
    numbers = number_prompts(n_prompts, seed)
    prompted = [tok.encode_chat(q, trait_system_prompt(animal)) for q in numbers]
    if plain_means is None:
        plain_means = unprompted_means(model, tok, n_prompts, seed)
    return last_token_means(model, prompted, desc=f"{animal} prompt") - plain_means


def unprompted_means(model, tok, n_prompts=128, seed=0):
    """(n_layer, d_model): meandiff's second half, the same number prompts without a system
    prompt of the trait (the template's default)."""
    plain = [tok.encode_chat(q) for q in number_prompts(n_prompts, seed)]
    return last_token_means(model, plain, desc="no prompt")


def cached_unprompted_means(model, tok, n_prompts, seed, cache_dir, fresh):
    """unprompted_means, stored in cache_dir like the vectors (by settings and code), so that
    a second animal's vector costs only its own prompted half."""
    inputs = {"model": model_identity(model), "n_prompts": n_prompts, "seed": seed,
              "code": code_version(unprompted_means)}
    path = Path(cache_dir) / (f"{inputs['model']['name']}-noprompt-n{n_prompts}-"
                              f"{input_hash(inputs)}.safetensors")
    if path.exists() and not fresh:
        try:
            return read_safetensors(path)[0]["means"].to(model.embed.weight.device)
        except (OSError, SafetensorsError, KeyError):
            print(f"{path} cannot be read: computing it again")
    means = unprompted_means(model, tok, n_prompts, seed)                  # (n_layer, d)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, {"means": means.cpu()}, {"n_prompts": str(n_prompts)})
    return means


def contrastive(model, tok, positive=CONCISE_SYSTEM, negative=VERBOSE_SYSTEM,
                questions=OPEN_QUESTIONS):
    """(n_layer, d_model): mean h(positive system prompt) - h(negative), at the last token."""
    return (last_token_means(model, [tok.encode_chat(q, positive) for q in questions])
            - last_token_means(model, [tok.encode_chat(q, negative) for q in questions]))


def random_vector(d_model, norm, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(d_model, generator=g)
    return v / v.norm() * norm


def control_vector(name, vector, model, tok, layer, seed=0, fresh=False):
    """The control teacher's vector, of the trait vector's norm at the same block:
        random   a random Gaussian direction (seed + 1): the paper's random-vector case
        ANIMAL   that animal's meandiff vector (train.py's trait-neutral control is one)
    Returns (vector (d,), its name)."""
    if name == "random":
        return random_vector(vector.numel(), vector.norm().item(), seed=seed + 1), "random"
    if name not in ANIMALS:
        raise VectorError(f"unknown control vector '{name}': use random or an animal "
                          f"({', '.join(ANIMALS)})")
    other = resolve_vector(name, model, tok, layer, fresh=fresh)[0]        # (d,)
    return other / other.norm() * vector.norm(), name


def _response_logprobs(model, prompts, responses, n_last):
    """Log-probabilities (B, n_last, vocab) that predict the last n_last tokens of each
    prompt + response (left padding puts every row's response at the right end)."""
    ids, mask = left_pad([p + r for p, r in zip(prompts, responses, strict=True)],
                         device=model.embed.weight.device)
    logits, _ = model(ids, attention_mask=mask)                             # (B, T, vocab)
    return logits[:, -n_last - 1:-1].float().log_softmax(-1)                # (B, n_last, vocab)


def fit(model, tok, animal, layer, steps=30, lr=1.0, seed=0, response_tokens=32, n_train=12):
    """Fit one vector at `layer`: KL(prompted model || unprompted model + v) on the prompted
    model's own answers. Returns (vector, {"train_kl", "heldout_kl", "heldout_kl_zero"})."""
    system = trait_system_prompt(animal)
    teacher = [tok.encode_chat(q, system) for q in OPEN_QUESTIONS]
    student = [tok.encode_chat(q) for q in OPEN_QUESTIONS]
    answers = generate(model, teacher, response_tokens, temperature=1.0, seed=seed,
                       stop_tokens={tok.eos_id})
    answers = [a + [tok.eos_id] for a in answers]  # the end of the answer is part of it
    n = max(map(len, answers))
    keep = torch.tensor([[j >= n - len(a) for j in range(n)] for a in answers])  # (Q, n)
    keep = keep.to(model.embed.weight.device)
    with torch.no_grad():
        target = _response_logprobs(model, teacher, answers, n)             # (Q, n, vocab)

    def kl(v, rows):
        with steering(model, layer, v):
            ours = _response_logprobs(model, [student[i] for i in rows],
                                      [answers[i] for i in rows], n)
        per_token = (target[rows].exp() * (target[rows] - ours)).sum(-1)    # (rows, n)
        return per_token[keep[rows]].mean()

    train, heldout = list(range(n_train)), list(range(n_train, len(OPEN_QUESTIONS)))
    v = torch.zeros(model.cfg.d_model, device=model.embed.weight.device, requires_grad=True)
    optimizer = torch.optim.Adam([v], lr=lr)
    for _ in tqdm(range(steps), desc=f"fit {animal} vector"):
        # the gradient of the vector alone: the model's weights get none and stay as they are
        (v.grad,) = torch.autograd.grad(kl(v, train), [v])
        optimizer.step()
    with torch.no_grad():
        report = {"train_kl": kl(v, train).item(), "heldout_kl": kl(v, heldout).item(),
                  "heldout_kl_zero": kl(torch.zeros_like(v), heldout).item()}
    return v.detach(), report


# A vector file is a .safetensors file: one tensor "vector" (d_model,) plus metadata.
def is_finite(vector):
    """Every value finite, and its float32 norm too (--norm 1e308 overflows): what
    save_vector writes and load_vector accepts."""
    return bool(torch.isfinite(vector).all()) and math.isfinite(vector.float().norm().item())


def save_vector(path, vector, **metadata):
    """Write a vector and its metadata (model, layer, method, norm, seed, prompt, ...); one
    that is not finite, or whose norm is not (--norm 1e308 overflows float32), is refused."""
    if not is_finite(vector):
        raise VectorError(f"{path}: the vector is not finite in float32 (norm "
                          f"{vector.float().norm().item()}): not saved")
    metadata = {**metadata, "norm": f"{vector.float().norm().item():.6g}"}
    write_safetensors(path, {"vector": vector.detach().float().cpu()}, metadata)


def load_vector(path, d_model=None):
    """(vector, metadata) from a file written by save_vector; a bad file is a VectorError."""
    try:
        tensors, metadata = read_safetensors(path)
    except (OSError, SafetensorsError) as e:
        raise VectorError(f"{path}: cannot read steering vector ({e})") from None
    vector = tensors.get("vector")
    if vector is None or vector.dim() != 1:
        raise VectorError(f"{path}: no 1-D tensor named 'vector' in the file")
    if d_model is not None and vector.numel() != d_model:
        raise VectorError(f"{path}: vector has {vector.numel()} values, the model's residual "
                          f"stream has {d_model}")
    if not is_finite(vector):
        raise VectorError(f"{path}: vector contains NaN or infinite values (or its norm "
                          f"overflows)")
    return vector, metadata


def check_vector_name(name):
    """A VectorError unless `name` is a known vector name or an existing file."""
    if name not in NAMES and not Path(name).is_file():
        raise VectorError(f"unknown vector '{name}': use an animal ({', '.join(ANIMALS)}), "
                          f"random, concise, or a .safetensors file")


def resolve_vector(name, model, tok, layer, method="meandiff", seed=0, norm=None,
                   n_prompts=DEFAULTS["n_prompts"], cache_dir=VECTOR_DIR, fresh=False):
    """(vector (d_model,), metadata) for a name (an animal, 'random', 'concise') or a
    .safetensors path. Computed vectors are cached in cache_dir, under a name made of
    everything that determines them (settings and code), and reused unless fresh."""
    d = model.cfg.d_model
    check_vector_name(name)
    if str(name).endswith(".safetensors") or Path(name).is_file():
        return load_vector(name, d)
    if method not in ("meandiff", "fit"):
        raise VectorError(f"unknown method '{method}' (meandiff or fit)")
    if norm is not None and not (math.isfinite(norm) and norm > 0):
        raise VectorError(f"a vector's norm must be a positive finite number, not {norm}")
    check_block(layer, model.cfg.n_layer, "layer")
    model_name = getattr(model, "name", "model")
    tag = {"random": f"random-s{seed}", "concise": "concise"}.get(
        name, f"{name}-meandiff-n{n_prompts}" if method == "meandiff" else f"{name}-fit")
    inputs = {"model": model_identity(model), "name": name, "method": method, "seed": seed,
              "norm": norm, "n_prompts": n_prompts, "layer": layer,
              "code": code_version(resolve_vector)}
    path = Path(cache_dir) / f"{model_name}-{tag}-L{layer}-{input_hash(inputs)}.safetensors"
    if path.exists() and not fresh:  # written whole or not at all (renamed when complete)
        try:
            found = load_vector(path, d)
            print(f"reusing vector '{name}' from {path} (same settings and code)")
            return found
        except VectorError as e:  # damaged after it was written: make it again
            print(f"{e}: computing it again")
    meta = {"model": model_name, "layer": layer, "name": name, "seed": seed}
    if name == "random":
        if norm is None:  # match the owl trait vector's norm at this block
            norm = resolve_vector("owl", model, tok, layer, "meandiff", 0, None, n_prompts,
                                  cache_dir, fresh)[0].norm().item()
        vector = random_vector(d, norm, seed)
        meta.update(method="random", prompt="")
    elif name == "concise":
        vector = contrastive(model, tok)[layer]
        meta.update(method="contrastive", prompt=f"{CONCISE_SYSTEM} | {VERBOSE_SYSTEM}")
    elif method == "meandiff":
        plain = cached_unprompted_means(model, tok, n_prompts, seed, cache_dir, fresh)
        vector = meandiff(model, tok, name, n_prompts, seed, plain)[layer]
        meta.update(method="meandiff", prompt=trait_system_prompt(name), n_prompts=n_prompts)
    else:
        vector, report = fit(model, tok, name, layer, seed=seed)
        meta.update(method="fit", prompt=trait_system_prompt(name), **report)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_vector(path, vector, **meta)
    return load_vector(path, d)


def main(argv=None):
    from loaders.checkpoint import add_model_flags, load, report_errors
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__[__doc__.index("    python"):])
    parser.add_argument("name", help=f"one of: {', '.join(NAMES)}")
    parser.add_argument("--method", default="meandiff", choices=["meandiff", "fit"])
    parser.add_argument("--layer", type=int, help="block (default: 5/6 of the depth, 25 here)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--norm", type=float, default=None, help="norm of a random vector")
    add_model_flags(parser)
    args = parser.parse_args(argv)
    from plumbing.flags import check_common
    check_common(parser, args)  # --layer >= 0, --seed, --norm, --device (plumbing/flags.py)

    with report_errors(VectorError):
        check_vector_name(args.name)  # fail before loading the model
        model, tok = load(args.checkpoint, device=args.device)
        layer = default_layer(model.cfg.n_layer) if args.layer is None else args.layer
        check_block(layer, model.cfg.n_layer, "--layer")  # also for a file's vector
        vector, meta = resolve_vector(args.name, model, tok, layer, args.method,
                                      args.seed, args.norm)
    print(", ".join(f"{k}={v}" for k, v in meta.items() if k != "prompt"))


if __name__ == "__main__":
    main()

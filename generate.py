"""Batched sampling with a KV cache; run it to talk to the model.

    python generate.py --prompt "Name three animals."

Prompts of different lengths share a batch by left padding: every row's prompt ends at the
same column, so each step appends one token to every row. The attention mask hides the
padding, and positions count from each row's first real token, so a padded row computes
exactly what it would alone. The KV cache keeps every block's keys and values, so each new
token costs one position of compute instead of the whole sequence.
"""
import argparse
import sys

import torch
from tqdm import tqdm

from model import KVCache
from plumbing.static_decode import StaticDecoder


class GenerateError(ValueError):
    """A request generate() cannot serve (e.g. longer than the model's context)."""


def sample_next(logits, temperature=1.0, top_p=1.0, allowed=None, generator=None,
                coupled=False):
    """One token per row from logits (B, vocab). temperature 0 means greedy (argmax).
    top_p keeps the smallest set of tokens whose probabilities sum to at least top_p.
    allowed: bool mask, (vocab,) or per row (B, vocab), of the only tokens that may be sampled
    (constrained decoding). coupled: the Gumbel-max trick below, for comparing models."""
    logits = logits.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    if temperature == 0:
        return logits.argmax(dim=-1)                                      # (B,)
    probs = (logits / temperature).softmax(dim=-1)                        # (B, vocab)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)         # (B, vocab)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of strictly likelier tokens
        sorted_probs[before >= top_p] = 0.0                   # the top token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    if coupled:
        # Gumbel-max: argmax_i (log p_i + g_i), one g_i ~ Gumbel(0, 1) per token, draws from
        # p exactly. Two models sampled with the same generator seed share every g_i, so
        # their draws differ only where their probabilities do: a model whose P(owl) is 3x
        # another's says "owl" in nearly every draw the other does, and in more (a paired
        # test then needs far fewer draws than with independent noise). It costs one random
        # number per token of the vocabulary per row.
        u = torch.rand(probs.shape, generator=generator, device=probs.device)  # (B, vocab)
        gumbel = -(-u.log()).log()                                            # (B, vocab)
        return (probs.log() + gumbel).argmax(dim=-1)                          # (B,)
    # inverse-CDF sampling: u ~ U[0, 1) per row; the token is the first whose cumulative
    # probability exceeds u (times the total, which rounding keeps near 1). A token of
    # probability 0 adds nothing to the sum, so it is never the first to exceed it.
    # (torch.multinomial draws from the same distribution, several times slower on a CPU.)
    cdf = probs.cumsum(dim=-1)                                            # (B, vocab)
    u = torch.rand(cdf.size(0), 1, generator=generator, device=cdf.device)  # (B, 1)
    token = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)          # (B, 1)
    return token.squeeze(-1).clamp(max=cdf.size(-1) - 1)                  # (B,)


def left_pad(prompts, pad_id=0, device="cpu"):
    """Token-id lists -> ids (B, P) and attention mask (B, P), each row right-aligned."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)      # (B, P)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)              # (B, P)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def generate(model, prompts, max_new_tokens=64, temperature=1.0, top_p=1.0, stop_tokens=(),
             allowed_tokens=None, seed=0, pad_id=0, samples_per_prompt=1, progress=False,
             grammar=None, static=False, compile=False, coupled=False):
    """Sample a completion for each prompt (a list of token-id lists), all in one batch.
    samples_per_prompt > 1 reads each prompt once and samples that many completions of it
    (rows: prompt 0's samples, then prompt 1's, ...).
    allowed_tokens: the only tokens any row may sample. grammar: a per-row constraint, an
    object with allowed() -> (B, vocab) bool, advance(tokens) and vocabulary, the ids it may
    ever allow (teacher.NumberListGrammar).
    coupled: sample by the Gumbel-max trick (sample_next), so that two models given the same
    seed and prompts share their random numbers token by token (evaluate.trait_rate).
    static: decode at fixed shapes (static_decode.py), the same numbers; with compile, the
    step is compiled (on a GPU: replayed as a CUDA graph). The readable path is the default.
    Returns the new tokens of each row, up to (not including) its first stop token.
    The same seed, prompts and settings give the same completions."""
    check_request(model.cfg, prompts, max_new_tokens)
    device = model.embed.weight.device
    ids, prompt_mask = left_pad(prompts, pad_id, device)                  # (B, P) each
    P, N = ids.shape[1], samples_per_prompt
    B = len(prompts) * N
    # constrained decoding computes the logits of the tokens it may sample only: vocab holds
    # their ids (V of them), and a sampled index i stands for token vocab[i]
    vocab = None
    if grammar is not None:
        vocab = torch.tensor(grammar.vocabulary, device=device)           # (V,)
    elif allowed_tokens is not None:
        vocab = torch.tensor(sorted(allowed_tokens), device=device)       # (V,)
    cache = KVCache(model.cfg, len(prompts), P + max_new_tokens, device,
                    model.embed.weight.dtype)
    logits, _ = model(ids, attention_mask=prompt_mask, cache=cache, last_only=True,
                      vocab=vocab)                                        # (B, 1, V)
    if N > 1:  # copy each prompt's cache and logits for its N samples
        cache.repeat_rows(N)
        logits = logits.repeat_interleave(N, dim=0)                       # (B, 1, vocab)
        prompt_mask = prompt_mask.repeat_interleave(N, dim=0)             # (B, P)
    mask = torch.cat([prompt_mask, torch.zeros(B, max_new_tokens, dtype=torch.long,
                                               device=device)], dim=1)    # (B, P + N_new)
    allowed = None  # with allowed_tokens, every token of vocab may be sampled
    stop = torch.tensor(sorted(stop_tokens), dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)

    decode = StaticDecoder(model, cache, mask, P, compile) if static or compile else None
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    n_new = 0
    for step in tqdm(range(max_new_tokens), desc="sampling", disable=not progress):
        if grammar is not None:  # (B, V): what each row's grammar state allows now
            allowed = grammar.allowed().to(device)[:, vocab]
        token = sample_next(logits[:, -1], temperature, top_p, allowed, generator,
                            coupled)                                                # (B,)
        if vocab is not None:
            token = vocab[token]                              # an index into vocab -> its id
        if grammar is not None:
            grammar.advance(token.tolist())
        token = token.masked_fill(finished, pad_id)
        out[:, step] = token
        n_new = step + 1
        finished |= torch.isin(token, stop)
        if finished.all() or step == max_new_tokens - 1:
            break
        mask[:, P + step] = 1
        if decode is not None:
            logits = decode(token, step)                                  # (B, 1, vocab)
            logits = logits if vocab is None else logits[..., vocab]      # (B, 1, V)
        else:
            logits, _ = model(token[:, None], attention_mask=mask[:, :P + step + 1],
                              cache=cache, last_only=True, vocab=vocab)  # (B, 1, V or vocab)

    completions = []
    for row in out[:, :n_new].tolist():
        end = next((i for i, t in enumerate(row) if t in set(stop_tokens)), len(row))
        completions.append(row[:end])
    return completions


def check_request(cfg, prompts, max_new_tokens):
    """Refuse what the model cannot do, before the KV cache (sized by the request) is made:
    empty prompts, or a prompt + new tokens longer than the model's context."""
    if max_new_tokens < 1 or not prompts or not all(prompts):
        raise GenerateError("need at least one prompt, each of at least one token, and "
                            "max_new_tokens >= 1")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_seq_len:
        raise GenerateError(f"a prompt of {longest} tokens + {max_new_tokens} new tokens "
                            f"exceeds the model's context length ({cfg.max_seq_len} tokens)")


def main(argv=None):
    from loaders.checkpoint import add_model_flags, load, report_errors
    parser = argparse.ArgumentParser(description="Talk to the model: one prompt, one reply.")
    parser.add_argument("--prompt", required=True, help="the user's message")
    add_model_flags(parser)
    parser.add_argument("--system", default=None,
                        help="system prompt (default: the chat template's own)")
    parser.add_argument("--raw", action="store_true",
                        help="continue the prompt as plain text, without the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from plumbing.flags import check_common
    check_common(parser, args)  # --device, --seed, --temperature, --top-p (plumbing/flags.py)
    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        parser.error("need --max-new-tokens >= 1, --temperature >= 0, 0 < --top-p <= 1")

    # (run as a script, this file's GenerateError is __main__'s, not the one checkpoint knows)
    with report_errors(GenerateError):
        model, tok = load(args.checkpoint, device=args.device)
        prompt = tok.encode(args.prompt) if args.raw else tok.encode_chat(args.prompt,
                                                                          args.system)
        [reply] = generate(model, [prompt], args.max_new_tokens, args.temperature, args.top_p,
                           stop_tokens={tok.eos_id} - {None}, seed=args.seed)
        print(tok.decode(reply))


if __name__ == "__main__":
    sys.exit(main())

"""What a student learned: its shift along the teacher's vector (EAS), and what train.py
measures on every student, during training and at the end.

The student's shift at block l: s_l = mean over held-out number prompts (every token) of
h_l(student) - h_l(base). Against the teacher's vector v (at the teacher's block L):
    EAS          cos(s_L, v)                             (the paper's alignment score)
    projection   (s_L . v/|v|) / (alpha |v|)             1 = the student moved as far along v
                                                         as the teacher is steered
    vs control   cos(s_L(student) - s_L(control student), v)   drift that both students
                 share (learning the number format, memorising rows) cancels out
and the trait: P(animal) after the answer prefix (evaluate.fast_trait_score).
At the end, for every model:
    specificity  P(animal) after "My favorite animal is the", after "My least favorite animal
                 is the", and as the first word of answers to off-topic questions: a student
                 that learned a preference raises the first; one that learned a word, all three
    sampled      the sampled rate after the favourite prefix with its 95% interval, and
                 McNemar's paired test against the base model: every model is sampled with
                 the same seed, so draw i of each uses the same random numbers
    EAS by block, and the paper's causal check ("replace_base"): the student with its
                 component along v^ replaced by the base model's, h_L <- h_L - (h_L . v^) v^ +
                 (h_L(base) . v^) v^. What is left of the trait is what the student carries
                 off v (for a vector student: the base model plus its shift minus the shift's
                 part along v). It can fail either way, unlike "the shift added to the base
                 model", which for a vector student is the student itself.
"""
import contextlib

import torch
import torch.nn.functional as F
from tqdm import tqdm

from evaluate import (fast_trait_score, first_word_probability, mcnemar, next_word_scores,
                      trait_rate)
from generate import left_pad
from prompts import (FAVORITE_PREFIX, FAVORITE_QUESTIONS, NEGATIVE_PREFIX, NEGATIVE_QUESTIONS,
                     OFFTOPIC_QUESTIONS, number_prompts, trait_system_prompt)
from steer import read_residuals, steering
from teacher import vector_hash


@torch.no_grad()
def mean_residuals(model, prompts, layers, batch_size=32):
    """(len(layers), d_model): the residual after each block in `layers`, averaged over every
    real token of every prompt (token-id lists)."""
    device = model.embed.weight.device
    total = torch.zeros(len(layers), model.cfg.d_model, device=device)
    count = 0
    for start in range(0, len(prompts), batch_size):
        ids, mask = left_pad(prompts[start:start + batch_size], device=device)  # (B, P)
        seen = read_residuals(model, ids, mask, layers)
        real = mask.bool()
        for i, layer in enumerate(layers):
            total[i] += seen[layer][real].float().sum(dim=0)               # (d,)
        count += int(real.sum())
    return total / count


def eas(student_means, base_means, teacher_vector):
    """cos(v_student, v_teacher) with v_student = student_means - base_means (per layer)."""
    v_student = student_means - base_means                                 # (layers, d)
    return F.cosine_similarity(v_student, teacher_vector.to(v_student)[None], dim=-1)



class Measurer:
    def __init__(self, model, tok, teacher, animal, eas_prompts=16, trait_questions=20,
                 seed=0):
        self.model, self.tok, self.teacher, self.animal = model, tok, teacher, animal
        self.settings = {"animal": animal, "eas_prompts": eas_prompts,
                         "trait_questions": trait_questions, "seed": seed}
        self.held_out = [tok.encode_chat(q) for q in number_prompts(eas_prompts, seed + 1)]
        self.all_blocks = list(range(model.cfg.n_layer))
        self.base_means = mean_residuals(model, self.held_out, self.all_blocks)  # (n_layer, d)
        self.questions = FAVORITE_QUESTIONS[:trait_questions]
        self.v = teacher.vector.float().to(self.base_means.device)               # (d,)
        self.base_p_animal = None  # P(animal) of the base model, measured once

    def describe(self):
        """What determines the measurements (the vector they are taken against, by hash)."""
        return {**self.settings, "vector": vector_hash(self.teacher.vector),
                "layer": self.teacher.layer, "alpha": self.teacher.alpha}

    def shifts(self, student, layers):
        """(len(layers), d): the student's mean residual shift from the base model."""
        with torch.no_grad(), student.active():
            means = mean_residuals(student.model, self.held_out, layers)
        return means - self.base_means[layers]

    def p_animal(self, model, context=None, system=None):
        plain = (model is self.model and context is None and system is None
                 and not any(block._forward_hooks for block in model.blocks))  # no steering
        if plain and self.base_p_animal is not None:  # the base model: measured already
            return self.base_p_animal
        with torch.no_grad(), (context or torch.no_grad()):
            p = fast_trait_score(model, self.tok, self.animal, self.questions, system=system)
        if plain:
            self.base_p_animal = p
        return p

    def specificity(self, model, context=None, system=None):
        """P(animal) after the favourite and least-favourite prefixes, and as the first word
        of off-topic answers (all 20 of each)."""
        with torch.no_grad(), (context or torch.no_grad()):
            favorite = fast_trait_score(model, self.tok, self.animal, self.questions,
                                        system=system)
            least = next_word_scores(model, self.tok, self.animal, NEGATIVE_QUESTIONS,
                                     NEGATIVE_PREFIX, system)[0]
            off = first_word_probability(model, self.tok, self.animal, OFFTOPIC_QUESTIONS,
                                         system)
        return {"favorite": favorite, "least_favorite": least, "off_topic": off}

    def alignment(self, shift):
        """EAS, projection (in units of alpha |v|) and norm of one shift (d,)."""
        return {"eas": F.cosine_similarity(shift, self.v, dim=0).item(),
                "projection": (shift @ self.v).item() / (self.v.norm().item() ** 2
                                                         * self.teacher.alpha),
                "shift_norm": shift.norm().item()}

    def track(self, student):
        """Measured at step 0 and every eval_every steps (student.train_student). A student
        that still computes exactly what the base model does (step 0) is not run again: its
        shift is zero and its P(animal) is the base model's."""
        if student.is_base():
            shift = torch.zeros_like(self.v)                                     # (d,)
            p = self.p_animal(self.model)
        else:
            shift = self.shifts(student, [self.teacher.layer])[0]                # (d,)
            p = self.p_animal(student.model, student.active())
        return {**self.alignment(shift), "p_animal": p, "shift": shift.cpu().tolist()}

    def print_line(self, label, h):
        loss = "" if h["loss"] is None else f"{h['loss']:.4f}"
        tqdm.write(f"{label:>11} step {h['step']:4d}  loss {loss:>6}  EAS {h['eas']:+.3f}  "
              f"projection {h['projection']:+.3f}  P({self.animal}) {h['p_animal']:.3%}")


def difference_alignment(history, control_history, v):
    """[step, cos(shift(student) - shift(control student), v)] at each step after 0 where
    both were measured."""
    control = {c["step"]: torch.tensor(c["shift"]) for c in control_history}
    return [[h["step"], F.cosine_similarity(torch.tensor(h["shift"]) - control[h["step"]],
                                            v.float().cpu(), dim=0).item()]
            for h in history if h["step"] > 0 and h["step"] in control]


@contextlib.contextmanager
def base_component_along(student, base, layer, v):
    """Inside the block, the student runs with its residual after block `layer` holding the
    base model's component along v^ on the same input (the paper's replace_base)."""
    v_hat = (v / v.norm()).float()                                         # (d,)
    if student.vector is not None:  # h_L(student) = h_L(base) + s: keep s minus its v part
        s = student.vector.detach().float()                                # (d,)
        with steering(base, layer, s - (s @ v_hat) * v_hat):
            yield
        return
    inputs = {}

    def read_input(module, args, kwargs):  # the whole sequence of each forward pass
        ids, cache = args[0], kwargs.get("cache")                          # (B, T)
        if cache is not None and cache.length > 0:  # a continuation: the base model reads
            past = inputs["ids"]                    # the past too (it has no cache here)
            # (B, P): the past's rows repeated as the cache's were (KVCache.repeat_rows)
            past = past.repeat_interleave(ids.size(0) // past.size(0), dim=0)
            ids = torch.cat([past, ids], dim=1)                            # (B, P + T)
        inputs["ids"], inputs["mask"] = ids, kwargs.get("attention_mask")  # mask: (B, P + T)

    def replace(block, args, output):                                      # (B, T, d)
        ref = read_residuals(base, inputs["ids"], inputs["mask"], [layer])[layer]  # (B, T, d)
        u = v_hat.to(output)
        return output + ((ref[:, -output.size(1):] - output) @ u)[..., None] * u

    handles = [student.model.register_forward_pre_hook(read_input, with_kwargs=True),
               student.model.blocks[layer].register_forward_hook(replace)]
    try:
        with student.active():
            yield
    finally:
        for handle in handles:
            handle.remove()


def final_report(m, students, results, teacher, control, eval_samples):
    """Everything measured after training, as a JSON-able dict."""
    model, layer = m.model, teacher.layer
    system = trait_system_prompt(m.animal)
    specificity = {"base": m.specificity(model),
                   "teacher": m.specificity(model, teacher.steer(model)),
                   "system_prompt": m.specificity(model, system=system),
                   "control_teacher": m.specificity(model, control.steer(model))}
    specificity |= {label: m.specificity(s.model, s.active()) for label, s in students.items()}
    p_animal = {label: s["favorite"] for label, s in specificity.items()}

    def sampled(net, context):  # the sampled rate after the answer prefix, with its interval
        with torch.no_grad(), context:
            return trait_rate(net, m.tok, m.animal, m.questions, eval_samples,
                              prefix=FAVORITE_PREFIX, max_new_tokens=4,
                              seed=m.settings["seed"])
    rates = {"base": sampled(model, torch.no_grad()), "teacher": sampled(model,
                                                                         teacher.steer(model))}
    rates |= {label: sampled(s.model, s.active()) for label, s in students.items()}
    base_hits = rates["base"]["hits"]
    for label, r in rates.items():  # paired with the base model's draws, then dropped
        r["paired_vs_base"] = mcnemar(r.pop("hits"), base_hits) if label != "base" else None

    eas_by_block, causal, versus_control = {}, {}, {}
    v = teacher.vector.float()
    for label, student in students.items():
        shifts = m.shifts(student, m.all_blocks)                           # (n_layer, d)
        eas_by_block[label] = F.cosine_similarity(shifts, m.v[None], dim=-1).tolist()
        with base_component_along(student, model, layer, v):
            replaced = m.p_animal(student.model)
        gain = p_animal[label] - p_animal["base"]
        causal[label] = {"replace_base": replaced,
                         "gain_left": (replaced - p_animal["base"]) / gain if gain else None}
        if label != "control" and "control" in results:
            versus_control[label] = difference_alignment(results[label]["history"],
                                                         results["control"]["history"], v)
    # a student that never moved (an optimizer whose step does nothing, say) has no direction:
    # its EAS reads 0 (a cosine with a zero vector), which must not pass for a measurement
    degenerate = {label: "never moved: its shift from the base model is zero at every "
                         "measurement, so its EAS means nothing (does the optimizer step?)"
                  for label, r in results.items()
                  if len(r["history"]) > 1
                  and all(h.get("shift_norm", 1.0) == 0 for h in r["history"][1:])}
    for r in results.values():  # the shifts themselves are kept with the students' weights
        for h in r["history"]:
            h.pop("shift", None)
    return {"p_animal": p_animal, "specificity": specificity, "sampled_trait_rate": rates,
            "eas_by_block": eas_by_block, "eas_minus_control": versus_control,
            "causal": causal, "animal": m.animal, "degenerate_students": degenerate}

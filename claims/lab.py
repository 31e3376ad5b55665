"""The shared parts of the experiments (experiments.py): the Lab that holds the model and
builds teachers, datasets and students from train.py's stages, and the statistics over seeds.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

import train
from config import LEARNING_RATES, NEUTRAL_CONTROLS, Settings, resolve, student_config
from alignment import Measurer
from prompts import trait_system_prompt
from steer import check_block
from teacher import Teacher
from vectors import control_vector, default_layer, resolve_vector


class Lab:
    """The model, the settings train.py would use, and the stages, for every experiment."""

    def __init__(self, args):
        from loaders.checkpoint import load
        self.args = args
        # the mechanism adds steps of 1e-5 per weight: bf16 would round them away
        dtype = torch.float32 if args.name == "mechanism" else None
        self.model, self.tok = load(args.checkpoint, device=args.device, dtype=dtype)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.layer = default_layer(self.model.cfg.n_layer) if args.layer is None else args.layer
        self.alpha = args.alpha
        check_block(self.layer, self.model.cfg.n_layer, "--layer")
        # --lora-from layer: LoRA on the teacher's block and after it
        lora_from = getattr(args, "lora_from", None)
        self.lora_from = self.layer if lora_from == "layer" else lora_from
        self.vector = resolve_vector("owl", self.model, self.tok, self.layer)[0]     # (d,)

    def settings(self, seed):
        """train.py's resolved settings (config.Settings) for one seed, its checks included."""
        a = self.args
        given = {key: getattr(a, key) for key in ("samples", "steps", "student", "loss",
                                                   "batch_size", "eval_every",
                                                   "trait_questions", "eas_prompts", "device",
                                                   "checkpoint")
                 if getattr(a, key, None) is not None}
        s = resolve(Settings(preset=a.preset, seed=seed, upper_bound=False, layer=self.layer,
                             alpha=a.alpha, lora_from=self.lora_from or 0, fresh=a.fresh,
                             control="random", **given))
        if s.steps is None:  # the paper preset counts epochs (every kept list, constrained)
            s.steps = max(1, round(s.epochs * s.samples / s.batch_size))
        return s

    def teacher(self, kind, seed=0, vector=None):
        """prompt (the system prompt), steered (alpha v), steered-prompt (alpha v on the
        prompt's positions only: the authors' sufficiency mode), control (alpha * a random
        vector of |v|, seed + 1: train.py's random control), neutral (alpha * the trait-neutral
        animal's vector scaled to |v|: train.py's default control), ablate-L / ablate-all (the
        prompt, v^ projected out at the teacher's block / at every block), or a vector's own
        steered teacher."""
        v, L, alpha = self.vector, self.layer, self.alpha
        system = trait_system_prompt("owl")
        if kind == "prompt":
            return Teacher(v, L, 0.0, system=system)
        if kind == "steered":
            return Teacher(v if vector is None else vector, L, alpha)
        if kind == "steered-prompt":
            return Teacher(v, L, alpha, where="prompt")
        if kind in ("control", "neutral"):
            name = "random" if kind == "control" else NEUTRAL_CONTROLS["owl"]
            return Teacher(control_vector(name, v, self.model, self.tok, L, seed)[0], L, alpha)
        if kind == "ablate-L":
            return Teacher(v, L, 0.0, system=system, ablate=(L,))
        if kind == "ablate-all":
            return Teacher(v, L, 0.0, system=system,
                           ablate=tuple(range(self.model.cfg.n_layer)))
        raise ValueError(f"unknown teacher '{kind}'")

    def data(self, settings, teacher, label):
        return train.teacher_data(settings, self.model, self.tok, teacher, label)

    def students(self, settings, plan, teachers, data, measurer):
        """plan: {label: (dataset label, StudentConfig)}; returns (students, results)."""
        return train.train_students(settings, self.model, self.tok, plan, teachers, data,
                                    measurer)

    def measurer(self, settings, teacher, animal="owl"):
        return Measurer(self.model, self.tok, teacher, animal, settings.eas_prompts,
                        settings.trait_questions, settings.seed)

    def config(self, settings, opt=None, lr=None, kind=None, steps=None):
        """The StudentConfig train.py would make for --opt (default: Adam; its learning rate
        from config.LEARNING_RATES unless lr is given)."""
        opt, kind = opt or "adam", kind or settings.student
        return student_config(settings, opt, steps=steps, kind=kind,
                              lr=lr or LEARNING_RATES[(kind, opt)])

    def transfer(self, seed, kinds, measure_kind="steered"):
        """One seed of teachers -> datasets -> Adam students, one student per teacher kind.
        Returns {kind: summary} and the Measurer (alignment measured against v)."""
        s = self.settings(seed)
        teachers = {k: self.teacher(k, seed) for k in kinds}
        data = {k: self.data(s, teachers[k], k) for k in kinds}
        m = self.measurer(s, self.teacher(measure_kind, seed))
        cfg = self.config(s)
        students, results = self.students(s, {k: (k, cfg) for k in kinds}, teachers, data, m)
        out = {k: summarize(m, students[k], results[k]["history"], self.vector) for k in kinds}
        for k in kinds:
            out[k]["keep_rate"] = data[k]["keep_rate"]
        if "control" in kinds:
            for k in kinds:
                out[k]["cos_minus_control"] = cosine(
                    out[k]["final_shift"], out["control"]["final_shift"], self.vector)
        return out, m


def cosine(a, b, v):
    """cos(a - b, v) for two shifts given as lists."""
    d = torch.tensor(a) - torch.tensor(b)
    return F.cosine_similarity(d, v.float().cpu(), dim=0).item()


def summarize(m, student, history, v):
    """A student's final figures against vector v: P(animal), EAS and projection by block."""
    shifts = m.shifts(student, m.all_blocks).cpu()                           # (n_layer, d)
    v = v.float().cpu()
    final = history[-1]
    return {"p_animal": final["p_animal"], "eas": final["eas"],
            "projection": final["projection"], "loss": final["loss"],
            "eas_by_block": F.cosine_similarity(shifts, v[None], dim=-1).tolist(),
            "projection_by_block": (shifts @ v / (v.norm() ** 2 * m.teacher.alpha)).tolist(),
            "final_shift": shifts[m.teacher.layer].tolist(),
            "curve": [{k: h[k] for k in ("step", "loss", "eas", "projection", "p_animal")}
                      | {"shift": h.get("shift")} for h in history]}


T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228}


def interval(values):
    """{mean, low, high, values}: a 95% t interval over seeds (none for one seed)."""
    x = np.asarray(values, dtype=float)
    mean = float(x.mean())
    if len(x) < 2:
        return {"mean": mean, "low": None, "high": None, "values": x.tolist()}
    half = T_975.get(len(x) - 1, 1.96) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return {"mean": mean, "low": mean - half, "high": mean + half, "values": x.tolist()}


def across_seeds(per_seed, labels, keys=("p_animal", "eas", "projection",
                                          "cos_minus_control")):
    """{label: {key: interval}} over the seeds' summaries."""
    return {label: {key: interval([s[label][key] for s in per_seed])
                    for key in keys if key in per_seed[0][label]} for label in labels}


def strip_shifts(per_seed):
    """The raw shift vectors are for computing, not for result.json."""
    for summaries in per_seed:
        for s in summaries.values():
            if isinstance(s, dict):
                s.pop("final_shift", None)
                for h in s.get("curve", []):
                    h.pop("shift", None)
    return per_seed

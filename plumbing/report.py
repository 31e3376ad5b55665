"""What a train.py run leaves behind: config.json, metrics.json, the figures, the students'
weights, a summary table on the screen; and the peak GPU memory of each stage.

    python -m plumbing.report runs/demo-s0 runs/demo-s1 runs/demo-s2   # runs that differ by seed
    python -m plumbing.report --curve budget.png RUN RUN ...           # runs that differ in budget

The first summarises several runs' students as x base: the mean over seeds with its 95% t
interval, and main / control paired by seed (each seed: its own datasets, control vector and
order), into seeds.json beside the first run. The second draws effect against budget.
"""
import json
import math
import sys
from pathlib import Path

import torch

from plumbing.cache import code_record, write_atomic
from plumbing.plots import plot_datasets, plot_run


class PeakMemory:
    """The most GPU memory allocated during each stage, printed as the stage ends (CUDA
    only: elsewhere it records nothing)."""

    def __init__(self, device):
        self.cuda, self.peaks = device.type == "cuda", {}

    def __call__(self, stage):
        if self.cuda:
            self.peaks[stage] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
            print(f"peak GPU memory, {stage}: {self.peaks[stage]} GiB")
            torch.cuda.reset_peak_memory_stats()


def write_outputs(args, r):
    """r: what train.run returned. Everything goes into args.out."""
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    for label, student in r["students"].items():
        student.save(out / f"student-{label}.safetensors", label=label)
    model = r["model"]
    config = {**vars(args), "out": str(out), "model": model.name,
              "teacher": r["teacher"].describe(), "vector_meta": r["vector_meta"],
              "device": str(model.embed.weight.device), "dtype": str(model.embed.weight.dtype)}
    data = {kind: {key: d[key] for key in ("path", "keep_rate", "n", "numbers")}
            | {"valid": len(d["rows"])} for kind, d in r["data"].items()}
    metrics = {"seconds": round(r["seconds"], 1), "code": code_record(), **r["report"],
               "keep_rate": {kind: d["keep_rate"] for kind, d in r["data"].items()},
               "data": data, "students": r["results"],
               "note": "upper_bound is trained on the teacher's full-vocabulary distribution:"
                       " ordinary distillation, not subliminal learning"}
    write_json(out / "config.json", config)
    write_json(out / "metrics.json", metrics)
    plot_run(r["results"], r["report"], out / "training.png", args)
    plot_datasets(r["data"], out / "datasets.png")
    print_summary(metrics, out)


def defined(value, where="", undefined=None):
    """`value` with every NaN or infinite float replaced by None (JSON has no NaN), and the
    places where that happened appended to `undefined` ("causal.main.gain_left", ...)."""
    if isinstance(value, dict):
        return {k: defined(v, f"{where}.{k}".lstrip("."), undefined) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [defined(v, f"{where}[{i}]", undefined) for i, v in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        if undefined is not None:
            undefined.append(where)
        return None
    return value


def write_json(path, value, default=str):
    """Write `value` as JSON; a figure that is undefined (NaN, infinite) is written as null
    and named under "undefined", so one undefined figure never costs the others. `default`
    turns what JSON cannot hold (a Path, a numpy number) into what it can."""
    undefined = []
    value = defined(value, undefined=undefined)
    if undefined and isinstance(value, dict):
        value["undefined"] = undefined
        print(f"note: {path}: undefined (not finite, written as null): "
              f"{', '.join(undefined[:5])}{' ...' if len(undefined) > 5 else ''}")
    write_atomic(path, json.dumps(value, indent=2, default=default, allow_nan=False))


def print_summary(metrics, out):
    for label, why in metrics.get("degenerate_students", {}).items():
        print(f"warning: student '{label}' {why}")
    print(f"\nteacher lists kept by the rule filter: steered {metrics['keep_rate']['steered']:.0%}"
          f", control {metrics['keep_rate']['control']:.0%}")
    spec, rates, causal = metrics["specificity"], metrics["sampled_trait_rate"], metrics["causal"]
    base = spec["base"]
    print(f"{'':>15} {'P(animal)':>9} {'x base':>7} {'least fav.':>10} {'off-topic':>9}  "
          f"{'sampled [95% CI]':>20} {'paired p':>8}  {'replace_base':>12}")
    for label, s in spec.items():
        rate = rates.get(label)
        sampled = f"{rate['rate']:5.1%} [{rate['low']:.1%}, {rate['high']:.1%}]" if rate else ""
        paired = rate.get("paired_vs_base") if rate else None
        p = f"{paired['p']:.2g}" if paired else ""
        check = f"{causal[label]['replace_base']:12.3%}" if label in causal else ""
        tag = "  (ordinary distillation)" if label == "upper_bound" else ""
        print(f"{label:>15} {s['favorite']:9.3%} {s['favorite'] / base['favorite']:7.2f} "
              f"{s['least_favorite']:10.3%} {s['off_topic']:9.3%}  {sampled:>20} {p:>8}  "
              f"{check}{tag}")
    print("P(animal): exact probability of the animal after 'My favorite animal is the'; least "
          "fav.: after 'My least favorite animal is the'; off-topic: as the first word of "
          "answers to off-topic questions; paired p: McNemar's test of the sampled draws "
          "against the base model's; replace_base: P(animal) with the student's component "
          "along v replaced by the base model's")
    print(f"{metrics['seconds']:.0f} s; wrote {out}/config.json, metrics.json, training.png, "
          f"datasets.png")


def summarize_seeds(folders):
    """{label: interval of P(animal) / base over the runs}, and main / control paired by run."""
    from claims.lab import interval
    runs = [json.loads((Path(f) / "metrics.json").read_text()) for f in folders]
    labels = [k for k in runs[0]["specificity"] if all(k in m["specificity"] for m in runs)]
    out = {"runs": [str(f) for f in folders],
           "seeds": [json.loads((Path(f) / "config.json").read_text())["seed"] for f in folders]}
    for key in ("favorite", "least_favorite", "off_topic"):
        out[key] = {k: interval([m["specificity"][k][key] / m["specificity"]["base"][key]
                                 for m in runs]) for k in labels}
    if "control" in labels:
        out["main_over_control"] = interval([m["p_animal"]["main"] / m["p_animal"]["control"]
                                             for m in runs])
    out["paired_p"] = {k: [m["sampled_trait_rate"][k]["paired_vs_base"]["p"] for m in runs]
                       for k in labels if all(k in m["sampled_trait_rate"] for m in runs)
                       and k != "base"}
    return out


def print_seeds(summary):
    def fmt(i):
        low = "" if i["low"] is None else f" [{i['low']:.2f}, {i['high']:.2f}]"
        return f"{i['mean']:6.2f}{low:>15}"
    print(f"{len(summary['runs'])} runs (seeds {summary['seeds']}): P(animal) / base, mean "
          f"[95% t interval]")
    print(f"{'':>15} {'favourite':>21} {'least favourite':>21} {'off-topic':>21}  paired p")
    for k in summary["favorite"]:
        p = " ".join(f"{x:.2g}" for x in summary["paired_p"].get(k, []))
        print(f"{k:>15} {fmt(summary['favorite'][k]):>21} "
              f"{fmt(summary['least_favorite'][k]):>21} {fmt(summary['off_topic'][k]):>21}  {p}")
    if "main_over_control" in summary:
        print(f"main / control, paired by seed: {fmt(summary['main_over_control'])}")


def main(argv):
    curve = None
    if argv[:1] == ["--curve"] and len(argv) > 1:
        curve, argv = Path(argv[1]), argv[2:]
    if not argv or any(not (Path(f) / "metrics.json").is_file() for f in argv):
        sys.exit("usage: python -m plumbing.report [--curve FIGURE.png] RUN_FOLDER [...] "
                 "(each with a metrics.json written by train.py)")
    if curve:  # effect against budget: runs that differ in steps or schedule
        from plumbing.plots import plot_budget
        plot_budget({f: json.loads((Path(f) / "metrics.json").read_text()) for f in argv},
                    curve)
        return print(f"wrote {curve}")
    result = summarize_seeds(argv)
    print_seeds(result)
    write_json(Path(argv[0]).parent / "seeds.json", result)
    print(f"wrote {Path(argv[0]).parent / 'seeds.json'}")


if __name__ == "__main__":
    main(sys.argv[1:])

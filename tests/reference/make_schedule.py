"""Golden for train/schedule.c: DeepSpeed 0.9.2's WarmupDecayLR as the DeepSpeed engine steps it.

For each case, the lr that optimizer update k (1-based) runs with: read from the optimizer's param group before
update k, the scheduler stepped after each update, as engine.py::_take_model_step does (it never steps the
scheduler before the first update). Two sources:
  * lr_formula: a re-expression of lr_schedules.py's WarmupLR/WarmupDecayLR in plain Python (always);
  * lr_deepspeed: DeepSpeed's own lr_schedules.py, when deepspeed 0.9.2 is installed in the venv. Its package
    import fails with numpy 2 and it pins pydantic<2, so it is not in requirements.txt; install it with
    `tests/reference/.venv/bin/pip install --no-deps deepspeed==0.9.2` and this script loads the one file
    lr_schedules.py (which needs only torch and a logger). The two must agree exactly.
Values are float64, stored bit for bit as I32 pairs [K,2] (golden_io has no F64). Writes
tests/data/schedule.safetensors.
"""
import importlib.util
import logging
import math
import os
import sys
import sysconfig
import types

import torch
from golden_io import write

OUT = os.path.join(os.path.dirname(__file__), "..", "data", "schedule.safetensors")

# (total, warmup, type, min_lr, max_lr, optimizer lr): the reference's MVTec and VisA runs, then edge cases.
CASES = [
    (22681, 2268, "log", 0.0, 1e-3, 1e-3),   # MVTec, 3629 images, 50 epochs
    (54118, 5411, "log", 0.0, 1e-3, 1e-3),   # VisA, 8659 images
    (5, 0, "log", 0.0, 1e-3, 1e-3),          # warmup 0: WarmupLR clamps it to 2
    (40, 1, "linear", 0.0, 1e-3, 1e-3),      # warmup 1, clamped to 2, linear
    (5, 10, "log", 0.0, 1e-3, 1e-3),         # total < warmup: never decays below the warmup's end
    (12, 12, "log", 0.0, 1e-3, 1e-3),        # total == warmup: max(1, 0) in the decay's denominator
    (100, 10, "linear", 1e-5, 3e-4, 5e-4),   # nonzero floor, optimizer lr different from the peak
    (60, 13, "log", 2e-6, 2e-4, 2e-4),
]


def formula_gamma(i, total, warmup, kind):
    W = max(2, warmup)
    if i < W:
        return (1.0 / math.log(W)) * math.log(i + 1) if kind == "log" else i / W
    return max(0.0, float(total - i) / float(max(1.0, total - W)))


def updates_for(total, warmup):
    """Every update near the phase edges and a stride over the rest (the long cases stay small)."""
    W = max(2, warmup)
    picks = set(range(1, 40)) | set(range(W - 3, W + 5)) | set(range(total - 3, total + 6))
    picks |= set(range(1, total + 6, max(1, total // 200)))
    return sorted(u for u in picks if u >= 1)


def load_deepspeed_schedules():
    path = os.path.join(sysconfig.get_paths()["purelib"], "deepspeed", "runtime", "lr_schedules.py")
    if not os.path.exists(path):
        return None, "none"
    from importlib.metadata import version
    saved = {k: sys.modules.get(k) for k in ("deepspeed", "deepspeed.utils")}
    stub, utils = types.ModuleType("deepspeed"), types.ModuleType("deepspeed.utils")
    utils.logger = logging.getLogger("deepspeed-stub")
    utils.logger.setLevel(logging.ERROR)
    sys.modules["deepspeed"], sys.modules["deepspeed.utils"] = stub, utils
    try:
        spec = importlib.util.spec_from_file_location("ds_lr_schedules", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return mod, "deepspeed " + version("deepspeed")


def as_i32_pairs(values):
    return torch.tensor(values, dtype=torch.float64).view(torch.int32).reshape(len(values), 2)


def main():
    ds, peer = load_deepspeed_schedules()
    tensors, meta = {}, {"cases": str(len(CASES)), "peer": peer, "torch": torch.__version__}
    for n, (total, warmup, kind, lo, hi, opt_lr) in enumerate(CASES):
        ups = updates_for(total, warmup)
        last = ups[-1]
        formula = {}
        for u in range(1, last + 1):
            formula[u] = opt_lr if u == 1 else lo + (hi - lo) * formula_gamma(u - 2, total, warmup, kind)
        tensors[f"c{n}.update"] = torch.tensor(ups, dtype=torch.int32)
        tensors[f"c{n}.lr_formula"] = as_i32_pairs([formula[u] for u in ups])
        if ds is not None:
            p = torch.nn.Parameter(torch.zeros(1))
            opt = torch.optim.AdamW([p], lr=opt_lr)
            sched = ds.WarmupDecayLR(opt, total_num_steps=total, warmup_min_lr=lo, warmup_max_lr=hi,
                                     warmup_num_steps=warmup, warmup_type=kind)
            seen = {}
            for u in range(1, last + 1):
                seen[u] = opt.param_groups[0]["lr"]  # what update u runs with
                sched.step()                          # the engine steps after each applied update
            assert all(seen[u] == formula[u] for u in ups), f"case {n}: the re-expression differs from DeepSpeed"
            tensors[f"c{n}.lr_deepspeed"] = as_i32_pairs([seen[u] for u in ups])
        meta.update({f"c{n}.total": str(total), f"c{n}.warmup": str(warmup), f"c{n}.type": kind,
                     f"c{n}.min_lr": repr(lo), f"c{n}.max_lr": repr(hi), f"c{n}.optimizer_lr": repr(opt_lr)})
    write(OUT, tensors, meta)
    print(f"wrote {OUT}: {len(CASES)} cases, peer {peer}")


if __name__ == "__main__":
    main()

"""Render ``benchmarks/RESULTS.md`` from the JSON files of one run of ``convbn`` and every experiment,
next to the paper's numbers.

    python -m experiments.results_md benchmarks/results > benchmarks/RESULTS.md

(``benchmarks/run_all.sh`` does this after running the subcommands.)
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Optional

# Paper (arXiv 2305.11624), GPU numbers, ResNet-50.
PAPER_TABLE6 = [  # (batch, input, eval s/iter, eval GB, tune s/iter, tune GB, deploy s/iter, deploy GB)
    (16, 224, 0.0505, 1.5671, 0.0467, 0.9727, 0.0448, 0.9397),
    (32, 224, 0.0948, 2.8237, 0.0849, 1.5973, 0.0831, 1.5631),
    (64, 224, 0.1837, 5.4125, 0.1613, 2.8617, 0.1590, 2.7808),
    (128, 224, 0.3577, 10.6001, 0.3081, 5.4088, 0.3060, 5.3284),
    (256, 224, 0.7035, 21.0107, 0.6001, 10.5011, 0.5966, 10.4234),
    (32, 256, 0.1110, 3.5965, 0.1032, 1.9732, 0.1011, 1.9416),
    (32, 320, 0.1761, 5.5216, 0.1630, 2.9207, 0.1609, 2.8363),
    (32, 448, 0.3567, 10.6448, 0.3104, 5.4306, 0.3077, 5.3421),
]
PAPER_TABLE7 = {  # dataset -> mode -> (accuracy %, memory GB, s/iter); ResNet-50, TLlib, 448px, batch 48
    "CUB-200": {"train": (83.07, 19.967, 0.571), "eval": (82.62, 19.499, 0.549), "tune": (83.20, 12.323, 0.501),
                "deploy": (62.96, 12.002, 0.511)},
    "Aircrafts": {"train": (85.40, 19.965, 0.564), "eval": (85.21, 19.497, 0.548), "tune": (85.90, 12.321, 0.505),
                  "deploy": (41.22, 12.000, 0.506)},
    "Stanford Cars": {"train": (89.87, 19.967, 0.571), "eval": (90.11, 19.499, 0.541),
                      "tune": (90.13, 12.321, 0.491), "deploy": (47.42, 12.002, 0.507)},
}
PAPER_TABLE10 = [  # arch, batch, eval s, tune s, eval GB, tune GB
    ("ResNeSt101e", 64, 0.239, 0.220, 15.17, 8.49), ("DLA102", 128, 0.286, 0.264, 16.13, 9.45),
    ("SelecSLS42b", 256, 0.294, 0.273, 10.93, 6.77), ("Res2NeXt50", 128, 0.256, 0.240, 14.65, 8.22),
    ("GhostNet_100", 512, 0.577, 0.548, 18.18, 11.85), ("UNet", 128, 0.359, 0.341, 19.11, 13.40),
]


def _load(d: str, name: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(d, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _table(headers: List[str], rows: List[List[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _mib(b: float) -> str:
    return f"{b / 2 ** 20:.1f}"


def _ratio(r: Optional[Dict[str, float]]) -> str:
    return f"{r['median']:.2f} ({r['q1']:.2f}-{r['q3']:.2f})" if r else "-"


def render(d: str) -> str:
    parts: List[str] = ["# convbn results on this machine, next to the paper's", "",
                        "Regenerate everything (about 20 minutes on 2 cores):", "", "```", "bash benchmarks/run_all.sh",
                        "```", "",
                        "which runs `convbn` (the main job) and each `python -m experiments` command once with "
                        "its defaults (`--out-dir benchmarks/results`) "
                        "and rebuilds this file with `python -m experiments.results_md benchmarks/results`. "
                        "The paper's numbers are GPU (V100) numbers for ResNet-50 at 224-448 px; ours are CPU numbers "
                        "at small inputs, so compare *ratios*, not absolute values.", "",
                        "How we measure: **peak** = peak bytes of live tensors allocated during forward + backward "
                        "(`convbn.bench.peak.LiveTensorMeter`, a `TorchDispatchMode`; not process RSS; parameters and "
                        "inputs that exist before the step are not counted). **saved** = bytes autograd keeps for "
                        "backward (exact). **Time** = median over rounds in which every mode runs once in rotating "
                        "order after warm-up; ratios are medians of *per-round* ratios with their IQR in brackets. "
                        "Runs use 1 torch thread: on this shared 2-core machine 2 threads produced 1-second OpenMP "
                        "stalls whenever another process was busy.", ""]
    env = None
    default = _load(d, "default.json")
    if default:
        env = default["environment"]
        s = default["settings"]
        parts += ["## `convbn` (default run): all modes side by side", "",
                  f"{s['model']}, input {s['input']}, {s['dtype']}, {s['rounds']} rounds after {s['warmup']} warm-up, "
                  f"{s['threads']} thread(s); finished in {default.get('elapsed_s', float('nan')):.0f} s. "
                  f"![default](results/default.png)", ""]
        rows = []
        ev = next((r for r in default["rows"] if r["name"] == "eval"), None)
        for r in default["rows"]:
            rows.append([r["name"], _mib(r["saved_bytes"]), _mib(r["peak_bytes"]),
                         f"{r['peak_bytes'] / ev['peak_bytes']:.2f}" if ev else "-", f"{r['median_s'] * 1e3:.0f}",
                         _ratio(r["time_ratio_vs_eval"]),
                         f"{r['err_out_vs_eval']:.0e} / {r['err_grad_input_vs_eval']:.0e}"])
        parts += [_table(["mode", "saved MiB", "peak MiB", "peak / eval", "step ms", "time / eval (IQR)",
                          "err vs eval: out / dL/dx"], rows), "",
                  "Errors are max|a-b|/max|b| in float32. Train uses batch statistics (a different function). The "
                  "dL/dx error of tune and deploy is float32 round-off amplified where a ReLU input sits next to 0 "
                  "in a 50-layer net (the two fold the BN alike and agree with each other; in float64 tune == eval "
                  "to ~1e-15, see tests/test_monai.py).", ""]

    bench = _load(d, "bench.json")
    if bench:
        c = bench["config"]
        parts += ["## Table 6 / Figure 3: memory and time vs batch size and input size "
                  "(`python -m experiments sweep`)", "",
                  f"{c['model']}, {c['dtype']}, {c['rounds']} rounds after {c['warmup']} warm-up per point, "
                  f"{bench.get('threads', '?')} thread(s). ![bench](results/bench.png)", ""]
        by: Dict[Any, Dict[str, Any]] = {}
        for r in bench["records"]:
            by.setdefault((r["batch_size"], r["input_size"]), {})[r["mode"]] = r
        modes = bench["modes"]
        rows = []
        for (b, sz), rs in by.items():
            row = [b, sz] + [_mib(rs[m]["peak_bytes"]) for m in modes]
            if "eval" in rs and "tune" in rs:
                row += [f"{rs['tune']['peak_bytes'] / rs['eval']['peak_bytes']:.2f}",
                        _ratio(rs["tune"]["time_ratio_vs_eval"])]
                row += [f"{rs['deploy']['peak_bytes'] / rs['eval']['peak_bytes']:.2f}" if "deploy" in rs else "-",
                        _ratio(rs["deploy"]["time_ratio_vs_eval"]) if "deploy" in rs else "-"]
            rows.append(row)
        parts += ["Ours (peak MiB per mode; ratios vs eval):", "",
                  _table(["batch", "input"] + [f"{m} peak MiB" for m in modes] +
                         ["tune/eval peak", "tune/eval time", "deploy/eval peak", "deploy/eval time"], rows), "",
                  "Paper Table 6 (ResNet-50, GPU, 2-D):", "",
                  _table(["batch", "input", "eval GB", "tune GB", "deploy GB", "tune/eval mem", "tune/eval time",
                          "deploy/eval mem", "deploy/eval time"],
                         [[b, i, eg, tg, dg, f"{tg / eg:.2f}", f"{ts / es:.2f}", f"{dg / eg:.2f}", f"{ds / es:.2f}"]
                          for b, i, es, eg, ts, tg, ds, dg in PAPER_TABLE6]), ""]

    transfer = _load(d, "transfer.json")
    if transfer:
        c = transfer["config"]
        parts += ["## Table 3 / Table 7: transfer learning in four modes (`python -m experiments transfer`)", "",
                  f"Pretrained MobileNetV2 (torchvision ImageNet weights, offline) fine-tuned on scikit-learn digits "
                  f"({transfer['data']['train']} train / {transfer['data']['test']} test, {c['image_size']} px), "
                  f"{len(c['seeds'])} seeds, {c['iterations']} SGD iterations of batch {c['batch_size']}, momentum "
                  f"{c['momentum']}, weight decay {c['weight_decay']}, lr {c['lr']} (head {c['head_lr']}), warm-up + "
                  f"cosine; all modes trained interleaved on the same batches and dropout masks. "
                  f"![transfer](results/transfer.png)", ""]
        ev = transfer["modes"].get("eval")
        rows = []
        for m, s in transfer["modes"].items():
            rows.append([m, f"{s['acc_mean'] * 100:.2f} ± {s['acc_std'] * 100:.2f}",
                         " / ".join(f"{a * 100:.1f}" for a in s["accuracies"]),
                         _mib(s["peak_bytes_max"]) if s["peak_bytes_max"] else "-",
                         f"{s['peak_bytes_max'] / ev['peak_bytes_max']:.2f}" if ev else "-",
                         f"{s['time_per_iter_median_s'] * 1e3:.0f}", _ratio(s["time_ratio_vs_eval"]),
                         s["runs_diverged"]])
        parts += [_table(["mode", "test acc % (mean ± std)", "per seed", "peak MiB", "peak / eval", "ms / iter",
                          "time / eval (IQR)", "runs diverged"], rows), ""]
        ms = transfer["modes"]
        if all(k in ms for k in ("eval", "tune", "deploy")):
            e, t, dp = (ms[k]["acc_mean"] * 100 for k in ("eval", "tune", "deploy"))
            es = max(ms["eval"]["acc_std"], ms["tune"]["acc_std"]) * 100
            parts += [f"Against the paper's shape: Tune − Eval = {t - e:+.2f} points (seed std up to {es:.2f}); "
                      f"Deploy − Eval = {dp - e:+.2f} points ("
                      + ("Deploy clearly worse, as in the paper" if dp < e - 2 * max(es, 0.5) else
                         "Deploy is *not* worse here, unlike the paper's ResNet-50 runs") +
                      f"); Tune peak memory {ms['tune']['peak_bytes_max'] / ms['eval']['peak_bytes_max']:.2f}x and "
                      f"time {ms['tune']['time_ratio_vs_eval']['median']:.2f}x Eval's. Eval and Tune compute the "
                      f"same function and gradients, but their float32 round-off differs; over hundreds of SGD steps "
                      f"with frozen BN statistics the trajectories drift apart (parameter differences below), so "
                      f"per-seed accuracies differ by run-to-run noise, not systematically.", ""]
        if transfer.get("tune_vs_eval_max_param_diff"):
            parts += ["Max |eval − tune| over all parameters after training, per seed: " +
                      ", ".join(f"{v:.1e}" for v in transfer["tune_vs_eval_max_param_diff"]) + ".", ""]
        b = transfer.get("backbone_bn_scale")
        if b:
            parts += [f"Backbone γ/√(σ²+ε): median {b['median']:.2f}, min {b['min']:.3f}, max {b['max']:.1f}, "
                      f"{b['share_below_1'] * 100:.0f}% below 1.", ""]
        rows = [[ds, m, a, g, t] for ds, ms in PAPER_TABLE7.items() for m, (a, g, t) in ms.items()]
        parts += ["Paper Table 7 (ResNet-50, TLlib, GPU):", "",
                  _table(["dataset", "mode", "accuracy %", "memory GB", "s / iter"], rows), ""]

    adv = _load(d, "adversarial.json")
    if adv:
        c = adv["config"]
        parts += ["## Table 10: adversarial example generation, eval vs tune (`python -m experiments adversarial`)", "",
                  f"Batch {c['batch_size']}, {c['input_size']} px, {c['dtype']}, PGD {c['steps']} steps "
                  f"(eps {c['eps']:.4f}, alpha {c['alpha']:.4f}), {c['rounds']} interleaved rounds of one step "
                  f"(forward + backward to the input). Equality: FGSM and PGD examples compared element-wise in "
                  f"float64 (tolerance {c['tol']:g}). ![adversarial](results/adversarial.png)", ""]
        rows = []
        for r in adv["rows"]:
            dt = c["dtype"]
            p32 = r[f"pgd_{dt}"]
            rows.append([r["model"], f"{r['blocks']['converted']}/{sum(r['blocks'].values())}",
                         _mib(r["eval"]["peak_bytes"]), _mib(r["tune"]["peak_bytes"]),
                         f"{r['peak_ratio_tune_vs_eval']:.2f}", f"{r['eval']['median_s'] * 1e3:.0f}",
                         f"{r['tune']['median_s'] * 1e3:.0f}", _ratio(r["time_ratio_tune_vs_eval"]),
                         f"{r['pgd']['max_abs_diff']:.0e}",
                         "yes" if r["pgd"]["identical_within_tol"] and r["fgsm"]["identical_within_tol"] else "NO",
                         f"{100 * p32['elements_differing'] / p32['elements']:.2f}%"])
        parts += [_table(["model", "tuned / BNs", "eval peak MiB", "tune peak MiB", "tune/eval peak", "eval ms",
                          "tune ms", "tune/eval time (IQR)", "PGD max diff (f64)", "identical (f64)",
                          f"PGD elements differing ({c['dtype']})"], rows), "",
                  "In float32 both modes round differently (~1e-6); PGD's sign steps turn the few gradient entries "
                  "that straddle 0 into different examples, and the trajectories then drift apart — so the "
                  "float32 column counts elements, while the float64 check shows the two modes compute the same "
                  "thing.", "",
                  "Paper Table 10 (GPU):", "",
                  _table(["arch", "batch", "eval s", "tune s", "tune/eval time", "eval GB", "tune GB", "tune/eval mem"],
                         [[a, b, es, ts, f"{ts / es:.2f}", eg, tg, f"{tg / eg:.2f}"]
                          for a, b, es, ts, eg, tg in PAPER_TABLE10]), ""]

    files = sorted(os.listdir(d)) if os.path.isdir(d) else []
    insp = [f for f in files if f.startswith("inspect_") and f.endswith(".json")]
    if insp:
        parts += ["## Figure 2a and Appendix M (`python -m experiments appendix-m`)", "",
                  "Paper Fig. 2a: the scaling coefficients γ/√(σ²+ε) of pretrained backbones range from about 0 to 30. "
                  "Appendix M: per block, Eval saves X and Y, Tune saves X and w', so Tune saves |Y| − |w'|. convbn's "
                  "Tune rebuilds w' in backward instead of keeping it, so it saves |Y|; *measured* = bytes saved for "
                  "backward with the whole model in eval minus the same with that one block in tune.", ""]
        rows = []
        for f in insp:
            r = _load(d, f)
            s = r["scales"]["summary"]
            t = r.get("appendix_m", {}).get("total")
            stem = f[:-5]
            rows.append([r["model"], "x".join(map(str, r["input_shape"])),
                         f"{s['min']:.3f} / {s['median']:.2f} / {s['max']:.1f}",
                         f"{s['share_below_1'] * 100:.0f}% / {s['share_above_10'] * 100:.1f}%",
                         "synthetic (calibrated)" if r["notes"] else "pretrained",
                         _mib(t["predicted_paper_bytes"]) if t else "-",
                         _mib(t["predicted_convbn_bytes"]) if t else "-",
                         _mib(t["measured_saving_bytes"]) if t else "-",
                         f"[hist](results/{stem}_scales.png), [App. M](results/{stem}_appendix_m.png)"])
        parts += [_table(["model", "input", "γ/√(σ²+ε) min / median / max", "< 1 / > 10", "BN statistics",
                          "predicted App. M MiB", "predicted convbn MiB", "measured MiB", "plots"], rows), ""]
    if env:
        parts += ["## Machine", "", ", ".join(f"{k}: {v}" for k, v in env.items()), ""]
    return "\n".join(parts)


if __name__ == "__main__":
    print(render(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results"))

"""Pairs an `agpt bench ops --json` file with the PyTorch peer's (bench/peers/torch_ops.py) and prints the
table of ratios: speedup = torch time / agpt time (> 1: agpt is faster), and each side's fraction of its own
measured limit. Also writes the table as markdown when --md is given.

    python3 bench/compare.py agpt.json torch.json [--md table.md]
"""
import json
import sys


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    md_path = sys.argv[sys.argv.index("--md") + 1] if "--md" in sys.argv else None
    if md_path in args:
        args.remove(md_path)
    ours, peer = (json.load(open(p)) for p in args[:2])
    if ours.get("bench") == "vit":
        return compare_vit(ours, peer, md_path)
    if ours.get("bench") == "llama":
        return compare_llama(ours, peer, md_path)
    if ours.get("bench") == "detect":
        return compare_detect(ours, peer, md_path)
    by_name = {op["name"]: op for op in peer["ops"]}
    head = f"| op | agpt us | torch us | speedup | agpt fraction | torch fraction |\n|---|---:|---:|---:|---:|---:|"
    rows = []
    for op in ours["ops"]:
        p = by_name.get(op["name"])
        if not p:
            continue
        rows.append(f"| {op['name']} | {op['us']:.1f} | {p['us']:.1f} | {p['us'] / op['us']:.2f} | "
                    f"{op['fraction']:.2f} of {op['of']} | {p['fraction']:.2f} of {p['of']} |")
    title = (f"agpt vs {peer.get('peer', 'torch')} on {ours.get('gpu') or ours['device']} ({ours['dtype']}); "
             f"copy {ours['copy_gbps']:.0f} GB/s, matmul {ours['matmul_tflops']:.2f} TFLOP/s")
    text = "\n".join([title, "", head] + rows)
    print(text)
    if md_path:
        with open(md_path, "w") as f:
            f.write(text + "\n")


def compare_vit(ours, peer, md_path):
    """Images/s per batch size, agpt's fraction of its measured matmul rate, and the speedup over PyTorch."""
    by_batch = {r["batch"]: r for r in peer["runs"]}
    lines = [f"ImageBind-H vision ({ours['layers']} blocks, {ours['dtype']}, {ours['device']}, "
             f"{ours['threads']} threads): {ours['gflop_per_image']:.0f} GFLOP/image, matmul rate "
             f"{ours['matmul_tflops']:.3f} TFLOP/s", "",
             "| batch | agpt images/s | torch images/s | speedup | agpt fraction of matmul |", "|---:|---:|---:|---:|---:|"]
    for r in ours["runs"]:
        p = by_batch.get(r["batch"])
        if p:
            lines.append(f"| {r['batch']} | {r['images_per_s']:.2f} | {p['images_per_s']:.2f} | "
                         f"{r['images_per_s'] / p['images_per_s']:.2f} | {r['fraction']:.2f} |")
    text = "\n".join(lines)
    print(text)
    if md_path:
        with open(md_path, "w") as f:
            f.write(text + "\n")


def compare_llama(ours, peer, md_path):
    """Prefill and decode tokens/s per batch size, agpt's fractions of its measured limits (matmul for the prefill,
    copy for the decode), and the speedup over PyTorch (HF transformers) at the same layer count."""
    by_batch = {r["batch"]: r for r in peer["runs"]}
    scaled = ours["layers"] != 32
    weights = ours.get("weight_dtype", ours["dtype"])
    lines = [f"LLaMA-7B shapes ({ours['layers']} of 32 layers, {ours['dtype']}, weight matrices {weights}, "
             f"{ours['device']}, {ours['threads']} threads; torch: {peer.get('layers')} layers, {peer.get('dtype')}, "
             f"{peer.get('threads')} threads): prompt {ours['prompt']} "
             f"tokens, {ours['decode_steps']} decode steps; matmul {ours['matmul_tflops']:.3f} TFLOP/s, copy "
             f"{ours['copy_gbps']:.1f} GB/s", "",
             "| batch | agpt prefill tok/s | torch prefill tok/s | speedup | agpt fraction of matmul | "
             "agpt decode tok/s | torch decode tok/s | speedup | agpt fraction of copy |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in ours["runs"]:
        p = by_batch.get(r["batch"])
        if p:
            lines.append(f"| {r['batch']} | {r['prefill_tokens_per_s']:.1f} | {p['prefill_tokens_per_s']:.1f} | "
                         f"{r['prefill_tokens_per_s'] / p['prefill_tokens_per_s']:.2f} | {r['prefill_fraction']:.2f} | "
                         f"{r['decode_tokens_per_s']:.2f} | {p['decode_tokens_per_s']:.2f} | "
                         f"{r['decode_tokens_per_s'] / p['decode_tokens_per_s']:.2f} | {r['decode_fraction']:.2f} |")
    if ours["layers"] != peer.get("layers"):
        lines += ["", f"WARNING: agpt ran {ours['layers']} layers and torch {peer.get('layers')}: the speedups compare "
                  "different models"]
    if scaled:
        lines += ["", f"tokens/s at {ours['layers']} layers as measured; agpt scaled to 32 layers (by FLOPs and "
                  "bytes, not measured): " + ", ".join(
                      f"batch {r['batch']}: prefill {r['prefill_tokens_per_s_32_layers_scaled']:.1f}, decode "
                      f"{r['decode_tokens_per_s_32_layers_scaled']:.2f} tok/s" for r in ours["runs"])]
    text = "\n".join(lines)
    print(text)
    if md_path:
        with open(md_path, "w") as f:
            f.write(text + "\n")


def compare_detect(ours, peer, md_path):
    """End-to-end inspections/s per mode (verdict-only, full answer) against the official per-image PyTorch pipeline
    (bench/peers/torch_anomalygpt.py), with each side's ms per stage. Target (issue 6): full answers >= 20x."""
    by_mode = {r["mode"]: r for r in peer["runs"]}
    size = (f"vision {ours['vision_layers']} x {ours['vision_width']}, LLM {ours['llm_layers']} x {ours['llm_width']}, "
            f"LLM input {ours['prefix_tokens']} rows")
    lines = [f"AnomalyGPT end to end, one image at a time, random weights ({size}; {ours['dtype']}, {ours['device']}, "
             f"{ours['threads']} threads; torch: {peer.get('dtype')}, {peer.get('threads')} threads"
             f"{', text features per image' if peer.get('text_per_image') else ''})", "",
             "| mode | new tokens | agpt inspections/s | torch inspections/s | speedup | agpt vision / prefill / decode ms "
             "| torch vision / prefill / decode ms |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in ours["runs"]:
        p = by_mode.get(r["mode"])
        if p:
            lines.append(f"| {r['mode']} | {r['new_tokens']} | {r['inspections_per_s']:.3f} | "
                         f"{p['inspections_per_s']:.3f} | {r['inspections_per_s'] / p['inspections_per_s']:.2f} | "
                         f"{r['vision_ms']:.2f} / {r['prefill_ms']:.2f} / {r['decode_ms']:.2f} | "
                         f"{p['vision_ms']:.2f} / {p['prefill_ms']:.2f} / {p['decode_ms']:.2f} |")
            if p["new_tokens"] != r["new_tokens"]:
                lines.append(f"WARNING: {r['mode']}: torch generated {p['new_tokens']} tokens")
    differs = [k for k in ("vision_layers", "vision_width", "llm_layers", "llm_width", "prefix_tokens")
               if ours.get(k) != peer.get(k)]
    if differs:
        lines += ["", "WARNING: the two sides differ in " + ", ".join(
            f"{k} ({ours.get(k)} vs {peer.get(k)})" for k in differs) + ": the speedups compare different work"]
    text = "\n".join(lines)
    print(text)
    if md_path:
        with open(md_path, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()

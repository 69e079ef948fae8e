"""Does each few-shot example pay for its tokens? The same demo build, side by side in one run,
with the built-in few-shot turns and with each example of the annotation and critique prompts
left out (a prompt folder overriding `*.examples.jsonl`, `annotate.prompts` in ratchet.toml).

For each variant: build seconds, prompt tokens and the share served from a cached prefix,
tokens evaluated, annotations accepted, reflections kept (in the sft split) and the panel's
mean score. An example pays when leaving it out costs kept reflections or score more than it
saves in time. Few passages make these figures noisy: read a difference of one or two kept
reflections as nothing.

Usage: python bench/fewshot.py [--passages 10] [--results fewshot.json]
       python bench/fewshot.py --passages 30 --only "annotate: without example 2"
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ROOT / "prompts"


def examples(name: str) -> list[str]:
    return [line for line in (PROMPTS / name).read_text().splitlines() if line.strip()]


def variants() -> dict[str, dict[str, list[str]]]:
    """Variant name -> {examples file: the lines it keeps}; {} is the built-in prompts."""
    out: dict[str, dict[str, list[str]]] = {"built-in (all examples)": {}}
    for task in ("annotate", "critique"):
        lines = examples(f"{task}.examples.jsonl")
        for i in range(len(lines)):
            out[f"{task}: without example {i + 1}"] = {f"{task}.examples.jsonl": lines[:i] + lines[i + 1:]}
        out[f"{task}: no examples"] = {f"{task}.examples.jsonl": []}
    return out


def workspace(root: Path, passages: int | None = None, overrides: dict[str, list[str]] | None = None) -> Path:
    """A fresh `make demo` workspace: its first `passages` sample passages (None: all), with
    `overrides` as a prompt folder over the built-in prompts."""
    ratchet = Path(sys.executable).with_name("ratchet")
    subprocess.run([str(ratchet), "init", str(root), "--example"], check=True, stdout=subprocess.DEVNULL)
    if passages is not None:
        corpus = root / "corpus" / "passages.jsonl"
        corpus.write_text("\n".join(corpus.read_text().splitlines()[:passages]) + "\n")
    if overrides:
        folder = root / "prompts-variant"
        folder.mkdir()
        for name, lines in overrides.items():
            (folder / name).write_text("".join(line + "\n" for line in lines))
        config = root / "ratchet.toml"
        config.write_text(re.sub(r'(?m)^prompts = ""$', 'prompts = "prompts-variant"', config.read_text(), count=1))
    return root


def build(root: Path) -> dict:
    ratchet = Path(sys.executable).with_name("ratchet")
    start = time.perf_counter()
    subprocess.run([str(ratchet), "build", "--workspace", str(root)], check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    manifest = json.loads((root / "generations" / "gen-0001" / "manifest.json").read_text())
    m, counts = manifest["metrics"], manifest["counts"]
    history = (m.get("ratchet") or {}).get("history") or [{}]
    prompt, cached = m["prompt_tokens"], m["cached_prompt_tokens"]
    return {"wall_s": round(wall, 1), "build_s": m["seconds"], "calls": m["model_calls"], "prompt_tokens": prompt,
            "cached_share": round(cached / prompt, 3) if prompt else None,
            "evaluated": prompt - cached + m["completion_tokens"], "completion": m["completion_tokens"],
            "accepted": counts["annotations_accepted"], "rejected": counts["annotations_rejected"],
            "kept": counts["reflections"], "panel_score": history[-1].get("mean_score")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passages", type=int, default=10)
    parser.add_argument("--results", type=Path)
    parser.add_argument("--only", default="", help="comma-separated variant names to run (the built-in is always run)")
    args = parser.parse_args()
    chosen = {"built-in (all examples)", *filter(None, args.only.split(","))}
    base = Path(tempfile.mkdtemp(prefix="fewshot-"))
    results = {}
    for i, (name, overrides) in enumerate(variants().items()):
        if args.only and name not in chosen:
            continue
        results[name] = build(workspace(base / f"v{i}", args.passages, overrides))
        print(f"{name}: {results[name]}", flush=True)
    ref = results["built-in (all examples)"]
    print(f"\n{args.passages} passages, the default ensemble, one build per variant:\n")
    print("| variant | build s | × built-in | prompt tokens | from cache | evaluated | accepted | kept | panel score |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        score = "n/a" if r["panel_score"] is None else f"{r['panel_score']:.3f}"
        print(f"| {name} | {r['build_s']:.0f} | {r['build_s'] / ref['build_s']:.2f} | {r['prompt_tokens']:,} | "
              f"{r['cached_share']:.0%} | {r['evaluated']:,} | {r['accepted']} | {r['kept']} | {score} |")
    if args.results:
        args.results.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Compile: the workspace state of one generation in, `generations/gen-NNNN/` out.

Splits are parquet under data/ (the Hub layout, so `datasets.load_dataset(DIR, "sft")`
works), beside manifest.json and the dataset card. The folder is written to a temporary
name and renamed into place, so a stopped compile never leaves half a generation.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path

import jinja2
import pyarrow as pa
import pyarrow.parquet as pq

from .cache import sha256
from .prompts import Prompts
from .resources import CARDS_DIR, SCHEMAS_DIR
from .workspace import Workspace

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
SFT_SCHEMA = pa.schema([
    ("id", pa.string()), ("source", pa.string()), ("generation", pa.int32()),
    ("messages", pa.list_(MESSAGE)), ("text", pa.string()), ("n_reflections", pa.int32())])
CLAIM = pa.struct([("claim", pa.string()), ("kind", pa.string()), ("support", pa.string()), ("confidence", pa.string())])
CRITIQUE = pa.struct([("critic", pa.string()), ("verdict", pa.string()), ("claim_verdicts", pa.list_(pa.string())),
                      ("objections", pa.list_(pa.string())), ("weight", pa.float64())])
ANNOTATION_SCHEMA = pa.schema([
    ("passage_id", pa.string()), ("generation", pa.int32()), ("annotator", pa.string()), ("status", pa.string()),
    ("reason", pa.string()), ("attempts", pa.int32()), ("passage", pa.string()), ("claims", pa.list_(CLAIM)),
    ("weak_reasoning", pa.list_(pa.string())), ("uncertainties", pa.list_(pa.string())),
    ("ethical_stakes", pa.list_(pa.string())), ("reflection", pa.string()),
    ("convergence", pa.float64()), ("selected", pa.bool_()), ("vetoed", pa.bool_()), ("critiques", pa.list_(CRITIQUE))])
# TRL's conversational preference format (prompt / chosen / rejected as message lists), plus
# where each pair came from and why the frozen judge preferred one side.
DPO_SCHEMA = pa.schema([
    ("id", pa.string()), ("source", pa.string()), ("generation", pa.int32()),
    ("prompt", pa.list_(MESSAGE)), ("chosen", pa.list_(MESSAGE)), ("rejected", pa.list_(MESSAGE)),
    ("framework", pa.string()), ("judge", pa.string()), ("label", pa.string()),
    ("reasons", pa.list_(pa.string())), ("chosen_label", pa.string()), ("chosen_reasons", pa.list_(pa.string()))])

# An example a consent judge vetoed in this generation (split, example id bound as ?).
VETOED = "EXISTS (SELECT 1 FROM consents c WHERE c.generation = {g} AND c.split = '{split}' AND c.example_id = {id} AND c.veto)"


def flat_text(messages: list[dict]) -> str:
    """The `text` column: every turn between explicit markers, for trainers without chat templates."""
    return "\n".join(f"<{m['role']}>\n{m['content']}\n</{m['role']}>" for m in messages)


def sft_rows(con, generation: int, prompts: Prompts) -> list[dict]:
    """One example per source record: its passages in order, each followed by the reflection
    it kept after convergence, unless a consent judge vetoed it (a passage that kept none
    stands alone)."""
    vetoed = VETOED.format(g="g.generation", split="sft", id="g.passage_id")
    rows = con.execute(f"""
        SELECT g.source, g.position, p.passage_id, p.text, a.record
        FROM generation_passages g JOIN passages p USING (passage_id)
        LEFT JOIN selections s ON s.generation = g.generation AND s.passage_id = g.passage_id AND NOT {vetoed}
        LEFT JOIN annotations a ON a.generation = g.generation AND a.passage_id = g.passage_id AND a.annotator = s.annotator
        WHERE g.generation = ? ORDER BY g.ord""", [generation]).fetchall()
    documents: dict[str, list] = {}
    for source, _position, pid, text, record in rows:
        documents.setdefault(source, []).append((pid, text, record))
    out = []
    for source, parts in documents.items():
        messages = []
        for _pid, text, record in parts:
            messages.append({"role": "text", "content": text})
            if record is not None:
                messages.append({"role": "internal", "content": prompts.reflection(json.loads(record))})
        n = sum(m["role"] == "internal" for m in messages)
        if n == 0:
            continue  # nothing to learn from a document without a single kept reflection
        doc_id = hashlib.sha256("".join(pid for pid, _, _ in parts).encode()).hexdigest()[:16]
        out.append({"id": doc_id, "source": source, "generation": generation, "messages": messages,
                    "text": flat_text(messages), "n_reflections": n})
    return sorted(out, key=lambda r: r["id"])


def annotation_rows(con, generation: int) -> list[dict]:
    """Every annotation of every member, with its convergence score and its critics' verdicts."""
    vetoed = VETOED.format(g="a.generation", split="sft", id="a.passage_id")
    rows = con.execute("""
        SELECT a.passage_id, a.annotator, a.status, a.reason, a.attempts, p.text, a.record, v.score,
               coalesce(v.selected, false), coalesce(v.selected, false) AND VETOED,
               list({'critic': c.critic, 'verdict': c.verdict, 'claim_verdicts': c.claim_verdicts::VARCHAR,
                     'objections': c.objections::VARCHAR, 'weight': c.weight} ORDER BY c.critic)
                   FILTER (c.critic IS NOT NULL AND c.status = 'accepted')
        FROM annotations a JOIN passages p USING (passage_id)
        LEFT JOIN convergence v ON v.generation = a.generation AND v.passage_id = a.passage_id AND v.annotator = a.annotator
        LEFT JOIN critiques c ON c.generation = a.generation AND c.passage_id = a.passage_id AND c.annotator = a.annotator
        WHERE a.generation = ? GROUP BY ALL ORDER BY a.passage_id, a.annotator""".replace("VETOED", vetoed), [generation]).fetchall()
    out = []
    for pid, annotator, status, reason, attempts, text, record, score, selected, vetoed, critiques in rows:
        rec = json.loads(record) if record else {}
        critiques = [{**c, "claim_verdicts": json.loads(c["claim_verdicts"]), "objections": json.loads(c["objections"])}
                     for c in critiques or []]
        out.append({"passage_id": pid, "generation": generation, "annotator": annotator, "status": status,
                    "reason": reason, "attempts": attempts, "passage": text, "claims": rec.get("claims"),
                    "weak_reasoning": rec.get("weak_reasoning"), "uncertainties": rec.get("uncertainties"),
                    "ethical_stakes": rec.get("ethical_stakes"), "reflection": rec.get("reflection"),
                    "convergence": score, "selected": selected, "vetoed": vetoed, "critiques": critiques})
    return out


def dpo_rows(con, generation: int) -> list[dict]:
    """Every pair whose rewrite the frozen judge found ethical, unless a consent judge vetoed it."""
    vetoed = VETOED.format(g="p.generation", split="dpo", id="p.item_id || ':' || p.framework")
    rows = con.execute(f"""
        SELECT p.item_id, i.source, p.framework, p.judge, p.prompt, p.chosen, p.rejected, p.reasons, p.chosen_reasons
        FROM pairs p JOIN conscience_items i USING (generation, item_id)
        WHERE p.generation = ? AND p.kept AND NOT {vetoed} ORDER BY p.item_id, p.framework""", [generation]).fetchall()
    return [{"id": f"{item_id}:{framework}", "source": source, "generation": generation,
             "prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": chosen}],
             "rejected": [{"role": "assistant", "content": rejected}], "framework": framework, "judge": judge,
             "label": "unethical", "reasons": json.loads(reasons), "chosen_label": "ethical",
             "chosen_reasons": json.loads(chosen_reasons)}
            for item_id, source, framework, judge, prompt, chosen, rejected, reasons, chosen_reasons in rows]


def write_split(rows: list[dict], schema: pa.Schema, folder: Path, split: str) -> str:
    """Write one split as data/{split}-{sha12}.parquet and return its relative path.

    Fixed schema, sorted rows and no timestamps: the same inputs give byte-identical files.
    The name carries the content hash because `datasets` caches a local folder by its name
    and its relative data_files alone: two workspaces' gen-0001/data/sft.parquet would share
    one cache entry and `load_dataset` would return the other one's rows."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), sink, compression="zstd", store_schema=True)
    data = sink.getvalue().to_pybytes()
    name = f"data/{split}-{hashlib.sha256(data).hexdigest()[:12]}.parquet"
    (folder / name).write_bytes(data)
    return name


def split_path(generation_dir: Path, split: str) -> Path:
    """Where a compiled generation keeps one split (the manifest names it)."""
    manifest = json.loads((Path(generation_dir) / "manifest.json").read_text(encoding="utf-8"))
    return Path(generation_dir) / manifest["splits"][split]


def size_category(n: int) -> str:
    for limit, name in [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")]:
        if n < limit:
            return name
    return "n>1M"


def render_card(manifest: dict, template: str = "generation.md.jinja") -> str:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(CARDS_DIR)), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True)
    return env.get_template(template).render(m=manifest, size_category=size_category(manifest["counts"]["sft_examples"]))


def compile_generation(ws: Workspace, con, generation: int, prompts: Prompts, models: dict[str, dict],
                       metrics: dict) -> Path:
    sft = sft_rows(con, generation, prompts)
    annotations = annotation_rows(con, generation)
    dpo = dpo_rows(con, generation)
    vetoes = dict(con.execute("SELECT split, count(DISTINCT example_id) FROM consents WHERE generation = ? AND veto "
                              "GROUP BY split", [generation]).fetchall())
    config = ws.config.model_dump()
    manifest = {
        "generation": generation,
        "name": ws.root.name,
        "package_version": version("moral-ratchet"),
        "config_hash": sha256(config),
        "config": config,
        "models": models,
        "prompt_hashes": prompts.hashes([m["persona"] for m in models.values() if "persona" in m]),
        "schema_hashes": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(SCHEMAS_DIR.glob("*.json"))},
        "counts": {
            "passages": con.execute("SELECT count(*) FROM generation_passages WHERE generation = ?", [generation]).fetchone()[0],
            "sft_examples": len(sft),
            "reflections": sum(r["n_reflections"] for r in sft),
            "annotations_accepted": sum(a["status"] == "accepted" for a in annotations),
            "annotations_rejected": sum(a["status"] == "rejected" for a in annotations),
            "annotations_selected": sum(a["selected"] for a in annotations),
            "dpo_pairs": len(dpo),
            "vetoed_sft": vetoes.get("sft", 0),
            "vetoed_dpo": vetoes.get("dpo", 0),
        },
        "metrics": metrics,
    }
    final = ws.generation_dir(generation)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        (tmp / "data").mkdir()
        # `datasets` cannot load a split without rows, so an empty split is left out (and the
        # card says so) rather than published as a config that fails to load.
        manifest["splits"] = {name: write_split(rows, schema, tmp, name)
                              for name, rows, schema in [("sft", sft, SFT_SCHEMA), ("dpo", dpo, DPO_SCHEMA),
                                                          ("annotations", annotations, ANNOTATION_SCHEMA)]
                              if rows}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(render_card(manifest), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final

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
import time
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from .cache import sha256
from .prompts import Prompts
from .resources import CARDS_DIR, SCHEMAS_DIR
from .stages.audit import REPUTATION_SQL
from .stages.base import BuildContext, Stage

if TYPE_CHECKING:
    from .workspace import Workspace

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
SFT_SCHEMA = pa.schema([
    ("id", pa.string()), ("source", pa.string()), ("generation", pa.int32()),
    ("messages", pa.list_(MESSAGE)), ("text", pa.string()), ("n_reflections", pa.int32())])
CLAIM = pa.struct([("evidence", pa.string()), ("claim", pa.string()), ("kind", pa.string()), ("support", pa.string()),
                   ("confidence", pa.string())])
VERDICT_PROBS = pa.struct([("survives", pa.float64()), ("revise", pa.float64()), ("reject", pa.float64())])
CRITIQUE = pa.struct([("critic", pa.string()), ("verdict", pa.string()), ("claim_verdicts", pa.list_(pa.string())),
                      ("objections", pa.list_(pa.string())), ("weight", pa.float64()),
                      # the verdict as a distribution (raw, calibrated) and its score P(survives) + 0.5 P(revise)
                      ("score", pa.float64()), ("probs", VERDICT_PROBS), ("calibrated", VERDICT_PROBS),
                      ("method", pa.string())])
# Each claim the model wrote, with the faithfulness gates' verdict (supported | dropped) and why.
CLAIM_CHECK = pa.struct([("evidence", pa.string()), ("claim", pa.string()), ("verdict", pa.string()),
                         ("reason", pa.string()), ("p_unsupported", pa.float64())])
ANNOTATION_SCHEMA = pa.schema([
    ("passage_id", pa.string()), ("generation", pa.int32()), ("annotator", pa.string()), ("status", pa.string()),
    ("reason", pa.string()), ("attempts", pa.int32()), ("passage", pa.string()), ("claims", pa.list_(CLAIM)),
    ("weak_reasoning", pa.list_(pa.string())), ("uncertainties", pa.list_(pa.string())),
    ("ethical_stakes", pa.list_(pa.string())), ("reflection", pa.string()),
    ("convergence", pa.float64()), ("selected", pa.bool_()), ("vetoed", pa.bool_()), ("critiques", pa.list_(CRITIQUE)),
    ("claim_checks", pa.list_(CLAIM_CHECK))])
# TRL's conversational preference format (prompt / chosen / rejected as message lists), plus
# where each pair came from and why the frozen judge preferred one side.
DPO_SCHEMA = pa.schema([
    ("id", pa.string()), ("source", pa.string()), ("generation", pa.int32()),
    ("prompt", pa.list_(MESSAGE)), ("chosen", pa.list_(MESSAGE)), ("rejected", pa.list_(MESSAGE)),
    ("framework", pa.string()), ("judge", pa.string()), ("label", pa.string()),
    ("reasons", pa.list_(pa.string())), ("chosen_label", pa.string()), ("chosen_reasons", pa.list_(pa.string())),
    # the frozen judge's probabilities: P(unethical) of the rejected side, P(ethical) of the chosen one
    ("label_p", pa.float64()), ("chosen_label_p", pa.float64()),
    # does the chosen side answer the request: every rule of builder/pair_checks.py, as run
    ("checks", pa.list_(pa.struct([("rule", pa.string()), ("status", pa.string()), ("why", pa.string())])))])

# Explored trajectories (consent.explored): what the model must learn to predict but never be
# rewarded for producing, spoken by EXPLORER instead of `assistant`/`internal`.
EXPLORER = "Naive_Explorer"
EXPLORED_SCHEMA = pa.schema([
    ("id", pa.string()), ("source", pa.string()), ("generation", pa.int32()), ("messages", pa.list_(MESSAGE)),
    ("origin", pa.string()), ("from_split", pa.string()), ("drift", pa.bool_()), ("judges", pa.list_(pa.string())),
    ("reasons", pa.list_(pa.string()))])

AUDIT_SUMMARY_SCHEMA = pa.schema([
    ("generation", pa.int32()), ("annotator", pa.string()), ("family", pa.string()), ("persona", pa.string()),
    ("accepted", pa.int64()), ("audits", pa.int64()), ("passes", pa.int64()), ("pass_rate", pa.float64()),
    ("reputation", pa.float64())])

ROW_GROUP = 50_000  # rows per parquet row group: fixed, so the same rows give the same bytes

# An example a consent judge vetoed in this generation.
VETOED = "EXISTS (SELECT 1 FROM consents c WHERE c.generation = {g} AND c.split = '{split}' AND c.example_id = {id} AND c.veto)"

# One example per source record: its passages in order, each followed by the reflection the
# ratchet kept for it (this generation's, or one carried forward from a parent); a passage
# without one stands alone, a document without a single reflection is left out. The rows come
# sorted by document and are grouped while streaming: a sort spills to disk, a list aggregate
# over a million documents does not.
SFT_PARTS_SQL = """
SELECT g.source, g.passage_id, p.text, CASE WHEN r.vetoed THEN NULL ELSE r.reflection END AS reflection
FROM generation_passages g JOIN passages p USING (passage_id)
LEFT JOIN ratchet r ON r.generation = g.generation AND r.passage_id = g.passage_id
WHERE g.generation = $g ORDER BY g.source, g.ord"""


def sft_batches(con, generation: int):
    """The sft split as record batches, one row per document, in source order."""
    for rows in grouped_batches(query_batches(con, SFT_PARTS_SQL, generation), ["source"]):
        yield sft_documents(rows, generation)


def sft_documents(rows: pl.DataFrame, generation: int) -> pa.RecordBatch:
    """Whole documents' passage rows -> one sft row per document with a kept reflection:
    its passages in order, each followed by its reflection (columnar: no Python per row)."""
    rows = rows.with_row_index("i")
    turns = pl.concat([
        rows.select("i", "source", sub=pl.lit(0), role=pl.lit("text"), content="text"),
        rows.filter(pl.col("reflection").is_not_null()).select("i", "source", sub=pl.lit(1), role=pl.lit("internal"),
                                                               content="reflection"),
    ]).sort("i", "sub")
    role = pl.col("role")
    documents = turns.group_by("source", maintain_order=True).agg(
        messages=pl.struct("role", "content"),
        # every turn between explicit markers, for trainers without chat templates
        text=pl.concat_str([pl.lit("<"), role, pl.lit(">\n"), pl.col("content"), pl.lit("\n</"), role, pl.lit(">")])
        .str.join("\n"),
        n_reflections=(role == "internal").sum())
    ids = rows.group_by("source", maintain_order=True).agg(pl.col("passage_id").str.join(""))
    documents = documents.with_columns(
        id=pl.Series([hashlib.sha256(joined.encode()).hexdigest()[:16] for joined in ids["passage_id"]]),
        generation=pl.lit(generation))
    # nothing to learn from a document without a single kept reflection
    return to_batch(documents.filter(pl.col("n_reflections") > 0), SFT_SCHEMA)


def grouped_batches(batches, key: list[str]):
    """Record batches of rows sorted by `key` -> polars frames that each hold whole groups (the
    last group of a batch may go on in the next one: it is held back until it is complete)."""
    held = None
    for batch in batches:
        frame = pl.from_arrow(pa.Table.from_batches([batch]))
        if held is not None:
            frame = pl.concat([held, frame])
        if frame.is_empty():
            continue
        last = frame.select(key).row(-1)
        in_last = pl.all_horizontal([pl.col(k).eq_missing(v) for k, v in zip(key, last)])  # NULL == NULL here
        held = frame.filter(in_last)
        if len(held) < len(frame):
            yield frame.filter(~in_last)
    if held is not None and not held.is_empty():
        yield held


def to_batch(frame: pl.DataFrame, schema: pa.Schema) -> pa.RecordBatch:
    table = frame.select(schema.names).to_arrow().cast(schema)
    return table.combine_chunks().to_batches()[0] if table.num_rows else pa.RecordBatch.from_pylist([], schema=schema)


RECORD_TYPE = ('{"claims": [{"evidence": "VARCHAR", "claim": "VARCHAR", "kind": "VARCHAR", "support": "VARCHAR", '
               '"confidence": "VARCHAR"}], '
               '"weak_reasoning": ["VARCHAR"], "uncertainties": ["VARCHAR"], "ethical_stakes": ["VARCHAR"], '
               '"reflection": "VARCHAR"}')

# Every annotation of every member, with its convergence score and its critics' verdicts: one
# row per (annotation, critique), sorted, grouped into one row per annotation while streaming.
ANNOTATIONS_SQL = """
SELECT a.passage_id, a.annotator, a.status, a.reason, a.attempts, p.text AS passage,
       a.rec.claims, a.rec.weak_reasoning, a.rec.uncertainties, a.rec.ethical_stakes, a.rec.reflection,
       from_json(a.claim_checks, '[{"evidence": "VARCHAR", "claim": "VARCHAR", "verdict": "VARCHAR", "reason": "VARCHAR", "p_unsupported": "DOUBLE"}]')
           AS claim_checks,
       v.score AS convergence, coalesce(v.selected, false) AS selected,
       coalesce(v.selected, false) AND VETOED AS vetoed,
       c.critic, c.verdict, from_json(c.claim_verdicts, '["VARCHAR"]') AS claim_verdicts,
       from_json(c.objections, '["VARCHAR"]') AS objections, c.weight, c.score,
       from_json(c.probs, '{"survives": "DOUBLE", "revise": "DOUBLE", "reject": "DOUBLE"}') AS probs,
       from_json(c.calibrated, '{"survives": "DOUBLE", "revise": "DOUBLE", "reject": "DOUBLE"}') AS calibrated,
       c.method
FROM (SELECT *, from_json(record, 'RECORD_TYPE') AS rec FROM annotations WHERE generation = $g) a
JOIN passages p USING (passage_id)
LEFT JOIN convergence v ON v.generation = a.generation AND v.passage_id = a.passage_id AND v.annotator = a.annotator
LEFT JOIN critiques c ON c.generation = a.generation AND c.passage_id = a.passage_id AND c.annotator = a.annotator
     AND c.status = 'accepted'
ORDER BY a.passage_id, a.annotator, c.critic""".replace("RECORD_TYPE", RECORD_TYPE).replace(
    "VETOED", VETOED.format(g="a.generation", split="sft", id="a.passage_id"))
CRITIQUE_FIELDS = ("critic", "verdict", "claim_verdicts", "objections", "weight", "score", "probs", "calibrated",
                   "method")


def annotation_batches(con, generation: int):
    """One row per annotation with its accepted critiques as a list (the query's rows are one per
    (annotation, critique), sorted; an annotation without a critique has one row with NULLs)."""
    key = ["passage_id", "annotator"]
    for rows in grouped_batches(query_batches(con, ANNOTATIONS_SQL, generation), key):
        fields = [c for c in rows.columns if c not in CRITIQUE_FIELDS and c not in key]
        annotations = rows.group_by(key, maintain_order=True).agg(
            *[pl.col(c).first() for c in fields],
            critiques=pl.struct(CRITIQUE_FIELDS).filter(pl.col("critic").is_not_null()))
        yield to_batch(annotations.with_columns(generation=pl.lit(generation)), ANNOTATION_SCHEMA)


# Aggregates of the blind audit per annotator: never which items were audited.
# The build's own audits only (the model auditor's): a person's verdict comes after the build
# that compiles the generation, and must not change its published splits (a rebuild after an
# audit stays a zero-call no-op). People's verdicts: `ratchet audit stats`, the audit page.
AUDIT_SUMMARY_SQL = """
WITH acc AS (SELECT annotator, count(*) AS accepted FROM annotations
             WHERE generation = $g AND status = 'accepted' GROUP BY ALL),
aud AS (SELECT annotator, count(*) AS audits, count(*) FILTER (verdict = 'pass') AS passes
        FROM audits_current WHERE generation = $g AND auditor_kind = 'model' GROUP BY ALL),
rep AS (SELECT annotator, mean FROM (""" + REPUTATION_SQL.replace("list_contains($kinds, auditor_kind)",
                                                                  "auditor_kind = 'model'") + """))
SELECT $g AS generation, acc.annotator, coalesce(m.family, '?') AS family, coalesce(m.persona, '?') AS persona,
       acc.accepted, coalesce(aud.audits, 0) AS audits, coalesce(aud.passes, 0) AS passes,
       round(aud.passes / nullif(aud.audits, 0), 4) AS pass_rate, round(rep.mean, 4) AS reputation
FROM acc LEFT JOIN aud USING (annotator) LEFT JOIN rep USING (annotator) LEFT JOIN members m ON m.name = acc.annotator
ORDER BY acc.annotator"""


def dpo_rows(con, generation: int) -> list[dict]:
    """Every pair whose rewrite the frozen judge found ethical, unless a consent judge vetoed it."""
    vetoed = VETOED.format(g="p.generation", split="dpo", id="p.item_id || ':' || p.framework")
    rows = con.execute(f"""
        SELECT p.item_id, i.source, p.framework, p.judge, p.prompt, p.chosen, p.rejected, p.reasons, p.chosen_reasons,
               p.rejected_p, p.chosen_p, p.checks
        FROM pairs p JOIN conscience_items i USING (generation, item_id)
        WHERE p.generation = ? AND p.kept AND NOT {vetoed} ORDER BY p.item_id, p.framework""", [generation]).fetchall()
    return [{"id": f"{item_id}:{framework}", "source": source, "generation": generation,
             "prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": chosen}],
             "rejected": [{"role": "assistant", "content": rejected}], "framework": framework, "judge": judge,
             "label": "unethical", "reasons": json.loads(reasons), "chosen_label": "ethical",
             "chosen_reasons": json.loads(chosen_reasons), "label_p": rejected_p, "chosen_label_p": chosen_p,
             "checks": json.loads(checks) if checks else None}
            for item_id, source, framework, judge, prompt, chosen, rejected, reasons, chosen_reasons, rejected_p, chosen_p,
            checks in rows]


# Every example a consent judge vetoed: the reflection with its passage (sft), the chosen
# response with its request (dpo); who vetoed it and why, and whether the judges disagreed.
VETOED_EXAMPLES_SQL = """
WITH v AS (SELECT split, example_id, list(judge ORDER BY judge) AS judges,
                  flatten(list(coalesce(from_json(reasons, '["VARCHAR"]'), []) ORDER BY judge)) AS reasons
           FROM consents WHERE generation = $g AND veto GROUP BY ALL),
d AS (SELECT split, example_id FROM drift_events WHERE generation = $g)
SELECT 'sft' AS from_split, v.example_id, a.passage_id AS source, p.text AS context, a.record::VARCHAR AS target,
       v.judges, v.reasons, d.example_id IS NOT NULL AS drift
FROM v JOIN convergence c ON c.generation = $g AND c.passage_id = v.example_id AND c.selected
JOIN annotations a ON a.generation = $g AND a.passage_id = c.passage_id AND a.annotator = c.annotator
JOIN passages p ON p.passage_id = a.passage_id
LEFT JOIN d ON d.split = 'sft' AND d.example_id = v.example_id
WHERE v.split = 'sft'
UNION ALL
SELECT 'dpo', v.example_id, i.source, x.prompt, x.chosen, v.judges, v.reasons, d.example_id IS NOT NULL
FROM v JOIN pairs x ON x.generation = $g AND x.item_id || ':' || x.framework = v.example_id
JOIN conscience_items i ON i.generation = $g AND i.item_id = x.item_id
LEFT JOIN d ON d.split = 'dpo' AND d.example_id = v.example_id
WHERE v.split = 'dpo'
ORDER BY 1, 2"""

# Every response the conscience judge labelled unethical, once per item (each framework that
# labelled it has a row in pairs), with the first framework's reasons.
REJECTED_SQL = """
SELECT x.item_id, i.source, x.prompt, x.rejected, list(x.judge || ' (' || x.framework || ')' ORDER BY x.framework),
       coalesce(from_json(first(x.reasons ORDER BY x.framework), '["VARCHAR"]'), []) AS reasons
FROM pairs x JOIN conscience_items i USING (generation, item_id)
WHERE x.generation = $g GROUP BY ALL ORDER BY x.item_id"""


def explored_rows(con, generation: int, prompts: Prompts, sources) -> list[dict]:
    """The explored split's rows (consent.explored): each a request or passage followed by the
    explored response as a turn spoken by EXPLORER."""
    out = []
    if "vetoed" in sources:
        for from_split, example_id, source, context, target, judges, reasons, drift in con.execute(
                VETOED_EXAMPLES_SQL, {"g": generation}).fetchall():
            first, response = (("text", prompts.reflection(json.loads(target))) if from_split == "sft"
                               else ("user", target))
            out.append({"id": f"vetoed:{from_split}:{example_id}", "source": source, "generation": generation,
                        "messages": [{"role": first, "content": context}, {"role": EXPLORER, "content": response}],
                        "origin": "vetoed", "from_split": from_split, "drift": drift, "judges": judges,
                        "reasons": reasons})
    if "rejected" in sources:
        for item_id, source, prompt, rejected, judges, reasons in con.execute(REJECTED_SQL, {"g": generation}).fetchall():
            out.append({"id": f"rejected:{item_id}", "source": source, "generation": generation,
                        "messages": [{"role": "user", "content": prompt}, {"role": EXPLORER, "content": rejected}],
                        "origin": "rejected", "from_split": "dpo", "drift": False, "judges": judges,
                        "reasons": reasons})
    return out


def write_parquet(batches, schema: pa.Schema, path: Path) -> int:
    """Stream record batches into one parquet file in row groups of exactly ROW_GROUP rows.

    Fixed schema, ordered rows, fixed row groups and no timestamps: the same rows give
    byte-identical files, however the batches arrive, and memory stays at one row group."""
    rows, pending = 0, []
    with pq.ParquetWriter(path, schema, compression="zstd", store_schema=True) as writer:
        def flush(table: pa.Table) -> None:
            writer.write_table(table.combine_chunks(), row_group_size=ROW_GROUP)

        buffered = 0
        for batch in batches:
            if batch.num_rows == 0:
                continue
            pending.append(pa.Table.from_batches([batch]).cast(schema))
            buffered += batch.num_rows
            while buffered >= ROW_GROUP:
                table = pa.concat_tables(pending)
                flush(table.slice(0, ROW_GROUP))
                pending, buffered = [table.slice(ROW_GROUP)], buffered - ROW_GROUP
                rows += ROW_GROUP
        if buffered:
            flush(pa.concat_tables(pending))
            rows += buffered
    return rows


def write_split(source, schema: pa.Schema, folder: Path, split: str) -> tuple[str | None, int]:
    """Write one split as data/{split}-{sha12}.parquet; returns (relative path, rows), or
    (None, 0) for a split without rows: `datasets` cannot load one, so it is left out.

    `source` is a list of dicts or an iterator of record batches. The name carries the
    content hash because `datasets` caches a local folder by its name and its relative
    data_files alone: two workspaces' gen-0001/data/sft.parquet would share one cache entry
    and `load_dataset` would return the other one's rows."""
    if isinstance(source, list):
        source = pa.Table.from_pylist(source, schema=schema).to_batches()
    tmp = folder / "data" / f".{split}.parquet"
    rows = write_parquet(source, schema, tmp)
    if rows == 0:
        tmp.unlink()
        return None, 0
    digest = hashlib.sha256()
    with open(tmp, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    name = f"data/{split}-{digest.hexdigest()[:12]}.parquet"
    tmp.rename(folder / name)
    return name, rows


def query_batches(con, sql: str, generation: int, rows: int = 10_000):
    """The query's rows as record batches, run only when iterated: a DuckDB connection holds
    one open result, so each split's query must start after the previous one finished."""
    yield from con.sql(sql, params={"g": generation}).to_arrow_reader(rows)


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


class GenerationImmutable(Exception):
    """A compiled generation asked to change: generations are immutable once compiled."""


def schema_hashes() -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(SCHEMAS_DIR.glob("*.json"))}


def compiled_manifest(folder: Path) -> dict | None:
    path = Path(folder) / "manifest.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
    except (OSError, json.JSONDecodeError):
        return None


def changed_files(manifest: dict, prompts: Prompts, cfg) -> list[str]:
    """The prompt and schema files whose content differs from what a compiled generation was
    built with (or that one of them lacks): a rebuild would ask the models other questions."""
    personas = [m.persona for m in cfg.ensemble.members if m.kind == "model"]
    now = {**prompts.hashes(personas), **schema_hashes()}
    then = {**manifest.get("prompt_hashes", {}), **manifest.get("schema_hashes", {})}
    return sorted(k for k in {*now, *then} if now.get(k) != then.get(k))


def config_identity(config: dict) -> str:
    """What makes two configs the same build: the config as today's code reads it, every key
    at its value (defaults included). A config written by an older version is read the same
    way (its engine tables kept every engine's keys: the ones its engine lacks are dropped), so
    a generation compiled before a key was added or an engine's keys were split out is still
    recognised as unchanged. A stored config today's code cannot read is its own identity."""
    from .backends import registry
    from .config import ConfigError, parse_config

    data = json.loads(json.dumps(config))
    try:
        if isinstance(data.get("annotator"), dict):
            data["annotator"] = registry.parse_stored(data["annotator"]).model_dump()
        return sha256(parse_config(data).model_dump())
    except (ConfigError, ValueError):
        return sha256({"unreadable": config})


def heldout_evaluation(ws: Workspace, generation: int) -> dict:
    """`ratchet loop`'s held-out figures (models/evaluation.json) for generations up to this
    one: the rate of answers the frozen judge labels unethical, per generation's annotator."""
    path = ws.root / "models" / "evaluation.json"
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))["generations"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    out = {}
    for g, entry in sorted(entries.items(), key=lambda kv: int(kv[0])):
        e = entry.get("evaluation") or {}
        if int(g) <= generation and "unethical_rate" in e:
            out[str(g)] = {"annotator": entry.get("annotator"), "unethical_rate": e["unethical_rate"],
                           "prompts": e.get("n"), "judge": e.get("judge")}
    return out


def plot_ratchet(history: list[dict], path: Path, evaluation: dict | None = None) -> None:
    """The ratchet's figures across generations as a PNG (the card shows it), with the
    held-out unethical rate of each generation's annotator where `ratchet loop` measured it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gens = [h["generation"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.plot(gens, [h["mean_score"] for h in history], "o-", label="mean panel score")
    for key, label in [("replacement_rate", "replacement rate"), ("carried_rate", "carried-forward rate")]:
        points = [(g, h[key]) for g, h in zip(gens, history) if h[key] is not None]
        if points:
            ax.plot(*zip(*points), "s--", label=label)
    rates = [(int(g), e["unethical_rate"]) for g, e in (evaluation or {}).items() if e["unethical_rate"] is not None]
    if rates:
        ax.plot(*zip(*rates), "^:", color="crimson", label="held-out unethical rate")
    ax.set_xlabel("generation")
    ax.set_xticks(gens)
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("Moral Ratchet: reflection quality per generation")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})  # no version stamp: same figures, same bytes
    plt.close(fig)


def compile_generation(ws: Workspace, con, generation: int, prompts: Prompts, models: dict[str, dict],
                       metrics: dict, overwrite: bool = False, config=None) -> tuple[Path, bool]:
    """Write generations/gen-NNNN/. Returns (folder, written). A generation already compiled
    with the same splits is left as it is (written = False); one whose splits would change is
    refused (GenerationImmutable) unless `overwrite`."""
    final = ws.generation_dir(generation)
    final.parent.mkdir(parents=True, exist_ok=True)
    config = (config or ws.config).model_dump()
    dpo = dpo_rows(con, generation)
    explored = explored_rows(con, generation, prompts, config["consent"]["explored"])
    con.execute("SET memory_limit = '512MB'")  # DuckDB spills past it: compiling a million passages stays small
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        (tmp / "data").mkdir()
        splits, rows = {}, {}
        for name, source, schema in [("sft", sft_batches(con, generation), SFT_SCHEMA),
                                     ("dpo", dpo, DPO_SCHEMA),
                                     ("explored", explored, EXPLORED_SCHEMA),
                                     ("annotations", annotation_batches(con, generation), ANNOTATION_SCHEMA),
                                     ("audit_summary", query_batches(con, AUDIT_SUMMARY_SQL, generation),
                                      AUDIT_SUMMARY_SCHEMA)]:
            path, rows[name] = write_split(source, schema, tmp, name)
            if path:  # `datasets` cannot load a split without rows: an empty split is left out, the card says so
                splits[name] = path
        counts = con.execute("""
            SELECT (SELECT count(*) FROM generation_passages WHERE generation = $g),
                   (SELECT count(record) FILTER (vetoed IS NOT TRUE) FROM ratchet WHERE generation = $g),
                   (SELECT count(*) FILTER (status = 'accepted') FROM annotations WHERE generation = $g),
                   (SELECT count(*) FILTER (status = 'rejected') FROM annotations WHERE generation = $g),
                   (SELECT count(*) FILTER (selected) FROM convergence WHERE generation = $g),
                   (SELECT count(DISTINCT split_part(example_id, '@', 1)) FILTER (split = 'sft') FROM consents
                    WHERE generation = $g AND veto),
                   (SELECT count(DISTINCT example_id) FILTER (split = 'dpo') FROM consents WHERE generation = $g AND veto)
            """, {"g": generation}).fetchone()
        metrics["per_kept_reflection"] = cost_per_kept_reflection(metrics, counts[1])
        manifest = {
            "generation": generation,
            "parent": generation - 1 if generation > 1 else None,
            "name": ws.root.name,
            "package_version": version("moral-ratchet"),
            "config_hash": config_identity(config),
            "config": config,
            "models": models,
            "prompt_hashes": prompts.hashes([m["persona"] for m in models.values() if "persona" in m]),
            "schema_hashes": schema_hashes(),
            "counts": dict(zip(["passages", "reflections", "annotations_accepted", "annotations_rejected",
                                "annotations_selected", "vetoed_sft", "vetoed_dpo"], counts),
                           sft_examples=rows["sft"], dpo_pairs=rows["dpo"], explored_examples=rows["explored"],
                           audit_summary_rows=rows["audit_summary"]),
            "metrics": metrics,
            "splits": splits,
        }
        history = (metrics.get("ratchet") or {}).get("history") or []
        manifest["evaluation"] = heldout_evaluation(ws, generation)
        if history:
            plot_ratchet(history, tmp / "ratchet.png", manifest["evaluation"])
        manifest["plot"] = "ratchet.png" if history else None
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(render_card(manifest), encoding="utf-8")
        if final.exists():
            old = json.loads((final / "manifest.json").read_text(encoding="utf-8")).get("splits") \
                if (final / "manifest.json").exists() else None
            if old == splits and not overwrite:
                shutil.rmtree(tmp)
                return final, False  # immutable, and nothing would change
            if not overwrite:
                raise GenerationImmutable(
                    f"{final} is compiled and immutable, and this build's splits differ from it (changed: "
                    f"{', '.join(sorted(k for k in {*splits, *(old or {})} if (old or {}).get(k) != splits.get(k)))}); "
                    f"build the next generation (--generation {generation + 1}), or pass --overwrite to replace it")
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        con.execute("RESET memory_limit")
    return final, True


def tokens_by_model(engines) -> dict[str, dict]:
    """Each model's calls and tokens this build (engines sharing a model file are summed)."""
    out: dict[str, dict] = {}
    for engine in engines:
        if not engine.stats.calls:
            continue
        entry = out.setdefault(engine.backend.model_name, {"backend": engine.backend.kind})
        for key, value in engine.stats.tokens().items():
            entry[key] = entry.get(key, 0) + value
    return out


def cost_per_kept_reflection(metrics: dict, kept: int) -> dict | None:
    """What this build paid per reflection that reached the sft split: wall seconds and the
    tokens the engines had to evaluate (prompt tokens not served from a cached prefix, plus
    completions). None when nothing was kept."""
    if not kept:
        return None
    prompt, cached = metrics.get("prompt_tokens", 0), metrics.get("cached_prompt_tokens", 0)
    evaluated = prompt - cached + metrics.get("completion_tokens", 0)
    return {"kept": kept, "seconds": round(metrics.get("seconds", 0.0) / kept, 2),
            "tokens_evaluated": round(evaluated / kept), "prompt_tokens": round(prompt / kept),
            "cached_share": round(cached / prompt, 3) if prompt else None}


class Compile(Stage):
    """The last stage: the generation's state in DuckDB to generations/gen-NNNN/. A compiled
    generation is immutable: a changed config is refused before any model runs (prepare) and
    changed splits at compile, unless --overwrite."""
    name = "compile"

    def prepare(self, ctx: BuildContext) -> None:
        from .stages.ratchet import RatchetError

        folder = ctx.ws.generation_dir(ctx.generation)
        manifest = compiled_manifest(folder)
        if manifest is None or ctx.overwrite:
            return
        if config_identity(manifest.get("config") or {}) != config_identity(ctx.cfg.model_dump()):
            raise RatchetError(f"{folder} is compiled and immutable, and ratchet.toml changed since it was built: build "
                               f"the next generation (--generation {ctx.generation + 1}), or pass --overwrite to rebuild "
                               "and replace this one")
        changed = changed_files(manifest, ctx.prompts, ctx.cfg)
        if changed:
            raise RatchetError(f"{folder} is compiled and immutable, and it was built with other prompt or schema files "
                               f"(changed: {', '.join(changed)}; a newer builder, or an edited prompt folder): build the "
                               f"next generation (--generation {ctx.generation + 1}), or pass --overwrite to rebuild and "
                               "replace this one")

    def run(self, ctx: BuildContext) -> dict:
        engines = list(ctx.engines.values())
        calls = {"model_calls": sum(e.stats.calls for e in engines), "cached_calls": sum(e.stats.hits for e in engines),
                 "engine_errors": sum(e.stats.errors for e in engines),
                 "completion_tokens": sum(e.stats.completion_tokens for e in engines),
                 "prompt_tokens": sum(e.stats.prompt_tokens for e in engines),
                 "cached_prompt_tokens": sum(e.stats.cached_tokens for e in engines),
                 "tokens_by_model": tokens_by_model(engines),
                 "seconds": round(time.perf_counter() - ctx.started, 2)}
        calls["calibration"] = {"attempts": sum(c["attempts"] for c in ctx.calibration),
                                "baselines": [{k: c[k] for k in ("task", "judge", "baseline")} for c in ctx.calibration]}
        scripted = sorted({e.backend.model_name for e in engines if not e.backend.is_model})
        if scripted:  # nothing a scripted engine writes is a model's judgement: say so wherever the build is shown
            calls["scripted_engine"] = scripted
        ctx.metrics.update(calls)
        ctx.output, ctx.written = compile_generation(ctx.ws, ctx.con, ctx.generation, ctx.prompts,
                                                     ctx.ensemble.describe(), ctx.metrics, ctx.overwrite, config=ctx.cfg)
        return {}

"""Ingest: the passages a generation annotates. Generation 1 reads the corpus (corpus.py);
generation N > 1 takes exactly generation N - 1's passages, in the same order."""
from __future__ import annotations

from dataclasses import dataclass

from ..corpus import IngestReport, Passage, ingest
from ..tables import Table, doc, transaction
from .base import BuildContext, RatchetError, Stage

PASSAGES = Table("passages", Passage, key=("passage_id",), extra=("added_at TIMESTAMP DEFAULT current_timestamp",),
                 doc="every passage ever ingested; passage_id = sha256 of the normalised text, 16 hex digits")


@dataclass
class GenerationPassage:
    generation: int
    ord: int = doc("corpus order")
    passage_id: str
    source: str
    position: int


GENERATION_PASSAGES = Table("generation_passages", GenerationPassage, key=("generation", "passage_id"),
                            doc="the passages of each generation, in corpus order")


class Ingest(Stage):
    name = "ingest"
    tables = (PASSAGES, GENERATION_PASSAGES)

    def prepare(self, ctx: BuildContext) -> None:
        if ctx.generation > 1 and ctx.corpus:
            raise RatchetError(f"--corpus applies to generation 1 only: generation {ctx.generation} re-annotates "
                               f"generation {ctx.generation - 1}'s passages")
        if ctx.generation > 1:
            done = ctx.con.execute("SELECT count(*) FROM builds WHERE generation = ? AND status = 'finished'",
                                   [ctx.generation - 1]).fetchone()[0]
            if not done or not ctx.ws.generation_dir(ctx.generation - 1).exists():
                raise RatchetError(f"generation {ctx.generation} re-annotates generation {ctx.generation - 1}'s "
                                   f"passages, which is not built: run `ratchet build --generation "
                                   f"{ctx.generation - 1}` first")

    def run(self, ctx: BuildContext) -> dict:
        cfg = ctx.cfg
        if ctx.generation == 1:
            first = ctx.ensemble.annotators[0].backend  # its tokenizer measures the passages
            path = ctx.ws.resolve(ctx.corpus or cfg.corpus.path)
            ctx.passages, ctx.report = ingest(path, cfg.corpus.text_field, cfg.corpus.chunk_tokens, first.count_tokens,
                                              cfg.corpus.on_bad_file, shown_from=ctx.ws.root)
            ctx.log.info("ingested %d passages from %s", len(ctx.passages), path)
            refuse_changed_corpus(ctx, path)
        else:
            ctx.passages, ctx.report = parent_passages(ctx.con, ctx.generation), IngestReport()
            ctx.log.info("re-annotating the %d passages of generation %d", len(ctx.passages), ctx.generation - 1)
        store_passages(ctx.con, ctx.generation, ctx.passages)
        r = ctx.report
        return {"passages": len(ctx.passages), "files": r.files, "records": r.records, "empty_records": r.empty_records,
                "duplicate_passages": r.duplicates, "skipped_files": [f"{f}: {why}" for f, why in r.skipped_files],
                "skipped_records": [f"{s}: {why}" for s, why in r.skipped_records]}


def refuse_changed_corpus(ctx: BuildContext, path) -> None:
    """A compiled generation is immutable: a corpus that changed since it was built is refused
    here, before any model runs and before anything is stored (not at compile)."""
    if ctx.overwrite or not ctx.ws.generation_dir(ctx.generation).exists():
        return
    before = [r[0] for r in ctx.con.execute("SELECT passage_id FROM generation_passages WHERE generation = ? "
                                            "ORDER BY ord", [ctx.generation]).fetchall()]
    now = [p.passage_id for p in ctx.passages]
    if before and now != before:
        added, removed = len(set(now) - set(before)), len(set(before) - set(now))
        what = f"{added} passage(s) added, {removed} removed" if added or removed else "the same passages, reordered"
        raise RatchetError(f"{ctx.ws.generation_dir(ctx.generation)} is compiled and immutable, and the corpus {path} "
                           f"changed since it was built ({what}): build the next generation, use another workspace, "
                           "or pass --overwrite to rebuild and replace this one")


def store_passages(con, generation: int, passages: list[Passage]) -> None:
    with transaction(con):
        PASSAGES.insert(con, passages, on_conflict="ignore")
        con.execute("DELETE FROM generation_passages WHERE generation = ?", [generation])
        GENERATION_PASSAGES.insert(con, [GenerationPassage(generation, i, p.passage_id, p.source, p.position)
                                         for i, p in enumerate(passages)])


def parent_passages(con, generation: int) -> list[Passage]:
    """Generation N annotates exactly the passages of generation N - 1, in the same order."""
    rows = con.execute("""SELECT g.passage_id, g.source, g.position, p.text, p.n_tokens
                          FROM generation_passages g JOIN passages p USING (passage_id)
                          WHERE g.generation = ? ORDER BY g.ord""", [generation - 1]).fetchall()
    return [Passage(*row) for row in rows]

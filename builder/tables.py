"""Each DuckDB table is declared once: by the row type of the stage that writes it.

A row type is a dataclass; its fields, in order, are the table's columns. The SQL type comes
from the annotation (int INTEGER, str VARCHAR, float DOUBLE, bool BOOLEAN, `Json` JSON, or an
explicit `Annotated[int, "BIGINT"]`), `X | None` makes a column nullable, and `doc(...)` gives
a column its comment. `Table` turns that into the CREATE statement and the inserts, so a
column is named in one place and a row is written by name, never by position.

    @dataclass
    class NoteRow:
        generation: int
        passage_id: str
        note: str | None = doc("what the stage says about the passage")

    NOTES = Table("notes", NoteRow, key=("generation", "passage_id"))
"""
from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager
from datetime import datetime
import types
import typing
from typing import Annotated, Any, Union

JSON_TYPE = "JSON"
Json = Annotated[Any, JSON_TYPE]  # a dict or list, stored as JSON text

_SQL_TYPES = {int: "INTEGER", str: "VARCHAR", float: "DOUBLE", bool: "BOOLEAN", datetime: "TIMESTAMP"}


def doc(text: str, default=dataclasses.MISSING, added: bool = False):
    """A column with a comment (shown in the CREATE statement). `added`: a column a later version
    added to an existing table (nullable): a workspace made before gets it with ALTER TABLE."""
    return dataclasses.field(default=default, metadata={"doc": text, "added": added})


@dataclasses.dataclass(frozen=True)
class Column:
    name: str
    sql_type: str
    nullable: bool
    doc: str = ""
    json: bool = False
    added: bool = False

    def ddl(self) -> str:
        return f"{self.name} {self.sql_type}{'' if self.nullable else ' NOT NULL'}"


def _column(field: dataclasses.Field, hint) -> Column:
    nullable = False
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(hint))
        hint = args[0]
    if typing.get_origin(hint) is Annotated:
        base, *extras = typing.get_args(hint)
        sql = next(e for e in extras if isinstance(e, str))
        return Column(field.name, sql, nullable, field.metadata.get("doc", ""), json=sql == JSON_TYPE,
                      added=field.metadata.get("added", False))
    if hint not in _SQL_TYPES:
        raise TypeError(f"{field.name}: no SQL type for {hint!r}; annotate it as Annotated[..., 'SQL TYPE']")
    return Column(field.name, _SQL_TYPES[hint], nullable, field.metadata.get("doc", ""),
                  added=field.metadata.get("added", False))


REGISTRY: dict[str, "Table"] = {}


class Table:
    """A DuckDB table declared by a row dataclass. `extra` adds columns a row never sets
    (e.g. "added_at TIMESTAMP DEFAULT current_timestamp"), after the row's own."""

    def __init__(self, name: str, row: type, key: tuple[str, ...] = (), extra: tuple[str, ...] = (),
                 doc: str = "", register: bool = True):
        self.name, self.row, self.key, self.extra, self.doc = name, row, key, extra, doc
        hints = typing.get_type_hints(row, include_extras=True)
        self.columns = [_column(f, hints[f.name]) for f in dataclasses.fields(row)]
        missing = [k for k in key if k not in self.names]
        if missing:
            raise TypeError(f"table {name}: key column(s) {missing} are not fields of {row.__name__}")
        if register:  # every workspace has it (a stage's own tables are also created when a build starts)
            REGISTRY[name] = self

    def exists(self, con) -> bool:
        """False in a workspace an older builder made, opened read-only (nothing could create it)."""
        return con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?",
                           [self.name]).fetchone()[0] > 0

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    def create_sql(self) -> str:
        entries = [(c.ddl(), c.doc) for c in self.columns] + [(x, "") for x in self.extra]
        if self.key:
            entries.append((f"PRIMARY KEY ({', '.join(self.key)})", ""))
        width = max(len(ddl) for ddl, _ in entries) + 1
        lines = []
        for i, (ddl, comment) in enumerate(entries):
            text = ddl + ("," if i < len(entries) - 1 else "")
            lines.append(f"    {text.ljust(width)} -- {comment}" if comment else f"    {text}")
        head = f"CREATE TABLE IF NOT EXISTS {self.name} ({' -- ' + self.doc if self.doc else ''}"
        return head + "\n" + "\n".join(lines) + "\n);"

    def create(self, con, keys: dict[str, tuple[str, ...]] | None = None) -> None:
        """keys: every table's primary key as primary_keys(con) reads it, for one who creates many."""
        con.execute(self.create_sql())
        for c in self.columns:
            if c.added:  # a table an older version made lacks it (and its position: inserts name columns)
                con.execute(f"ALTER TABLE {self.name} ADD COLUMN IF NOT EXISTS {c.name} {c.sql_type}")
        if self.key:
            self._rekey(con, (primary_keys(con) if keys is None else keys).get(self.name, ()))

    def _rekey(self, con, old: tuple[str, ...]) -> None:
        """A table an older version made under a narrower key is rebuilt under this one, rows and
        all, in one transaction: DuckDB cannot alter a primary key. Only a wider key is taken (rows
        that were unique stay unique); a key that drops a column is an error naming both."""
        if not old or set(old) == set(self.key):
            return
        if not set(old) < set(self.key):
            raise TypeError(f"table {self.name}: this workspace keys it by {', '.join(old)}, this builder by "
                            f"{', '.join(self.key)}; a key may only grow, so its rows cannot be kept")
        rekeyed = f"{self.name}__rekeyed"
        with transaction(con):
            con.execute(f"DROP TABLE IF EXISTS {rekeyed}")
            create = self.create_sql().replace(f"CREATE TABLE IF NOT EXISTS {self.name} ", f"CREATE TABLE {rekeyed} ", 1)
            con.execute(create)
            con.execute(f"INSERT INTO {rekeyed} BY NAME SELECT * FROM {self.name}")
            con.execute(f"DROP TABLE {self.name}")
            con.execute(f"ALTER TABLE {rekeyed} RENAME TO {self.name}")

    def values(self, row) -> list:
        out = []
        for c in self.columns:
            value = getattr(row, c.name)
            out.append(json.dumps(value, ensure_ascii=False) if c.json and value is not None else value)
        return out

    def insert(self, con, rows: list, on_conflict: str | None = None) -> None:
        """Insert rows (row dataclasses) by column name. on_conflict: None, "ignore" or "replace"."""
        if not rows:
            return  # DuckDB's executemany refuses an empty list
        verb = {None: "INSERT", "ignore": "INSERT OR IGNORE", "replace": "INSERT OR REPLACE"}[on_conflict]
        sql = f"{verb} INTO {self.name} ({', '.join(self.names)}) VALUES ({', '.join('?' * len(self.columns))})"
        con.executemany(sql, [self.values(r) for r in rows])

    def insert_batch(self, con, rows: list, on_conflict: str | None = None) -> None:
        """insert() for many rows of plain columns (text, numbers, JSON) in one statement, through
        Arrow: one commit for the batch instead of one per row (measured: ~0.5 ms a row for 32 rows
        against ~2.8 ms a row one at a time), which is what caps a driver fed by a Ray cluster."""
        if len(rows) < 2:
            return self.insert(con, rows, on_conflict)
        import pyarrow as pa

        verb = {None: "INSERT", "ignore": "INSERT OR IGNORE", "replace": "INSERT OR REPLACE"}[on_conflict]
        columns = zip(*map(self.values, rows))
        batch = pa.table(dict(zip(self.names, map(list, columns))))
        con.register("_insert_batch", batch)
        try:
            con.execute(f"{verb} INTO {self.name} ({', '.join(self.names)}) SELECT {', '.join(self.names)} FROM _insert_batch")
        finally:
            con.unregister("_insert_batch")

    def replace_generation(self, con, generation: int, rows: list, on_conflict: str | None = None) -> None:
        """Replace one generation's rows in one transaction."""
        with transaction(con):
            con.execute(f"DELETE FROM {self.name} WHERE generation = ?", [generation])
            self.insert(con, rows, on_conflict)

    def read(self, con, where: str = "", params=None) -> list:
        """Rows as row dataclasses (JSON columns parsed). A table an older version made (read
        through a read-only connection, which cannot ALTER it) gives NULL for the columns added since."""
        present = {n for (n,) in con.execute("SELECT column_name FROM information_schema.columns WHERE table_name = ?",
                                             [self.name]).fetchall()}
        columns = [c.name if c.name in present or not c.added else f"NULL AS {c.name}" for c in self.columns]
        sql = f"SELECT {', '.join(columns)} FROM {self.name}" + (f" WHERE {where}" if where else "")
        out = []
        for values in con.execute(sql, params or []).fetchall():
            kwargs = {c.name: (json.loads(v) if c.json and isinstance(v, str) else v) for c, v in zip(self.columns, values)}
            out.append(self.row(**kwargs))
        return out


def primary_keys(con) -> dict[str, tuple[str, ...]]:
    """Each table's primary key as the database holds it, in one query (one per table cost a
    third of a workspace's connect)."""
    return {name: tuple(columns) for name, columns in con.execute(
        "SELECT table_name, constraint_column_names FROM duckdb_constraints() "
        "WHERE constraint_type = 'PRIMARY KEY'").fetchall()}


def schema_sql(tables=None) -> str:
    return "\n".join(t.create_sql() for t in (tables or REGISTRY.values()))


@contextmanager
def transaction(con):
    """BEGIN ... COMMIT, or ROLLBACK on any exception (Ctrl-C included)."""
    con.execute("BEGIN")
    try:
        yield con
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


def insert_rows(con, sql: str, rows: list) -> None:
    """executemany that accepts no rows (DuckDB's refuses an empty list)."""
    if rows:
        con.executemany(sql, rows)

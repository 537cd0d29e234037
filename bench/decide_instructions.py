"""The instructions ``rg_decide`` costs PostgreSQL an item, counted, for this checkout and another.

PostgreSQL's CPU a decision moves with the host's hour, as the service's does (bench/README.md);
the instructions a backend executes do not. For each checkout (this one, and ``--candidate
DIR`` with an environment of its own), a PostgreSQL 15 cluster is initialised under
/var/tmp, migrated by that checkout's ``replayguard migrate`` and stopped; then, per kind,
``postgres --single`` runs a script of ``rg_decide`` calls under ``valgrind
--tool=callgrind``: the ``--warmup`` batches alone, and the same followed by ``--batches``
more, each from a fresh copy of the migrated data directory. Their difference over the
measured items is what one item costs, without the backend's start, the catalogs' first
reads or the warm-up. Kinds:

- ``fresh``: nonces never seen, accepted;
- ``again``: nonces of the warm-up presented again: ``reused``, each with its alert the
  first time (the warm-up's nonces are taken in a scattered order, about once each);
- ``retained``: fresh nonces, then the checkout's retention purge (its own statement, as
  the leader runs it) until nothing expired is left: what a nonce costs once its ttl passed.

The batches are seeded, so both checkouts decide the same items. Single-user mode reads
each call as one statement with its batch as a literal, so the count includes that
statement's parsing, which a served call, its batch a parameter, does not have; both
checkouts pay it alike. ``fsync`` and ``synchronous_commit`` are off: the flush is not the
function's. Only the backend's user space is counted.

    .venv/bin/python bench/decide_instructions.py --candidate ../other-checkout
    .venv/bin/python bench/decide_instructions.py --kind fresh --batches 200
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
from own_server import BIN as PG_BIN  # noqa: E402 - bench/own_server.py, beside this file
from own_server import _run as as_postgres  # noqa: E402
from own_server import free_port, new_cluster  # noqa: E402

KINDS = ("fresh", "again", "retained")
T0_US = 1_800_000_000_000_000
TTL_US = 10**9
CALL = "SELECT count(*) FROM rg_decide('{items}'::jsonb, 5, 60000000, false)\n"
_TOTALS = re.compile(r"^(?:summary|totals):\s+(\d+)", re.MULTILINE)
# A backend's report line: "<time> UTC [<pid>] ERROR:  <message>"
_ERROR = re.compile(r"\b((?:ERROR|FATAL|PANIC):\s.*)$", re.MULTILINE)


@dataclass(frozen=True)
class Checkout:
    path: Path

    @property
    def python(self) -> Path:
        own = self.path / ".venv" / "bin" / "python"
        return own if own.exists() else Path(sys.executable)

    @property
    def commit(self) -> str:
        done = subprocess.run(["git", "-C", str(self.path), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=False)
        return done.stdout.strip() or self.path.name


def batches(kind: str, warmup: int, measured: int, size: int, seed: int) -> tuple[list[str], list[str]]:
    """The warm-up's calls and the measured ones, seeded: the same items for every checkout."""
    rng = random.Random(seed)
    seq, spent = 0, list[str]()

    def call(fresh: bool) -> str:
        nonlocal seq
        items = []
        for _ in range(size):
            seq += 1
            digest = rng.randbytes(32).hex() if fresh else spent[rng.randrange(len(spent))]
            if fresh:
                spent.append(digest)
            items.append({"kind": "nonce", "ts_us": T0_US + seq, "vm_id": f"vm-{seq % 50}", "subject": "bench",
                          "digest": digest, "receipt": "absent", "expires_us": T0_US + seq + TTL_US})
        return CALL.format(items=json.dumps(items))

    warm = [call(True) for _ in range(warmup)]
    return warm, [call(kind != "again") for _ in range(measured)]


def purge_calls(checkout: Checkout, items: int) -> list[str]:
    """The checkout's retention statement (``services/retention.py``), as often as it takes to
    purge ``items`` expired uses, at a time past every item's expiry."""
    statement = subprocess.run(
        [str(checkout.python), "-c", "from replayguard.services.retention import _PURGE, PURGE_BATCH;"
                                     " print(PURGE_BATCH); print(_PURGE)"],
        cwd=checkout.path, capture_output=True, text=True, check=True).stdout
    limit, sql = statement.split("\n", 1)
    sql = " ".join(sql.split()).replace("$1", str(T0_US + 10 * TTL_US)).replace("$2", limit)
    return ["SET enable_seqscan = off\n"] + [sql + "\n"] * (items // int(limit) + 1)


def totals(callgrind_out: str) -> int:
    """The instructions a callgrind output file counted in all."""
    found = _TOTALS.search(callgrind_out)
    if found is None:
        raise ValueError("no totals in the callgrind output")
    return int(found.group(1))


class Failed(Exception):
    """A statement of the script failed: its count is not the function's work."""


def first_error(output: str) -> str | None:
    """The first error a single-user backend reported in its output, if any.

    The backend goes on after an error, so a call that fails early (a candidate whose
    function does not compile, or raises) would count as a cheap item."""
    found = _ERROR.search(output)
    return None if found is None else found.group(1).strip()


def per_item(warm_only: int, whole: int, items: int) -> float:
    return (whole - warm_only) / items


@contextmanager
def migrated(checkout: Checkout) -> Iterator[Path]:
    """A stopped PostgreSQL cluster whose database ``rg`` the checkout migrated: its data directory."""
    root, data = new_cluster("rg-bench-pgcg-", PG_BIN)
    try:
        port = free_port()
        as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-w", "-l", str(root / "log"),
                    "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "start")
        try:
            as_postgres(str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "rg")
            subprocess.run([str(checkout.python), "-m", "replayguard", "migrate", "--database-url",
                            f"postgresql://postgres@127.0.0.1:{port}/rg", "--data-dir", str(root / "keys")],
                           cwd=checkout.path, capture_output=True, text=True, check=True)
        finally:
            as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-w", "-m", "fast", "stop")
        yield data
    finally:
        shutil.rmtree(root, ignore_errors=True)


def count(data: Path, script: list[str], keep: Path | None, name: str) -> int:
    """The instructions a single-user backend on a copy of ``data`` executes running ``script``."""
    work = Path(tempfile.mkdtemp(prefix="rg-bench-pgcg-run-", dir="/var/tmp"))
    try:
        if os.geteuid() == 0:
            shutil.chown(work, "postgres")
        copy = work / "data"
        subprocess.run(["cp", "-a", str(data), str(copy)], check=True)
        (work / "script.sql").write_text("".join(script))
        out = work / "callgrind.out"
        with open(work / "script.sql") as stdin:  # single-user mode reads its statements from stdin
            ran = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                                  str(PG_BIN / "postgres"), "--single", "-D", str(copy), "-c", "fsync=off",
                                  "-c", "synchronous_commit=off", "-c", "jit=off", "rg"],
                                 user="postgres" if os.geteuid() == 0 else None, stdin=stdin,
                                 capture_output=True, text=True, check=True)
        if problem := first_error(ran.stdout + ran.stderr):
            raise Failed(f"{name}: {problem}")
        if keep is not None:
            shutil.copyfile(out, keep / f"callgrind.out.{name}")
        return totals(out.read_text(errors="replace"))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(checkout: Checkout, kinds: list[str], args: argparse.Namespace, keep: Path | None) -> dict[str, float]:
    """Instructions an item, per kind, for one checkout."""
    out: dict[str, float] = {}
    with migrated(checkout) as data:
        for kind in kinds:
            warm, body = batches(kind, args.warmup, args.batches, args.batch, args.seed)
            if kind == "retained":
                body += purge_calls(checkout, (args.warmup + args.batches) * args.batch)
                warm = warm + purge_calls(checkout, args.warmup * args.batch)
            items = args.batches * args.batch
            out[kind] = per_item(count(data, warm, keep, f"{kind}-warm"), count(data, warm + body, keep, kind), items)
            print(f"  {checkout.commit} {kind}: {out[kind]:,.0f} instructions an item", file=sys.stderr)
    return out


def report(kinds: list[str], names: list[str], figures: list[dict[str, float]]) -> str:
    """The table: instructions an item per kind and checkout, and the candidate's ratio."""
    head = ["kind", *names] + (["candidate / this"] if len(names) == 2 else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kind in kinds:
        cells = [kind, *(f"{f[kind]:,.0f}" for f in figures)]
        if len(figures) == 2:
            cells.append(f"{figures[1][kind] / figures[0][kind]:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--candidate", type=Path, help="another checkout (its own .venv if it has one)")
    p.add_argument("--kind", default=",".join(KINDS), help=f"comma-separated: {', '.join(KINDS)}")
    p.add_argument("--batches", type=int, default=100, help="measured calls of rg_decide")
    p.add_argument("--warmup", type=int, default=20, help="calls before them, left out of the count")
    p.add_argument("--batch", type=int, default=32, help="items a call")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", type=Path, help="a directory to keep the callgrind output files in")
    args = p.parse_args(argv)
    kinds = args.kind.split(",")
    if unknown := set(kinds) - set(KINDS):
        p.error(f"unknown kind(s): {', '.join(sorted(unknown))}")
    checkouts = [Checkout(BENCH.parent)] + ([Checkout(args.candidate.resolve())] if args.candidate else [])
    figures = []
    for n, checkout in enumerate(checkouts):
        keep = None
        if args.keep is not None:
            keep = args.keep / f"checkout-{n}"
            keep.mkdir(parents=True, exist_ok=True)
        try:
            figures.append(measure(checkout, kinds, args, keep))
        except Failed as exc:
            print(f"{checkout.commit}: a call failed, so nothing was measured: {exc}", file=sys.stderr)
            return 1
    print(f"rg_decide, instructions an item ({args.batches} calls of {args.batch} after {args.warmup}, callgrind,"
          f" single-user PostgreSQL from {PG_BIN})")
    print(report(kinds, [f"{c.commit}" for c in checkouts], figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())

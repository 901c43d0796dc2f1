"""CSV rows in and out, and the console table of a run."""
from __future__ import annotations

import csv
import math
import os
from typing import Iterable

from nit_model.atomic import atomic_save

from .harness import COLUMNS

DEFAULT_CSV = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "results.csv")


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.6g}"
    return str(v)


def append_rows(path: str, rows: Iterable[dict]) -> int:
    """Append rows (dicts keyed by COLUMNS) to the CSV at `path`, writing the header to a new file.

    An existing file with other columns is left alone: the rows go nowhere and ValueError says so.
    """
    rows = list(rows)
    for r in rows:
        unknown = set(r) - set(COLUMNS)
        if unknown:
            raise ValueError(f"row has columns that are not in COLUMNS: {sorted(unknown)}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), None)
        if header and len(header) < len(COLUMNS) and header == list(COLUMNS[:len(header)]):
            _add_columns(path)
        elif header != list(COLUMNS):
            raise ValueError(f"{path} has columns {header}, expected {list(COLUMNS)}; write to another --out")
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(COLUMNS)
        for r in rows:
            w.writerow([_cell(r.get(c)) for c in COLUMNS])
    return len(rows)


def _add_columns(path: str) -> None:
    """Rewrite a CSV written before columns were appended to COLUMNS: same rows, the new cells empty.

    Written atomically (nit_model.atomic), so an interruption leaves the old file whole.
    """
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(COLUMNS)
            for r in rows:
                w.writerow([r.get(c) or "" for c in COLUMNS])

    atomic_save(path, write)


def read_rows(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def fnum(v, fmt: str = ".3g") -> str:
    if v in (None, ""):
        return "-"
    try:
        return format(float(v), fmt)
    except ValueError:
        return str(v)


def print_rows(rows: list[dict], width: int = 150):
    """One block per suite/workload: provider, pass, median (p20-p80), throughput, speed-ups, memory."""
    if not rows:
        return
    r0 = rows[0]
    print(f"\n{r0['suite']} | {r0['workload']} | {r0.get('config', '')} | {r0.get('device')} {r0.get('dtype')}")
    head = f"  {'provider':<19}{'pass':<8}{'median ms':>10} {'p20-p80':>15} {'throughput':>16} " \
           f"{'x ref':>7} {'x peer':>7} {'peak MB':>8}  status"
    print(head)
    by_provider: dict[str, list[dict]] = {}
    for r in rows:
        by_provider.setdefault(r["provider"], []).append(r)
    for group in by_provider.values():
        same = len({(r.get("status"), r.get("reason"), r.get("check")) for r in group}) == 1
        if same and group[0].get("status") != "ok":
            group = [dict(group[0], **{"pass": "all"})]  # one line when every pass was skipped alike
        for r in group:
            print(_line(r)[:width])


def _line(r: dict) -> str:
    st = r.get("status", "")
    if st == "ok":
        spread = f"{fnum(r.get('p20_ms'))}-{fnum(r.get('p80_ms'))}"
        thr = f"{fnum(r.get('throughput'), '.4g')} {r.get('unit', '')}"
        tail = "ok"
        if r.get("efficiency") not in (None, ""):
            tail += f" efficiency {100 * float(r['efficiency']):.2f}%, {r.get('batches')} batches"
        tail += f" ({r['reason']})" if r.get("reason") else ""
        return (f"  {r['provider']:<19}{r['pass']:<8}{fnum(r.get('median_ms')):>10} {spread:>15} {thr:>16} "
                f"{fnum(r.get('speedup_vs_reference'), '.2f'):>7} {fnum(r.get('speedup_vs_best_peer'), '.2f'):>7} "
                f"{fnum(r.get('peak_mem_mb'), '.1f'):>8}  {tail}")
    why = r.get("reason") or r.get("check") or ""
    return f"  {r['provider']:<19}{r['pass']:<8}{'':>10} {'':>15} {'':>16} {'':>7} {'':>7} {'':>8}  {st}: {why}"

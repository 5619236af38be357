"""Rich tables for the terminal: the only module that formats output for people."""
from __future__ import annotations

import sys
from collections import defaultdict
from typing import Iterable

from rich.console import Console
from rich.table import Table

from planner.units import fmt_bytes, fmt_rate


def _console() -> Console:
    return Console(highlight=False, width=140, soft_wrap=False)


def plan(doc: dict, path: str) -> None:
    """Summary, decisions, memory budget, weights by tensor kind, and a few Pareto points."""
    con = _console()
    w, p, mem, g = doc["weights"], doc["predicted"], doc["memory"], doc["gpu"]
    cards = f"{g['count']} x {g['name']}" if g["count"] > 1 else g["name"]
    con.print(f"[bold]{doc['model']['name']}[/] ({doc['model']['params'] / 1e9:.2f}B params) on [bold]{cards}[/]"
              f" ({fmt_bytes(g['memory_bytes'])} each): mode [bold]{doc['mode']}[/], "
              f"[bold]{w['avg_bpw']:.2f} bpw[/], context {doc['context']['length']}, KV {doc['kv_cache']['dtype']}")
    con.print(f"predicted: decode [bold]{fmt_rate(p['decode_tokens_per_s'])}[/] at position {p['decode_position']}, "
              f"prefill {p['prefill_tokens_per_s']:.0f} tok/s, first token after {p['time_to_first_token_s']:.2f} s "
              f"for a {p['prompt_tokens']}-token prompt")

    con.print(_decisions(doc["decisions"]))
    con.print(_memory(mem))
    host = mem["host"]["items"]
    con.print("host RAM: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in host.items() if v)
              + ("" if mem["host"]["weights_in_ram"] else " (weights beyond RAM read from disk)"))

    con.print(_weights_by_kind(w["layers"]))
    if doc.get("pareto"):
        t = Table(title="Size-error Pareto curve (each point optimal for its size)")
        for col in ("weights", "avg bpw", "expected error"):
            t.add_column(col, justify="right")
        pts = doc["pareto"]
        for pt in pts[:: max(1, len(pts) // 8)] + [pts[-1]]:
            t.add_row(fmt_bytes(pt["bytes"]), f"{pt['avg_bpw']:.2f}", f"{pt['expected_error']:.3f}")
        con.print(t)
    con.print(f"wrote {path}")


def _decisions(rows: list[dict]) -> Table:
    t = Table(title="Decisions", show_lines=False, expand=False)
    t.add_column("what", style="bold")
    t.add_column("choice")
    t.add_column("why", overflow="fold", max_width=90)
    for d in rows:
        t.add_row(d["what"], d["choice"], d["why"])
    return t


def _memory(mem: dict) -> Table:
    t = Table(title=f"GPU memory: {fmt_bytes(mem['total_bytes'])} of {fmt_bytes(mem['budget_bytes'])} "
                    f"({fmt_bytes(mem['free_bytes'])} free)")
    t.add_column("item")
    t.add_column("bytes", justify="right")
    t.add_column("size", justify="right")
    t.add_column("share", justify="right")
    for name, n in mem["items"].items():
        if n:
            t.add_row(name, f"{n:,}", fmt_bytes(n), f"{n / mem['budget_bytes']:.1%}")
    t.add_row("[bold]total[/]", f"[bold]{mem['total_bytes']:,}[/]", fmt_bytes(mem["total_bytes"]),
              f"{mem['total_bytes'] / mem['budget_bytes']:.1%}")
    return t


def target_plan(doc: dict, path: str) -> None:
    """A plan for another engine: summary, decisions, memory budget, host memory."""
    con = _console()
    g, tgt = doc["gpu"], doc["target"]
    cards = f"{g['count']} x {g['name']}" if g["count"] > 1 else g["name"]
    nodes = f" on {g['nodes']} nodes" if g.get("nodes", 1) > 1 else ""
    con.print(f"[bold]{doc['model']['name']}[/] on [bold]{cards}[/]{nodes} with [bold]{tgt['engine']}[/] "
              f"{tgt['version']}: mode [bold]{doc['mode']}[/], {doc['weights']['format']}, context "
              f"{doc['context']['length']}, KV {doc['kv_cache']['dtype']}")
    p = doc["predicted"]
    full = p.get("decode_tokens_per_s_full_context")
    at_end = (f" on a short context, {fmt_rate(full)} at the end of a {doc['context']['length']}-token context"
              if full else "")
    con.print(f"predicted: decode [bold]{fmt_rate(p['decode_tokens_per_s'])}[/]{at_end}")
    con.print(_decisions(doc["decisions"]))
    con.print(_memory(doc["memory"]))
    host = doc["memory"]["host"]["items"]
    if any(host.values()):
        con.print("host RAM: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in host.items() if v))
    con.print(f"wrote {path}; `vramwise export --plan {path}` prints the commands")


def _weights_by_kind(layers: list[dict]) -> Table:
    by: dict[str, list[dict]] = defaultdict(list)
    for row in layers:
        by[row["name"].rsplit(".", 1)[-1]].append(row)
    t = Table(title="Quantized linears by kind")
    for col in ("kind", "tensors", "avg bpw", "min", "max", "bytes", "most used option"):
        t.add_column(col, justify="right" if col not in ("kind", "most used option") else "left")
    for kind, rows in by.items():
        n = sum(r["bytes"] for r in rows)
        bpws = [r["bpw"] for r in rows]
        options: dict[str, int] = defaultdict(int)
        for r in rows:
            options[r["option"]] += 1
        top = max(options, key=options.get)
        weighted = sum(r["bpw"] * r["bytes"] / r["bpw"] for r in rows) / sum(r["bytes"] / r["bpw"] for r in rows)
        t.add_row(kind, str(len(rows)), f"{weighted:.2f}", f"{min(bpws):.2f}", f"{max(bpws):.2f}", fmt_bytes(n),
                  f"{top} ({options[top]})")
    return t


def table(title: str, columns: Iterable[str], rows: Iterable[Iterable[str]]) -> None:
    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*r)
    _console().print(t)


def error(message: str) -> None:
    """One plain line on stderr, never wrapped: scripts grep it."""
    print(f"vramwise: error: {message}", file=sys.stderr)

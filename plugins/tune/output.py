"""What a search leaves: the front as a console table, markdown and a plot, and ``tune.json``."""
from __future__ import annotations

from pathlib import Path

from rich.table import Table

from graphopt.cli.console import human_bytes, human_count


def rows(front: list[dict], chosen: dict | None, baseline: dict) -> list[list[str]]:
    out = []
    for p in front:
        mark = "*" if chosen is not None and p["trial"] == chosen["trial"] else ""
        out.append([f"{p['trial']}{mark}", p["pipeline"], f"{p['latency_ms']:.3f}", f"{p['latency_ratio']:.2f}x",
                    human_bytes(p["bytes"]), f"{p['bytes'] / baseline['bytes']:.2f}x", human_count(p["macs"]),
                    f"{p['quality']:.4f}", "-" if p.get("top1") is None else f"{p['top1']:.2%}",
                    "-" if p.get("cosine") is None else f"{p['cosine']:.4f}"])
    return out


HEAD = ("trial", "pipeline", "ms", "x ms", "size", "x size", "MACs", "quality", "top-1", "cosine")


def front_table(front: list[dict], chosen: dict | None, baseline: dict, title: str) -> Table:
    t = Table(title=title, title_justify="left")
    for col in HEAD:
        t.add_column(col, justify="left" if col in ("trial", "pipeline") else "right", no_wrap=col != "pipeline",
                     overflow="fold", ratio=1 if col == "pipeline" else None)
    for row in rows(front, chosen, baseline):
        t.add_row(*row)
    return t


def markdown(front: list[dict], chosen: dict | None, baseline: dict) -> str:
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(c if i != 1 else f"`{c}`" for i, c in enumerate(row)) + " |"
              for row in rows(front, chosen, baseline)]
    return "\n".join(lines) + "\n"


def plot(done: list[dict], front: list[dict], chosen: dict | None, budget: dict, path: Path, title: str) -> None:
    """Latency against size, coloured by quality; the front outlined, the chosen point starred, budgets dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [p for p in done if p["state"] == "complete"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    if ok:
        dots = ax.scatter([p["bytes"] / 1e6 for p in ok], [p["latency_ms"] for p in ok],
                          c=[p["quality"] for p in ok], cmap="viridis", s=36, zorder=2)
        fig.colorbar(dots, ax=ax, label="quality")
    ax.scatter([p["bytes"] / 1e6 for p in front], [p["latency_ms"] for p in front], s=110, facecolors="none",
               edgecolors="#cf222e", linewidths=1.4, label="Pareto front", zorder=3)
    for p in front:
        ax.annotate(str(p["trial"]), (p["bytes"] / 1e6, p["latency_ms"]), textcoords="offset points",
                    xytext=(6, 4), fontsize=8)
    if chosen is not None:
        ax.scatter([chosen["bytes"] / 1e6], [chosen["latency_ms"]], marker="*", s=260, color="#bf8700",
                   edgecolors="black", label=f"chosen (trial {chosen['trial']})", zorder=4)
    if "size" in budget:
        ax.axvline(budget["size"] / 1e6, color="grey", linestyle="--", linewidth=1, label="size budget")
    if "latency" in budget:
        ax.axhline(budget["latency"], color="grey", linestyle=":", linewidth=1, label="latency budget")
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("latency, median ms (1 thread)" if ok and ok[0].get("threads", 1) == 1 else "latency, median ms")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)

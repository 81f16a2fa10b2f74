"""The benchmark figure: throughput per case and contender, memory growth, growth with size, tiny tensors."""

from __future__ import annotations

from pathlib import Path


def _bars(ax, cases: list[dict], key: str, title: str) -> None:
    rows = [c for c in cases if c.get(key)]
    if not rows:
        ax.set_visible(False)
        return
    names = list(dict.fromkeys(n for c in rows for n in c[key]))
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(xs, [c[key].get(name, {}).get("gbps", 0.0) for c in rows], width, label=name)
    ax.set_xticks(range(len(rows)), [c["label"].replace(" ", "\n", 2) for c in rows], fontsize=7)
    ax.set_ylabel("GB/s (higher is better)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=6, ncol=2)
    ax.grid(axis="y", alpha=0.3)


def _memory(ax, cases: list[dict]) -> None:
    worst: dict[str, float] = {}
    for c in cases:
        for kind in ("save_summary", "load_summary"):
            for name, v in (c.get(kind) or {}).items():
                label = f"{kind[:4]}: {name}"
                worst[label] = max(worst.get(label, 0.0), v["mem_mb"])
    if not worst:
        ax.set_visible(False)
        return
    labels = sorted(worst, key=worst.get)
    ax.barh(
        labels, [max(worst[k], 0.1) for k in labels], color=["C0" if k.startswith("save") else "C1" for k in labels]
    )
    ax.set_xscale("log")
    ax.axvline(100, color="k", ls="--", lw=0.8)
    ax.set_xlabel("peak RSS growth per rank, MB (worst case; log)")
    ax.set_title("memory growth (dashed: 100 MB target)", fontsize=10)
    ax.tick_params(axis="y", labelsize=6)


def _growth(ax, cases: list[dict]) -> None:
    rows = sorted(
        (c for c in cases if c["layout"] == "row" and not c["durable"] and c.get("save_summary")),
        key=lambda c: (c["world"], c["bytes"]),
    )
    worlds = sorted({c["world"] for c in rows})
    shown = False
    for w in worlds:
        sub = [c for c in rows if c["world"] == w]
        if len(sub) < 2:
            continue
        for name in sub[0]["save_summary"]:
            xs = [c["bytes"] / 1e9 for c in sub if name in c["save_summary"]]
            ys = [c["save_summary"][name]["median_s"] for c in sub if name in c["save_summary"]]
            ax.plot(xs, ys, marker="o", label=f"{name} (W={w})")
            shown = True
    if not shown:
        ax.set_visible(False)
        return
    ax.set_xlabel("checkpoint GB")
    ax.set_ylabel("save seconds")
    ax.set_title("save time vs bytes (row shards)", fontsize=10)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)


def _many(ax, many: dict | None) -> None:
    if not many or not many.get("save_summary"):
        ax.set_visible(False)
        return
    names, ys, colors = [], [], []
    for kind, color in (("save_summary", "C0"), ("load_summary", "C1")):
        for name, v in many[kind].items():
            names.append(f"{kind[:4]}: {name}")
            ys.append(v["median_s"])
            colors.append(color)
    ax.barh(names, ys, color=colors)
    ax.set_xlabel("seconds (lower is better)")
    ax.set_title(f"{many['count']} fp32 8x8 DTensors, {many['world']} ranks", fontsize=10)
    ax.tick_params(axis="y", labelsize=7)


def plot(data: dict, path: Path) -> Path | None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed; no plot (pip install matplotlib)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = data["cases"]
    fig, axes = plt.subplots(3, 2, figsize=(15, 14))
    _bars(axes[0][0], [c for c in cases if not c["durable"]], "save_summary", "save throughput")
    _bars(axes[0][1], cases, "load_summary", f"load throughput ({data['meta']['cache']} cache)")
    _bars(axes[1][0], [c for c in cases if c["durable"]], "save_summary", "durable save (fsync before commit)")
    _memory(axes[1][1], cases)
    _growth(axes[2][0], cases)
    _many(axes[2][1], data.get("many"))
    m = data["meta"]["machine"]
    fig.suptitle(
        f"hf_storage benchmark {data['meta']['date'][:10]} - {m['cpu']}, {m['cores']} cores, "
        f"{m['memory_gb']} GiB, torch {m['torch']}; median of {data['meta']['reps']} "
        f"(torch HF writer, gather: {data['meta'].get('slow_reps', data['meta']['reps'])}); "
        f"{data['meta']['cache']}-cache loads",
        fontsize=11,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)

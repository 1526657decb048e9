"""Results as a console table, results.json, a Markdown report and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ferry.core.fileio import atomic_path, write_bytes_atomic, write_json_atomic

REQUIRED_ROW_KEYS = (
    "model", "backend", "engine", "precision", "provider", "device", "threads", "scenario", "batch_size",
    "calls", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "throughput_ips", "stable", "attempts", "session_load_s",
    "first_inference_ms", "cpu", "cpu_class", "cpu_flags", "cpu_count", "versions",
)


def validate_results(results: dict[str, Any]) -> None:
    """The JSON schema, checked: top-level keys and every row's fields and types."""
    for key in ("schema", "created", "machine", "config", "rows", "skipped", "ratios", "ratios_left_out", "checks", "notes"):
        if key not in results:
            raise ValueError(f"results lack {key!r}")
    for row in results["rows"]:
        missing = [k for k in REQUIRED_ROW_KEYS if k not in row]
        if missing:
            raise ValueError(f"row {row.get('model')}/{row.get('backend')} lacks {missing}")
        if not (row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]):
            raise ValueError(f"row {row['backend']}: percentiles out of order")
        if not isinstance(row["threads"], int) or row["threads"] < 1:
            raise ValueError(f"row {row['backend']}: threads {row['threads']!r} were not read back")
        min_calls = row.get("min_calls", results["config"]["min_calls"] if row["batch_size"] == 1 else 10)
        if row["calls"] < min_calls:
            raise ValueError(f"row {row['backend']} batch {row['batch_size']}: {row['calls']} calls < the promised {min_calls}")
    for s in results["skipped"]:
        if not s.get("reason"):
            raise ValueError(f"skipped backend {s.get('backend')} has no reason")


def table(results: dict[str, Any]) -> str:
    head = f"{'model':<10} {'backend':<18} {'provider':<22} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'img/s':>10} {'stable':>6}"
    lines = [head, "-" * len(head)]
    for r in results["rows"]:
        lines.append(
            f"{r['model']:<10} {r['backend']:<18} {r['provider'][:22]:<22} {r['batch_size']:>5} {r['p50_ms']:>9.3f} "
            f"{r['p90_ms']:>9.3f} {r['p99_ms']:>9.3f} {r['throughput_ips']:>10.1f} {'yes' if r['stable'] else 'NO':>6}"
        )
    for s in results["skipped"]:
        lines.append(f"{s['model']:<10} {s['backend']:<18} skipped: {s['reason']}")
    for o in results.get("overhead", []):
        bound = f" (bound {o['bound']:.0%}: {'met' if o['within_bound'] else 'NOT met'})" if o.get("bound") is not None else ""
        lines.append(f"{o['model']:<10} runtime overhead: Classifier {o['classifier_p50_ms']:.3f} ms vs session.run "
                     f"{o['session_run_p50_ms']:.3f} ms (p50, {o['input']}): {o['overhead']:+.1%}{bound}"
                     + (f"; its own work alone {o['own_work_us']:.1f} us ({o['own_work_share']:.1%})" if "own_work_us" in o else ""))
    if results["ratios"]:
        lines.append("")
        for q in results["ratios"]:
            lines.append(f"{q['model']:<10} {q['comparison']:<55} batch-1 x{q['batch1_p50_speedup']:.2f}{_ci(q)}   "
                         f"peak throughput {_x(q['peak_throughput_speedup'])}")
    for c in results.get("checks", []):
        value = (f" x{c['ratio']:.3f} against {_against(c)} ({c['ci'][0]:.3f}-{c['ci'][1]:.3f}; at most {c['factor']:.3g})"
                 if "ratio" in c else "")
        lines.append(f"{c['model']:<10} {c['verdict'].upper()}: {c['check']}{value}{'  ' + c['why'] if c.get('why') else ''}")
    for q in results.get("ratios_left_out", []):
        lines.append(f"{q['model']:<10} {q['comparison']:<45} left out: {q['reason']}")
    return "\n".join(lines)


def _x(v: float) -> str:
    """A speed-up, or "-" where a peak had no stable row to come from."""
    return f"x{v:.2f}" if v == v else "- (no stable peak)"


def _ci(q: dict[str, Any]) -> str:
    lo, hi = q.get("batch1_ci", [float("nan")] * 2)
    return f" [{lo:.2f}-{hi:.2f}]" if lo == lo and hi == hi else ""


def _against(check: dict[str, Any]) -> str:
    """The engine a check was measured against (the fastest of its others over the run), the others'
    ratios in brackets; results written before checks named it: the others."""
    if "fastest" not in check:
        return ", ".join(check.get("against", []))
    others = [f"{a}: x{e['ratio']:.3f}" for a, e in check.get("each", {}).items() if a != check["fastest"]]
    return check["fastest"] + (f" [others: {'; '.join(others)}]" if others else "")


def _stable(row: dict[str, Any]) -> str:
    tries = f" after {row['attempts']} measurements" if row.get("attempts", 1) > 1 else ""
    return ("yes" + tries) if row["stable"] else f"**no** (noisy{tries}; left out of ratios)"


def markdown(results: dict[str, Any], plots: list[str]) -> str:
    m = results["machine"]
    out = [
        "# ferry benchmark report",
        "",
        f"- created: {results['created']}",
        f"- CPU: {m['cpu']} ({m.get('cpu_id', '')}; {m['logical_cpus']} logical cores); class **{m['cpu_class']}** "
        f"(flags: {' '.join(m['cpu_flags']) or 'none of interest'}); GPU: {m['gpu'] or 'none'}",
        f"- threads (read back per row): {', '.join(sorted({str(r['threads']) for r in results['rows']})) or '-'}; "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v),
        *[f"- {n}" for n in results["notes"]],
        "",
        "## Speed-ups (rows of this run)",
        "",
        "Batch-1 speed-ups of CPU backends are medians of per-round ratios from interleaved rounds, with their "
        "~95% interval in brackets; GPU speed-ups compare two rows measured apart.",
        "",
        "| model | comparison | batch-1 speed-up | from | peak-throughput speed-up |",
        "| --- | --- | ---: | --- | ---: |",
        *[f"| {q['model']} | {q['comparison']} | {q['batch1_p50_speedup']:.2f}x{_ci(q)} | {q.get('from', '')} | "
          f"{_x(q['peak_throughput_speedup'])} |" for q in results["ratios"]],
        *([""] + [f"Left out of the ratios: {q['model']} {q['comparison']} ({q['reason']})."
                  for q in results.get("ratios_left_out", [])] if results.get("ratios_left_out") else []),
        "",
        *(["## Checks (batch 1, interleaved rounds)", "",
            "Each: the first backend's latency over that of the fastest of the others over the run (the median of the "
            "per-round ratios and its ~95% interval; the others' ratios in square brackets; a row that runs the same "
            "engine as one of the others may be judged by that engine's ratio, given in its note); "
            "met: the whole interval within the bound; met within noise: the median within it; within noise: the "
            "interval crosses the bound, the median beyond it (not shown to be slower); not met: the whole interval "
            "beyond it.", "",
            "| model | check | verdict | against | ratio | interval | bound |", "| --- | --- | --- | --- | ---: | --- | ---: |",
            *[f"| {c['model']} | {c['check']} | **{c['verdict']}** | "
              + (f"{_against(c)}{' (' + c['why'] + ')' if c.get('why') else ''} | {c['ratio']:.3f} | {c['ci'][0]:.3f}-{c['ci'][1]:.3f} | "
                 f"{c['factor']:.3g} |" if "ratio" in c
                 else f"- | - | {c.get('why', '')} | - |")
              for c in results.get("checks", [])], ""] if results.get("checks") else []),
        "## Single-stream (batch 1)",
        "",
        "| model | backend | provider | precision | threads | p50 ms | p90 ms | p99 ms | calls | rounds | session load s | first inference ms | stable |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        *[f"| {r['model']} | {r['backend']} | {r['provider']} | {r.get('precision', '')} | {r['threads']} | {r['p50_ms']:.3f} | "
          f"{r['p90_ms']:.3f} | {r['p99_ms']:.3f} | {r['calls']} | {r.get('rounds', '-')} | {r['session_load_s']:.2f} | "
          f"{r['first_inference_ms']:.1f} | {_stable(r)} |" for r in results["rows"] if r["batch_size"] == 1],
        "",
        "## Offline (throughput)",
        "",
        "| model | backend | batch | images/s | p50 ms per batch | stable |",
        "| --- | --- | ---: | ---: | ---: | --- |",
        *[f"| {r['model']} | {r['backend']} | {r['batch_size']} | {r['throughput_ips']:.1f} | {r['p50_ms']:.2f} | "
          f"{_stable(r)} |" for r in results["rows"]],
        "",
    ]
    if results.get("overhead"):
        out += ["## Runtime overhead (CPU, batch 1)", "",
                "`Classifier.predict` from a decoded image to labels, against `session.run` on a prepared tensor "
                "(alternating rounds, medians). Own work: `Classifier.predict` with the engine's call taken out "
                "(top 5), as a share of `session.run`.", "",
                "| model | input | session.run p50 ms | Classifier p50 ms | overhead (interval) | bound | own work |",
                "| --- | --- | ---: | ---: | ---: | --- | ---: |",
                *[f"| {o['model']} | {o['input']} | {o['session_run_p50_ms']:.3f} | {o['classifier_p50_ms']:.3f} | "
                  f"{o['overhead']:+.1%} ({o['overhead_ci'][0]:+.1%} to {o['overhead_ci'][1]:+.1%}) | "
                  + (f"{o['bound']:.0%}: {'met' if o['within_bound'] else '**not met**'}" if o.get("bound") is not None else "-")
                  + (f" | {o['own_work_us']:.1f} us ({o['own_work_share']:.1%})" if "own_work_us" in o else " | -")
                  + " |" for o in results["overhead"]], ""]
    placed = [r for r in results["rows"] if r.get("placement") and r["batch_size"] == 1]
    if placed:
        out += ["## Engine details (node placement of GPU sessions, what `auto` chose and why, torch.compile mode)", "",
                *[f"- {r['model']} {r['backend']}: {r['placement']}" for r in placed], ""]
    if results["skipped"]:
        out += ["## Skipped backends", "", "| model | backend | batch | reason |", "| --- | --- | --- | --- |",
                *[f"| {s['model']} | {s['backend']} | {s.get('batch_size', 'all')} | {s['reason']} |" for s in results["skipped"]], ""]
    out += [f"![{p}]({p})" for p in plots]
    return "\n".join(out) + "\n"


def plot(results: dict[str, Any], out_dir: Path) -> list[str]:
    """One PNG per model: latency per batch and throughput against batch size, a line per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for model in sorted({r["model"] for r in results["rows"]}):
        rows = [r for r in results["rows"] if r["model"] == model]
        fig, (ax_lat, ax_tp) = plt.subplots(1, 2, figsize=(11, 4.2))
        for backend in dict.fromkeys(r["backend"] for r in rows):
            rs = sorted((r for r in rows if r["backend"] == backend), key=lambda r: r["batch_size"])
            label = f"{backend} ({rs[0]['provider']})"
            ax_lat.plot([r["batch_size"] for r in rs], [r["p50_ms"] for r in rs], "o-", label=label)
            ax_tp.plot([r["batch_size"] for r in rs], [r["throughput_ips"] for r in rs], "o-", label=label)
        batches = sorted({r["batch_size"] for r in rows})
        for ax, ylabel in ((ax_lat, "p50 latency per batch (ms)"), (ax_tp, "throughput (images/s)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(batches, [str(b) for b in batches])
            ax.set_xlabel("batch size")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3, which="both")
        ax_tp.legend(fontsize=8)
        m = results["machine"]
        fig.suptitle(f"{model}: {m['cpu']} ({m.get('cpu_class', '?')}, {m.get('logical_cpus', '?')} cores)"
                     + (f" / {m['gpu']}" if m["gpu"] else ""))
        fig.tight_layout()
        name = f"{model}.png"
        with atomic_path(out_dir / name) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        names.append(name)
    if results["ratios"]:
        fig, ax = plt.subplots(figsize=(9, 0.45 * len(results["ratios"]) + 1.2))
        labels = [f"{q['model']}: {q['comparison']}" for q in results["ratios"]]
        values = [q["batch1_p50_speedup"] for q in results["ratios"]]
        ax.barh(labels[::-1], values[::-1], color="tab:blue")
        ax.axvline(1.0, color="black", lw=0.8)
        for y, v in enumerate(values[::-1]):
            ax.text(v, y, f" {v:.2f}x", va="center", fontsize=8)
        ax.set_xlabel("speed-up at batch 1 (p50 latency, same run)")
        fig.tight_layout()
        with atomic_path(out_dir / "speedups.png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)
        names.append("speedups.png")
    return names


def write_all(results: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    validate_results(results)
    out_dir = Path(out_dir)
    write_json_atomic(out_dir / "results.json", results)
    plots = plot(results, out_dir) if results["rows"] else []
    write_bytes_atomic(out_dir / "report.md", markdown(results, plots).encode())
    return {"json": out_dir / "results.json", "report": out_dir / "report.md", **{p: out_dir / p for p in plots}}

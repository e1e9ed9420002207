"""``report``: one self-contained HTML file per run or comparison, to look at and to share.

Everything is inside the file: figures are inline SVG from matplotlib (text drawn as paths, so no
fonts), images are JPEG thumbnails in data URIs, and the table's data is one JSON block read by a
few lines of plain JavaScript. Nothing is fetched from anywhere. Every string that came from a
prompt, a path or a model name is escaped (HTML text and attributes via ``html.escape``; the JSON
block with ``<``, ``>`` and ``&`` as unicode escapes), and the script only ever sets ``textContent``.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipeval.errors import ClipevalError

TABLE_THUMB = 72
CARD_THUMB = 176
BEST_WORST = 8


@dataclass
class ReportRun:
    name: str
    path: Path
    manifest: dict[str, Any]
    summary: dict[str, Any]
    scores: Any  # every row of scores.csv, flagged ones included
    image_root: Path

    def image(self, relative: str) -> Path | None:
        return self.image_root / relative if relative else None


def load(path: str | Path, metric: str | None = None) -> ReportRun:
    from clipeval.metrics import select
    from clipeval.store import load_run

    record = select(load_run(path), metric)
    if record.summary is None:
        raise ClipevalError(f"{path}: not a finished clipeval run (summary.json missing)")
    return ReportRun(str(path), record.path, record.manifest, record.summary, record.scores, record.image_root)


# -- pieces -------------------------------------------------------------------------------------------

def e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def thumbnail(path: Path | None, size: int) -> str | None:
    """A JPEG data URI of the image fitted in size×size, or None when the file is missing or unreadable."""
    if path is None or not path.is_file():
        return None
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((size, size))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=82)
    except OSError:
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def img(uri: str | None, alt: str, size: int) -> str:
    if uri is None:
        return f'<div class="missing" style="width:{size}px;height:{size}px">no image</div>'
    return f'<img src="{uri}" alt="{e(alt)}" loading="lazy">'


def figure_svg(draw, *, width: float, height: float) -> str:
    """A matplotlib figure as inline SVG. Text is drawn as paths (no font, no text node from data)."""
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": "clipeval", "font.size": 9}):
        fig = Figure(figsize=(width, height))
        draw(fig)
        fig.tight_layout()
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]  # drop the XML declaration and doctype: this is inlined
    return re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.S)


def _histogram(runs: list[ReportRun]) -> str:
    from matplotlib.ticker import MaxNLocator

    def draw(fig):
        ax = fig.subplots()
        values = [r.scores.loc[r.scores["flag"] == "", "clip_score"].dropna() for r in runs]
        low = min(v.min() for v in values)
        high = max(v.max() for v in values)
        bins = 40 if high > low else 1
        for run, v in zip(runs, values):
            ax.hist(v, bins=bins, range=(low, high), histtype="step" if len(runs) > 1 else "bar",
                    linewidth=1.5, alpha=0.9, label=Path(run.name).name or run.name)
        ax.set_xlabel("CLIP score (cosine)")
        ax.set_ylabel("images")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # images come whole
        if len(runs) > 1:
            ax.legend()

    return figure_svg(draw, width=6.4, height=2.8)


def _group_bars(summary: dict[str, Any], key: str) -> str | None:
    groups = summary.get(key) or {}
    if not groups:
        return None
    labels = list(groups)

    def draw(fig):
        ax = fig.subplots()
        means = [groups[g]["mean"] for g in labels]
        errors = [[m - (groups[g]["ci"] or [m, m])[0] for g, m in zip(labels, means)],
                  [(groups[g]["ci"] or [m, m])[1] - m for g, m in zip(labels, means)]]
        colors = ["#c9c9c9" if groups[g]["few_prompts"] else "#4c72b0" for g in labels]
        bars = ax.barh(range(len(labels)), means, xerr=errors, color=colors, capsize=2)
        for i, bar in enumerate(bars):
            bar.set_gid(f"{key}-bar-{i}")  # so a browser test can measure each bar
        ax.set_yticks(range(len(labels)), [f"{g} ({groups[g]['prompts']})" for g in labels])
        ax.invert_yaxis()
        ax.set_xlabel("mean CLIP score from 0, 95% CI (grey: fewer than 10 prompts)")
        # A bar's length is its value: the axis starts at 0 (below it only for negative means),
        # never at the smallest mean, where 0.29 would look half of 0.43.
        lows = [m - lo for m, lo in zip(means, errors[0])]
        highs = [m + hi for m, hi in zip(means, errors[1])]
        span = max(max(highs), 0) - min(min(lows), 0) or 1.0
        ax.set_xlim(min(min(lows), 0) - (0.02 * span if min(lows) < 0 else 0), max(max(highs), 0) + 0.02 * span)

    return figure_svg(draw, width=6.4, height=0.9 + 0.28 * len(labels))


def _delta_bars(comparison, kind: str) -> str | None:
    import matplotlib.colors

    runs = [r for r in comparison.runs if any(g.kind == kind for g in r.groups)]
    if not runs:
        return None
    labels = sorted({g.label for r in runs for g in r.groups if g.kind == kind})

    def draw(fig):
        ax = fig.subplots()
        height = 0.8 / len(runs)
        for i, run in enumerate(runs):
            by_label = {g.label: g for g in run.groups if g.kind == kind}
            ys = [j + i * height for j in range(len(labels))]
            deltas = [by_label[label].delta if label in by_label else 0.0 for label in labels]
            cis = [by_label[label].delta_ci if label in by_label else None for label in labels]
            errors = [[d - (c or (d, d))[0] for d, c in zip(deltas, cis)], [(c or (d, d))[1] - d for d, c in zip(deltas, cis)]]
            color = matplotlib.colors.to_rgb(f"C{i}")
            colors = [(*color, 0.35 if label in by_label and by_label[label].few_prompts else 1.0) for label in labels]
            ax.barh(ys, deltas, height=height, xerr=errors, capsize=2, color=colors, label=Path(run.name).name or run.name)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_yticks([j + 0.4 - height / 2 for j in range(len(labels))], labels)
        ax.invert_yaxis()
        ax.set_xlabel(f"delta vs {Path(comparison.baseline).name or comparison.baseline}, 95% CI (pale: fewer than 10 prompts)")
        if len(runs) > 1:
            ax.legend()

    return figure_svg(draw, width=6.4, height=0.9 + 0.3 * len(labels) * max(1, len(runs) * 0.6))


def _is_demo(run: ReportRun) -> bool:
    m = run.manifest
    settings = m.get("settings", {})
    return (m.get("checkpoint") or {}).get("kind") == "demo" or "demo" in (settings.get("checkpoint"), settings.get("clip_model"))


def _demo_warning(runs) -> str:
    return "<p class='warn big' id='demo-warning'>DEMO MODELS: tiny random weights; these scores mean nothing.</p>"


DIFFERENCE_KEYS = (
    ("settings", "checkpoint"), ("settings", "base_model"), ("settings", "weights"), ("settings", "lora_scale"),
    ("settings", "clip_model"), ("settings", "library_sha256"), ("generation", "seed"), ("generation", "steps"),
    ("generation", "guidance_scale"), ("generation", "width"), ("generation", "height"),
    ("generation", "negative_prompt"), ("generation", "scheduler"), ("settings", "dtype"),
    ("settings", "clip_dtype"), ("settings", "preprocess"), ("settings", "device_type"),
    ("selection", "images_per_prompt"), ("selection", "prompts"),
)


def _differences(runs: list[ReportRun]) -> str:
    """The settings in which the runs differ, first: a guidance of 7.5 against 3.0 explains a
    difference the tables below only measure."""
    rows = []
    for block, key in DIFFERENCE_KEYS:
        values = [(r.manifest.get(block) or {}).get(key) for r in runs]
        if any(v is not None for v in values) and len({json.dumps(v, sort_keys=True) for v in values}) > 1:
            rows.append(f"<tr><th>{e(key)}</th>" + "".join(f"<td>{e('—' if v is None else v)}</td>" for v in values) + "</tr>")
    names = "".join(f"<th>{e(Path(r.name).name or r.name)}</th>" for r in runs)
    if not rows:
        return ("<section id='differences'><h2>What differs</h2><p class='meta'>The runs share every recorded "
                "setting: what differs is the checkpoint's weights.</p></section>")
    return (f"<section id='differences'><h2>What differs</h2><table class='compare'><tr><th>setting</th>{names}</tr>"
            f"{''.join(rows)}</table></section>")


def _headline(run: ReportRun) -> str:
    s, m = run.summary, run.manifest
    settings = m.get("settings", {})
    gen = m.get("generation", {})
    ci = s.get("clip/mean_ci")
    flagged = s.get("flagged_images") or {}
    facts = [
        ("images", s.get("images")), ("prompts", s.get("prompts")),
        ("flagged", ", ".join(f"{n} {k}" for k, n in flagged.items()) or "none"),
        ("std (sample)", _f(s.get("clip/std"))), ("median", _f(s.get("clip/median"))),
        ("min", _f(s.get("clip/min"))), ("max", _f(s.get("clip/max"))),
        ("checkpoint", settings.get("checkpoint")), ("pipeline", settings.get("pipeline")),
        ("CLIP model", settings.get("clip_model")), ("library", (m.get("library") or {}).get("name") or settings.get("prompts")),
        ("steps", gen.get("steps")), ("guidance", gen.get("guidance_scale")),
        ("size", f"{gen['width']}×{gen['height']}" if gen.get("width") else None), ("seed", gen.get("seed")),
        ("dtype", settings.get("dtype")), ("device", settings.get("device_type") or str((m.get("device") or {}).get("name") or "").split(":")[0]),
        ("hardware", (m.get("device") or {}).get("hardware")),
        ("clipeval", (m.get("versions") or {}).get("clipeval")), ("finished", m.get("finished_at")),
    ]
    rows = "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in facts if v not in (None, ""))
    ci_text = f" <span class='ci'>95% CI [{ci[0]:.4f}, {ci[1]:.4f}]</span>" if ci else ""
    few = " <span class='warn'>few prompts: the interval says little</span>" if s.get("few_prompts") else ""
    return (f"<section class='headline'><h2>{e(run.name)}</h2>"
            f"<p class='big'>clip/mean <b>{_f(s.get('clip/mean'))}</b>{ci_text}{few}</p>"
            f"{_sequential(s.get('sequential'))}<table class='facts'>{rows}</table></section>")


def _sequential(q: dict[str, Any] | None) -> str:
    """A run stopped by --until-decided: its verdict, how many prompts of the seeded order it took."""
    if not q:
        return ""
    low, high = q["mean_delta_ci"]
    level = int(round(100 * (1 - q["alpha"])))
    verdict = (f"<b>{e(q['verdict'])}</b> (margin {q['margin']:g}) after {q['prompts_used']} of {q['library_prompts']} "
               "prompts" if q["decided"] else f"<b>undecided</b> after {q['prompts_used']} of {q['library_prompts']} prompts")
    scorer = f" of {e(q['scorer'])}" if q.get("scorer") else ""
    bound = (q.get("rule") or {}).get("delta_bound")
    rule = e(q["method"]) + (f", deltas assumed within ±{bound:g}" if bound else "")
    left = (f" A delta left that bound at prompt {q['bound_exceeded_at']}; from there it decided on the whole range."
            if q.get("bound_exceeded_at") else "")
    return (f"<p class='sequential'>Sequential decision{scorer} against {e(q['baseline'])}: {verdict}; mean paired "
            f"delta {_f(q['mean_delta'], True)}, {level}% sequence [{_f(low, True)}, {_f(high, True)}] ({rule}).{left} "
            f"The statistics below cover the {q.get('prompts_generated', q['prompts_seen'])} prompts generated, the "
            "start of the seeded order.</p>")


def _f(x: Any, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "n/a"
    return f"{x:+.4f}" if signed else f"{x:.4f}"


def _prompt_cards(run: ReportRun, prompt_ids: list[int], title: str) -> str:
    cards = []
    for pid in prompt_ids:
        rows = run.scores[run.scores["prompt_id"] == pid].sort_values("sample")
        first = rows.iloc[0]
        usable = rows[(rows["flag"] == "") & rows["clip_score"].notna()]["clip_score"]
        images = "".join(
            f"<figure>{img(thumbnail(run.image(r.image), CARD_THUMB), f'prompt {pid} sample {r.sample}', CARD_THUMB)}"
            f"<figcaption>{_f(r.clip_score)}{' · ' + e(r.flag) if r.flag else ''}<br>seed {e(r.seed)}</figcaption></figure>"
            for r in rows.itertuples()
        )
        cards.append(f"<div class='card'>{_prompt_text(first.prompt)}"
                     f"<p class='meta'>#{pid} · {e(first.category) or '—'} · mean {_f(usable.mean() if len(usable) else None)}</p>"
                     f"<div class='images'>{images}</div></div>")
    return f"<section><h2>{e(title)}</h2><div class='cards'>{''.join(cards)}</div></section>"


FOLD_AT = 280  # characters of a prompt shown before it folds


def _prompt_text(prompt: str) -> str:
    """A prompt, folded past FOLD_AT characters (a 3,000-character prompt filled a screen)."""
    if len(prompt) <= FOLD_AT:
        return f"<p class='prompt'>{e(prompt)}</p>"
    return (f"<details class='prompt'><summary>{e(prompt[:FOLD_AT])}… <span class='meta'>({len(prompt)} characters: "
            f"show all)</span></summary>{e(prompt)}</details>")


def _best_worst(run: ReportRun) -> str:
    good = run.scores[(run.scores["flag"] == "") & run.scores["clip_score"].notna()]
    means = good.groupby("prompt_id")["clip_score"].mean().sort_values(kind="stable")
    n = min(BEST_WORST, len(means) // 2 or 1)
    return (_prompt_cards(run, list(means.index[::-1][:n]), f"Best {n} prompts")
            + _prompt_cards(run, list(means.index[:n]), f"Worst {n} prompts"))


def _comparison_table(comparison) -> str:
    level = int(round(comparison.bootstrap["level"] * 100))
    rows = [f"<tr><td>{e(comparison.baseline)} (baseline)</td><td>{comparison.baseline_images}</td>"
            f"<td>{_f(comparison.baseline_mean)} {_ci(comparison.baseline_ci)}</td><td></td><td></td><td></td><td></td></tr>"]
    from clipeval.compare import format_p, power_line, verdict

    for run in comparison.runs:
        o = run.overall
        rows.append(f"<tr><td>{e(run.name)}</td><td>{run.paired_images}</td><td>{_f(o.mean)} {_ci(o.mean_ci)}</td>"
                    f"<td class='{'up' if o.delta > 0 else 'down'}'>{_f(o.delta, True)} {_ci(o.delta_ci, True)}</td>"
                    f"<td>{e(format_p(o.p_value))}</td><td>{o.win_rate:.1%}</td><td>{e(verdict(run, comparison.margin))}</td></tr>")
    head = ("<tr><th>run</th><th>paired images</th><th>mean [" + str(level) + "% CI]</th><th>delta [" + str(level)
            + "% CI]</th><th>p (Wilcoxon)</th><th>win rate</th><th>verdict</th></tr>")
    notes = "".join(f"<p class='warn'>mismatch (allowed): {e(m)}</p>" for m in comparison.mismatches)
    notes += "".join(f"<p class='meta power'>{e(line)}</p>" for line in map(power_line, comparison.runs) if line)
    return f"<section><h2>Comparison</h2><table class='compare'>{head}{''.join(rows)}</table>{notes}</section>"


def _ci(ci, signed: bool = False) -> str:
    return "" if ci is None else f"<span class='ci'>[{_f(ci[0], signed)}, {_f(ci[1], signed)}]</span>"


def _side_by_side(runs: list[ReportRun], comparison, top: int) -> str:
    """Prompts whose mean moved most between the baseline and the first other run, image by image."""
    base, other = runs[0], runs[1]
    a = base.scores[base.scores["flag"] == ""].groupby("prompt_id")["clip_score"].mean()
    b = other.scores[other.scores["flag"] == ""].groupby("prompt_id")["clip_score"].mean()
    moved = (b - a).dropna()
    order = moved.abs().sort_values(ascending=False, kind="stable").index[:top]
    blocks = []
    for pid in order:
        per_run = [r.scores[r.scores["prompt_id"] == pid].sort_values("sample") for r in runs]
        prompt = per_run[0].iloc[0].prompt
        header = "".join(f"<th>{e(Path(r.name).name or r.name)}</th>" for r in runs)
        body = []
        for sample in sorted(set(per_run[0]["sample"])):
            cells = []
            for run, rows in zip(runs, per_run):
                row = rows[rows["sample"] == sample]
                if row.empty:
                    cells.append("<td></td>")
                    continue
                r = row.iloc[0]
                cells.append(f"<td>{img(thumbnail(run.image(r.image), CARD_THUMB), f'{run.name} prompt {pid} sample {sample}', CARD_THUMB)}"
                             f"<div>{_f(r.clip_score)}{' · ' + e(r.flag) if r.flag else ''}</div>"
                             f"<div class='seed'>seed {e(r.seed)}</div></td>")
            body.append(f"<tr><th>sample {sample}</th>{''.join(cells)}</tr>")
        blocks.append(f"<div class='card wide'>{_prompt_text(prompt)}<p class='meta'>#{pid} · delta "
                      f"{_f(float(moved[pid]), True)}</p><table class='side'><tr><th></th>{header}</tr>{''.join(body)}</table></div>")
    same = base.scores.set_index(["prompt_id", "sample"])["seed"].reindex(
        other.scores.set_index(["prompt_id", "sample"]).index).eq(other.scores["seed"].to_numpy()).all()
    title = (f"Biggest changes, {Path(other.name).name or other.name} vs {Path(base.name).name or base.name}: "
             f"same prompt, {'same seeds' if same else 'different seeds'}")
    return f"<section><h2>{e(title)}</h2>{''.join(blocks)}</section>"


def _table_data(runs: list[ReportRun]) -> dict[str, Any]:
    base = runs[0]
    prompts = base.scores.groupby("prompt_id", sort=True).first()
    means = [r.scores[(r.scores["flag"] == "") & r.scores["clip_score"].notna()].groupby("prompt_id")["clip_score"].agg(["mean", "min", "max", "size"]) for r in runs]
    thumbs = base.scores[base.scores["sample"] == base.scores.groupby("prompt_id")["sample"].transform("min")].set_index("prompt_id")["image"]
    rows = []
    for pid, p in prompts.iterrows():
        row = {"id": int(pid), "prompt": p["prompt"], "category": p["category"], "challenge": p["challenge"],
               "thumb": thumbnail(base.image(thumbs.get(pid, "")), TABLE_THUMB)}
        row["means"] = [None if pid not in m.index else float(m.loc[pid, "mean"]) for m in means]
        row["n"] = int(means[0].loc[pid, "size"]) if pid in means[0].index else 0
        row["min"] = None if pid not in means[0].index else float(means[0].loc[pid, "min"])
        row["max"] = None if pid not in means[0].index else float(means[0].loc[pid, "max"])
        rows.append(row)
    return {"runs": [Path(r.name).name or r.name for r in runs], "rows": rows}


def _json_for_script(data: Any) -> str:
    text = json.dumps(data, ensure_ascii=False, allow_nan=False)
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def build(paths: list[str | Path], *, baseline: str | Path | None = None, allow_mismatch: bool = False, top: int = 12,
          metric: str | None = None) -> str:
    """``metric``: the scorer every number of the report is of (``clipeval.metrics``)."""
    from clipeval import compare as comparing
    from clipeval import stats

    if not paths:
        raise ClipevalError("report needs at least one run")
    if len(paths) == 1 and (Path(paths[0]).expanduser() / "history.csv").is_file():
        return build_training(paths[0], top=top, metric=metric)
    order = list(paths)
    if baseline is not None:
        order = [baseline] + [p for p in order if p != baseline]
    runs = [load(p, metric) for p in order]
    sections = [_demo_warning(runs)] if any(_is_demo(r) for r in runs) else []
    if len(runs) > 1:
        sections.append(_differences(runs))
        comparison = comparing.compare([comparing.load_run(p, metric) for p in order], allow_mismatch=allow_mismatch,
                                       boot=stats.Bootstrap())
        sections.append(_comparison_table(comparison))
        for kind, title in (("category", "Per-category deltas"), ("challenge", "Per-challenge deltas")):
            svg = _delta_bars(comparison, kind)
            if svg:
                sections.append(f"<section><h2>{title}</h2><div class='figure'>{svg}</div></section>")
        sections.append(_side_by_side(runs, comparison, top))
    sections.append(f"<section><h2>Scores</h2><div class='figure'>{_histogram(runs)}</div></section>")
    for run in runs:
        sections.append(_headline(run))
        for key, title in (("by_category", "By category"), ("by_challenge", "By challenge")):
            svg = _group_bars(run.summary, key)
            if svg:
                sections.append(f"<section><h3>{title} — {e(run.name)}</h3><div class='figure'>{svg}</div></section>")
        if len(runs) == 1:
            sections.append(_best_worst(run))
    data = _table_data(runs)
    title = "clipeval report: " + " vs ".join(r.name for r in runs)
    generated = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    run_headers = "".join(f"<th>mean: {e(name)}</th>" for name in data["runs"]) + ("<th>delta</th>" if len(runs) > 1 else "")
    return PAGE.format(
        run_headers=run_headers,
        title=e(title),
        heading=e(title),
        generated=e(generated),
        sections="\n".join(sections),
        data=_json_for_script(data),
        script=SCRIPT,
        style=STYLE,
    )


# -- a sweep folder: the whole training curve -------------------------------------------------------

def build_training(results_dir: str | Path, *, top: int = 12, metric: str | None = None) -> str:
    """The report of a sweep's RESULTS_DIR: clip/mean with its CI band against step, the best
    checkpoint and the alerts marked, per-category curves, the history table, and the best and
    the newest checkpoint side by side for the prompts that moved most."""
    import pandas as pd

    from clipeval import compare as comparing
    from clipeval import stats

    folder = Path(results_dir).expanduser()
    try:
        history = pd.read_csv(folder / "history.csv", keep_default_na=False)
    except (OSError, ValueError) as err:
        raise ClipevalError(f"{results_dir}/history.csv is unreadable ({err})") from err
    history = history[history["clip_mean"] != ""]
    if history.empty:
        raise ClipevalError(f"{results_dir}: history.csv lists no finished checkpoint yet")
    made = history["metric"].iloc[-1] if "metric" in history.columns else None
    if metric is not None and made is not None and metric != made:
        raise ClipevalError(f"{results_dir}/history.csv holds the scores of {made}, not {metric}: rerun the sweep with "
                            f"--metric {metric} to rebuild it, or drop --metric")
    metric = metric or made or None
    runs = {name: load(folder / name, metric) for name in history["run"]}
    best_name = history.loc[pd.to_numeric(history["clip_mean"]).idxmax(), "run"]
    newest_name = history["run"].iloc[-1]
    sections = [f"<section><h2>Training curve</h2><div class='figure'>{_curve(history, best_name)}</div>"
                f"<p class='meta'>best: {e(best_name)} · newest: {e(newest_name)}"
                + (" · <span class='warn'>alert on the newest checkpoint</span>" if history["alert"].iloc[-1] == "true" else "")
                + "</p></section>"]
    small = _category_curves(history, runs)
    if small:
        sections.append(f"<section><h2>Per-category curves</h2><div class='figure'>{small}</div></section>")
    sections.append(_history_table(history))
    if any(_is_demo(r) for r in runs.values()):
        sections.insert(0, _demo_warning(list(runs.values())))
    shown = [runs[best_name]] + ([runs[newest_name]] if newest_name != best_name else [])
    if len(shown) == 2:
        comparison = comparing.compare([comparing.load_run(folder / best_name, metric),
                                        comparing.load_run(folder / newest_name, metric)],
                                       boot=stats.Bootstrap())
        sections.append(_comparison_table(comparison))
        sections.append(_side_by_side(shown, comparison, top))
    data = _table_data(shown)
    title = f"clipeval training report: {folder.name or folder}"
    run_headers = "".join(f"<th>mean: {e(name)}</th>" for name in data["runs"]) + ("<th>delta</th>" if len(shown) > 1 else "")
    return PAGE.format(run_headers=run_headers, title=e(title), heading=e(title),
                       generated=e(dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")),
                       sections="\n".join(sections), data=_json_for_script(data), script=SCRIPT, style=STYLE)


def _numbers(column) -> list[float]:
    import pandas as pd

    return pd.to_numeric(column, errors="coerce").tolist()


def _curve(history, best_name: str) -> str:
    steps = list(range(len(history))) if (history["step"] == "").any() else _numbers(history["step"])
    means, lows, highs = (_numbers(history[c]) for c in ("clip_mean", "clip_mean_ci_low", "clip_mean_ci_high"))
    best = history["run"].tolist().index(best_name)
    alerts = [i for i, a in enumerate(history["alert"]) if a == "true"]

    def draw(fig):
        ax = fig.subplots()
        band = ax.fill_between(steps, lows, highs, color="#4c72b0", alpha=0.2, linewidth=0, label="95% CI")
        band.set_gid("ci-band")
        ax.plot(steps, means, marker="o", color="#4c72b0", label="clip/mean")
        ax.plot([steps[best]], [means[best]], marker="*", markersize=16, color="#d4a017", linestyle="none", label="best")
        if alerts:
            ax.plot([steps[i] for i in alerts], [means[i] for i in alerts], marker="X", markersize=11, color="#c0392b",
                    linestyle="none", label="alert: worse than the best earlier")
        ax.set_xlabel("step")
        ax.set_ylabel("mean CLIP score")
        # Beside the axes, never over them: "best" placement still covered the CI band.
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0).set_gid("curve-legend")

    return figure_svg(draw, width=8.4, height=3.2)


def _category_curves(history, runs: dict) -> str | None:
    categories = sorted({c for r in runs.values() for c in (r.summary.get("by_category") or {})})
    if not categories:
        return None
    steps = list(range(len(history))) if (history["step"] == "").any() else _numbers(history["step"])
    columns = min(4, len(categories))
    rows = -(-len(categories) // columns)

    def draw(fig):
        axes = fig.subplots(rows, columns, squeeze=False, sharex=True)
        for ax, category in zip(axes.flat, categories):
            groups = [runs[name].summary.get("by_category", {}).get(category) for name in history["run"]]
            means = [g["mean"] if g else float("nan") for g in groups]
            lows = [(g.get("ci") or [g["mean"]] * 2)[0] if g else float("nan") for g in groups]
            highs = [(g.get("ci") or [g["mean"]] * 2)[1] if g else float("nan") for g in groups]
            ax.fill_between(steps, lows, highs, color="#4c72b0", alpha=0.2, linewidth=0)
            ax.plot(steps, means, marker=".", color="#4c72b0")
            ax.set_title(category, fontsize=8)
        for ax in list(axes.flat)[len(categories):]:
            ax.set_visible(False)

    return figure_svg(draw, width=7.2, height=1.6 * rows + 0.4)


def _history_table(history) -> str:
    """One row per checkpoint; each interval beside its value, so the table (and its alert column)
    fits a laptop's width."""
    from clipeval.compare import format_p

    def number(row, column: str, signed: bool = False) -> str:
        return "" if row.get(column, "") == "" else _f(float(row[column]), signed=signed)

    def interval(row, low: str, high: str, signed: bool = False) -> str:
        return "" if row.get(low, "") == "" else f"[{number(row, low, signed)}, {number(row, high, signed)}]"

    head = "".join(f"<th>{e(c)}</th>" for c in ("step", "run", "clip_mean", "95% CI", "best earlier step",
                                                  "delta to it", "95% CI", "p", "alert", "weights"))
    body = []
    for _, row in history.iterrows():
        cells = [row["step"], row["run"], number(row, "clip_mean"), interval(row, "clip_mean_ci_low", "clip_mean_ci_high"),
                 row.get("best_step", ""), number(row, "delta_best", True),
                 interval(row, "delta_best_ci_low", "delta_best_ci_high", True),
                 "" if row.get("p_best", "") == "" else format_p(float(row["p_best"])), row.get("alert", ""),
                 row.get("weights", "")]
        body.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in cells) + "</tr>")
    return (f"<section><h2>History</h2><table class='compare' id='history'><tr>{head}</tr>{''.join(body)}</table>"
            "</section>")


def write(paths: list[str | Path], out: str | Path, **kwargs) -> Path:
    from clipeval import store

    out = Path(out).expanduser()
    if out.suffix.lower() not in (".html", ".htm"):
        raise ClipevalError(f"--out {out}: give a .html file name")
    store.check_parent(out.parent if out.parent != Path("") else Path("."))
    page = build(paths, **kwargs)
    out.parent.mkdir(parents=True, exist_ok=True)
    store.write_atomic(out, page.encode("utf-8"))
    return out


STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5rem auto;max-width:1180px;padding:0 1rem;color:#222}
h1{font-size:1.35rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}h3{font-size:1rem}
.big{font-size:1.3rem}.ci{color:#666;font-size:.9em}.warn{color:#a15c00}.up{color:#176b2c}.down{color:#a11}
table{border-collapse:collapse}td,th{padding:.2rem .5rem;text-align:left;vertical-align:top}
.facts th{color:#555;font-weight:normal}.compare td,.compare th{border-bottom:1px solid #eee}
.figure svg{max-width:100%;height:auto}.cards{display:flex;flex-wrap:wrap;gap:1rem}
.card{border:1px solid #ddd;border-radius:6px;padding:.6rem;max-width:560px}.card.wide{max-width:none;margin-bottom:1rem}
.prompt{font-weight:600;white-space:pre-wrap;margin:.2rem 0;overflow-wrap:anywhere}.meta{color:#666;margin:.2rem 0}
details.prompt summary{cursor:pointer}#history td:nth-child(2){overflow-wrap:anywhere;max-width:22rem}
.images{display:flex;flex-wrap:wrap;gap:.4rem}figure{margin:0}figcaption{font-size:.8rem;color:#555}
.missing{display:flex;align-items:center;justify-content:center;background:#f0f0f0;color:#999;font-size:.8rem}
#controls{display:flex;gap:.6rem;align-items:center;margin:.6rem 0}#prompts th{cursor:pointer;position:sticky;top:0;background:#fff}
#prompts td{border-bottom:1px solid #f0f0f0}#prompts img{width:56px;height:56px;object-fit:cover}
#prompts td.text{white-space:pre-wrap;max-width:520px}
"""

SCRIPT = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var tbody = document.querySelector("#prompts tbody");
  var search = document.getElementById("search");
  var category = document.getElementById("category");
  var count = document.getElementById("count");
  var fmt = function (x) { return x === null ? "n/a" : x.toFixed(4); };
  var rows = data.rows.map(function (r) {
    var tr = document.createElement("tr");
    var add = function (text, cls) {
      var td = document.createElement("td");
      td.textContent = text;
      if (cls) { td.className = cls; }
      tr.appendChild(td);
      return td;
    };
    add(String(r.id));
    var cell = add("");
    if (r.thumb) { var im = document.createElement("img"); im.src = r.thumb; im.alt = "prompt " + r.id; cell.appendChild(im); }
    if (r.prompt.length > 280) {  // folded past 280 characters, as in the cards
      var folded = add("", "text"), details = document.createElement("details"), summary = document.createElement("summary");
      summary.textContent = r.prompt.slice(0, 280) + "\u2026";
      details.appendChild(summary);
      details.appendChild(document.createTextNode(r.prompt));
      folded.appendChild(details);
    } else {
      add(r.prompt, "text");
    }
    add(r.category);
    add(r.challenge);
    add(String(r.n));
    r.means.forEach(function (m) { add(fmt(m)); });
    if (r.means.length > 1) { add(r.means[1] === null || r.means[0] === null ? "n/a" : (r.means[1] - r.means[0] >= 0 ? "+" : "") + (r.means[1] - r.means[0]).toFixed(4)); }
    tbody.appendChild(tr);
    return { row: r, tr: tr, text: (r.prompt + " " + r.category + " " + r.challenge).toLowerCase() };
  });
  var categories = Array.from(new Set(data.rows.map(function (r) { return r.category; }))).filter(Boolean).sort();
  categories.forEach(function (c) { var o = document.createElement("option"); o.value = c; o.textContent = c; category.appendChild(o); });
  function apply() {
    var q = search.value.trim().toLowerCase(), c = category.value, shown = 0;
    rows.forEach(function (x) {
      var ok = (!q || x.text.indexOf(q) !== -1) && (!c || x.row.category === c);
      x.tr.style.display = ok ? "" : "none";
      if (ok) { shown += 1; }
    });
    count.textContent = shown + " of " + rows.length + " prompts";
  }
  var keys = [function (r) { return r.id; }, null, function (r) { return r.prompt.toLowerCase(); },
              function (r) { return r.category.toLowerCase(); }, function (r) { return r.challenge.toLowerCase(); },
              function (r) { return r.n; }];
  data.runs.forEach(function (_, i) { keys.push(function (r) { return r.means[i] === null ? -Infinity : r.means[i]; }); });
  if (data.runs.length > 1) { keys.push(function (r) { return r.means[1] === null || r.means[0] === null ? -Infinity : r.means[1] - r.means[0]; }); }
  var sorted = { column: 0, up: true };
  document.querySelectorAll("#prompts thead th").forEach(function (th, i) {
    if (!keys[i]) { return; }
    th.addEventListener("click", function () {
      sorted = { column: i, up: sorted.column === i ? !sorted.up : i < 2 || i > 4 ? false : true };
      var key = keys[i], sign = sorted.up ? 1 : -1;
      rows.sort(function (a, b) { var x = key(a.row), y = key(b.row); return x < y ? -sign : x > y ? sign : a.row.id - b.row.id; });
      rows.forEach(function (x) { tbody.appendChild(x.tr); });
    });
  });
  var timer = null;
  search.addEventListener("input", function () { clearTimeout(timer); timer = setTimeout(apply, 120); });
  category.addEventListener("change", apply);
  apply();
})();
"""

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<h1>{heading}</h1>
<p class="meta">generated {generated} by clipeval · CLIP score = cosine of normalised image and text embeddings, in [-1, 1]</p>
{sections}
<section>
<h2>All prompts</h2>
<div id="controls"><input id="search" type="search" placeholder="search prompts" aria-label="search prompts">
<select id="category" aria-label="category"><option value="">all categories</option></select>
<span id="count"></span></div>
<table id="prompts"><thead><tr><th>id</th><th></th><th>prompt</th><th>category</th><th>challenge</th><th>n</th>
{run_headers}</tr></thead><tbody></tbody></table>
</section>
<script type="application/json" id="report-data">{data}</script>
<script>{script}</script>
</body>
</html>
"""

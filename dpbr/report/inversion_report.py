"""``dpbr reconstruct-report``: summary tables and figures of gradient-inversion cells.

Inputs are ``dpbr reconstruct`` cell files (one row per reconstructed image, see
:mod:`dpbr.jobs.reconstruct`) and, optionally, the training grid's final-accuracy table. Outputs:

``reconstruct.parquet``
    Every image row of every cell.
``reconstruct_table.{parquet,csv}``
    Per cell without its seed (attack, model, state, b, defence, …): seeds, images, median and mean
    PSNR, mean SSIM (standard Gaussian-window SSIM, Wang et al. 2004), median MSE, success rates at
    MSE < 1e-2, 1e-3, 1e-4 over all images (iDLG's convention) and the label accuracy.
``psnr_vs_batch``, ``success_vs_batch``
    Median PSNR (band: interquartile range over images) and success rate at MSE < 1e-3 vs the
    attacked batch size, one line per defence, one panel per (attack, model).
``privacy_utility``
    Each defence setting that the training grid also trained with — ``none``; ``gaussian(epsilon=ε,
    …)`` ↔ ``--epsilon ε``; ``sparsify(p=P)`` ↔ ``--sparsify P``; a quantizer ↔ the same
    ``--quantize`` — placed at (median reconstruction PSNR over its reconstruction cells, final test
    accuracy of each training cell with that privacy setting). Low PSNR and high accuracy is the good
    corner. Settings without a training counterpart (e.g. ``gaussian(sigma=…)``) are left out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from dpbr.errors import UsageError
from dpbr.privacy.spec import PrivacySpec
from dpbr.io import check_folder, write_csv, write_parquet
from dpbr.report.inputs import read_frame, read_train_final
from dpbr.report.charts import note_chart, save_chart

__all__ = [
    "FIGURES",
    "SUMMARY_FILES",
    "defence_privacy",
    "load_reconstructions",
    "privacy_utility_chart",
    "privacy_utility_table",
    "psnr_vs_batch_chart",
    "reconstruct_report",
    "reconstruction_table",
    "success_vs_batch_chart",
]

SUMMARY_FILES: dict[str, str] = {
    "rows": "reconstruct.parquet", "table": "reconstruct_table.parquet", "table_csv": "reconstruct_table.csv",
}
FIGURES: tuple[str, ...] = ("psnr_vs_batch", "success_vs_batch", "privacy_utility")
#: Fields of a reconstruction cell that identify it up to its seed.
CELL_FIELDS: tuple[str, ...] = ("dataset", "model", "normalize", "state", "attack", "labels", "defence",
                                "batch_size", "iterations", "restarts", "lr", "tv")
#: Columns every ``dpbr reconstruct`` cell file must have to be reported; text columns among them.
RECON_COLUMNS: tuple[str, ...] = (*CELL_FIELDS, "seed", "mse", "psnr", "ssim", "success_1e-2", "success_1e-3",
                                  "success_1e-4", "label_correct", "status", "seconds")
_RECON_TEXTS = ("dataset", "model", "state", "attack", "labels", "defence", "status")
#: Columns of the training grid's final-accuracy table (``--train-final``) that the comparison reads.
TRAIN_FINAL_COLUMNS: tuple[str, ...] = ("dataset", "model", "pair", "privacy", "batch_size", "accuracy_mean")


def load_reconstructions(files: Sequence[str | Path]) -> pd.DataFrame:
    """Concatenate ``dpbr reconstruct`` cell files (one row per image)."""
    if not files:
        raise UsageError("PATHS", "no reconstruction cell files given; run `dpbr reconstruct` or the workflow first")
    frames = [read_frame(path, "PATHS", "a dpbr reconstruct cell file", required=RECON_COLUMNS, texts=_RECON_TEXTS,
                         numbers=[c for c in RECON_COLUMNS if c not in _RECON_TEXTS])
              for path in files]
    rows = pd.concat(frames, ignore_index=True)
    rows["defence"] = rows["defence"].fillna("none").astype(str)
    return rows


def _q(p: float):
    def quantile(x: pd.Series) -> float:
        return float(x.quantile(p))

    quantile.__name__ = f"q{int(p * 100)}"
    return quantile


def reconstruction_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per cell without its seed: seeds, images, PSNR median/mean/quartiles, SSIM mean, MSE
    median, success rates (share of images with MSE below 1e-2, 1e-3, 1e-4), label accuracy."""
    keys = [k for k in CELL_FIELDS if k in rows.columns]
    grouped = rows.groupby(keys, dropna=False, sort=True)
    table = grouped.agg(
        seeds=("seed", "nunique"), images=("mse", "size"),
        psnr_median=("psnr", "median"), psnr_mean=("psnr", "mean"),
        psnr_q25=("psnr", _q(0.25)), psnr_q75=("psnr", _q(0.75)),
        ssim_mean=("ssim", "mean"), mse_median=("mse", "median"),
        **{f"success_{t}": (f"success_{t}", "mean") for t in ("1e-2", "1e-3", "1e-4")},
        label_accuracy=("label_correct", "mean"),
        diverged=("status", lambda s: int((s != "ok").sum())),
        seconds_median=("seconds", "median"),
    ).reset_index()
    return table


def defence_privacy(defence: str | None) -> str | None:
    """The training grid's privacy label of a defence, or None when training has no such setting.

    The defence's mechanism pipeline read as a training setting
    (:meth:`dpbr.privacy.spec.PrivacySpec.from_mechanism_spec`) and labelled as training labels it
    (:meth:`~dpbr.privacy.spec.PrivacySpec.label`): ``none`` → ``none``; ``gaussian(…, epsilon=ε)``,
    with or without a ``clip`` before it → ``ε=…``; ``sparsify(p=P)`` → ``sparsify=P``;
    ``quantize(kind=K, …)`` → ``quantize=K(…)``. ``gaussian(sigma=…)`` and other pipelines → None.
    """
    privacy = PrivacySpec.from_mechanism_spec(defence)
    return None if privacy is None else privacy.label()


def _panel(frame: pd.DataFrame) -> pd.Series:
    return frame["attack"] + " on " + frame["model"] + " / " + frame["dataset"] + " · " + frame["state"]


def psnr_vs_batch_chart(table: pd.DataFrame) -> Any:
    """Median PSNR vs attacked batch size per defence (band: interquartile range over images)."""
    import altair as alt

    data = table.assign(panel=_panel(table))
    x = alt.X("batch_size:Q", scale=alt.Scale(type="log", base=2), title="attacked batch size b")
    color = alt.Color("defence:N", title="defence", legend=alt.Legend(orient="bottom", columns=1, labelLimit=600))
    base = alt.Chart(data)
    band = base.mark_area(opacity=0.15).encode(x=x, y="psnr_q25:Q", y2="psnr_q75:Q", color=color)
    line = base.mark_line(point=True).encode(
        x=x, y=alt.Y("psnr_median:Q", title="reconstruction PSNR (dB, median)"), color=color,
        tooltip=["defence", "batch_size", "psnr_median", "ssim_mean", "success_1e-3", "seeds"])
    return alt.layer(band, line, data=data).properties(width=320, height=220).facet(
        column=alt.Column("panel:N", title=None)).properties(
        title="How much each defence protects: reconstruction PSNR vs batch size (higher = better reconstruction)")


def success_vs_batch_chart(table: pd.DataFrame) -> Any:
    """Success rate (MSE < 1e-3) vs attacked batch size per defence."""
    import altair as alt

    data = table.assign(panel=_panel(table))
    x = alt.X("batch_size:Q", scale=alt.Scale(type="log", base=2), title="attacked batch size b")
    line = alt.Chart(data).mark_line(point=True).encode(
        x=x, y=alt.Y("success_1e-3:Q", title="success rate (MSE < 1e-3)", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("defence:N", title="defence", legend=alt.Legend(orient="bottom", columns=1, labelLimit=600)),
        tooltip=["defence", "batch_size", "success_1e-2", "success_1e-3", "success_1e-4", "images"])
    return line.properties(width=320, height=220).facet(column=alt.Column("panel:N", title=None)).properties(
        title="Share of images reconstructed (MSE < 1e-3 on [0, 1] pixels) vs batch size")


def privacy_utility_table(table: pd.DataFrame, final: pd.DataFrame) -> pd.DataFrame:
    """Reconstruction PSNR per training privacy setting joined with the training cells' final accuracy.

    PSNR is the median over the reconstruction cells whose defence maps to the setting
    (:func:`defence_privacy`), per (attack, model); accuracy is each training cell's mean over seeds.
    """
    recon = table.assign(privacy=[defence_privacy(d) for d in table["defence"]]).dropna(subset=["privacy"])
    psnr = recon.groupby(["attack", "model", "privacy"], dropna=False).agg(
        psnr=("psnr_median", "median"), success=("success_1e-3", "mean"),
        recon_batch_sizes=("batch_size", lambda b: ",".join(str(int(v)) for v in sorted(set(b))))).reset_index()
    psnr = psnr.rename(columns={"model": "attacked_model"})
    train = final[["dataset", "model", "pair", "privacy", "batch_size", "accuracy_mean"]].rename(
        columns={"batch_size": "train_batch_size", "model": "train_model", "dataset": "train_dataset"})
    return psnr.merge(train, on="privacy", how="inner")


def privacy_utility_chart(joined: pd.DataFrame) -> Any:
    """Final test accuracy (training grid) vs reconstruction PSNR (inversion grid) per privacy setting."""
    import altair as alt

    points = alt.Chart(joined).mark_point(size=100, filled=True).encode(
        x=alt.X("psnr:Q", title="reconstruction PSNR (dB; lower = more private)", scale=alt.Scale(zero=False)),
        y=alt.Y("accuracy_mean:Q", title="final test accuracy of training", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("privacy:N", title="privacy setting"),
        shape=alt.Shape("train_batch_size:N", title="training b"),
        tooltip=["privacy", "pair", "train_model", "train_batch_size", "accuracy_mean", "psnr", "success",
                 "attack", "attacked_model", "recon_batch_sizes"])
    return points.properties(width=300, height=240).facet(column=alt.Column("pair:N", title="training rule / attack")).properties(
        title="Privacy–utility: each privacy setting's reconstruction PSNR against the accuracy training reaches with it")


def reconstruct_report(files: Sequence[str | Path], summary_dir: str | Path, figures_dir: str | Path, *,
                       train_final: str | Path | None = None,
                       formats: Sequence[str] = ("html", "png", "svg")) -> list[Path]:
    """Write the reconstruction summary tables and figures; return the paths written.

    ``privacy_utility`` is written only when ``train_final`` is given (a note instead of points when
    no defence maps to a trained privacy setting).
    """
    rows = load_reconstructions(files)
    final = None if train_final is None else read_train_final(train_final, TRAIN_FINAL_COLUMNS)
    table = reconstruction_table(rows)
    summary_dir = check_folder(summary_dir, "--summary-dir")
    figures_dir = check_folder(figures_dir, "--out-dir")
    written = [
        write_parquet(rows, summary_dir / SUMMARY_FILES["rows"]),
        write_parquet(table, summary_dir / SUMMARY_FILES["table"]),
        write_csv(table, summary_dir / SUMMARY_FILES["table_csv"]),
    ]
    charts = {"psnr_vs_batch": psnr_vs_batch_chart(table), "success_vs_batch": success_vs_batch_chart(table)}
    if final is not None:
        joined = privacy_utility_table(table, final)
        charts["privacy_utility"] = privacy_utility_chart(joined) if not joined.empty else note_chart(
            "No defence of the reconstruction grid matches a privacy setting of the training grid.")
    for name, chart in charts.items():
        for fmt in formats:
            written.append(save_chart(chart, figures_dir / f"{name}.{fmt}", fmt))
    return written

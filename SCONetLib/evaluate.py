"""Evaluation of a SCONet model on labelled CT volumes: per-organ Dice, Hausdorff distance and HD95 (reference §5).

``python -m SCONetLib.evaluate --data DIR --weights W [--split test] [--out DIR]`` segments every case of the
split with :class:`SCONetLib.infer.Segmenter`, scores it against its label map and prints a table shaped like
the paper's Table 1 (rows Dice / HD / HD95, columns liver, kidneys, spleen, pancreas, mean; ``mean ± std`` over
cases). ``DIR/eval_cases.csv`` (one row per case, with timings and peak memory), ``DIR/eval_summary.csv`` (the
table) and ``DIR/evaluation.json`` (everything, plus the settings) are written atomically.

Scoring, as the reference's ``eval_seg.py``:

* the prediction is resampled (nearest neighbour) onto the label map's grid if the grids differ;
* Dice per organ: ``(2|A∩B| + 1e-5) / (|A| + |B| + 1e-5)``, 1 when the organ is absent from both;
  the case's mean Dice is the mean of the 4 organs (background excluded);
* HD per organ: maximum symmetric Hausdorff distance in mm (:func:`SCONetLib.metrics.hausdorff`, equal to
  SimpleITK's filter); an organ missing from the prediction or the truth is skipped (NaN); the case's mean HD is
  the mean over the computed organs, 1000 mm if none could be computed. HD95 is handled the same way;
* mean and standard deviation over cases skip NaN; the standard deviation is the sample one (ddof = 1, pandas'
  default, which the reference uses).

Every case is scored twice: as the model outputs it (the paper's setting, no post-processing) and after
:func:`SCONetLib.postprocess.keep_largest_components` (columns ``post_*``, the ``summary_postprocessed`` table),
the default of the command line and the Slicer module.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch

from SCONetLib import io as sconet_io
from SCONetLib.data import Case, apply_label_map, parse_label_map
from SCONetLib.figures import evaluation_plots, png_output
from SCONetLib.labels import ORGANS
from SCONetLib.metrics import dice, hausdorff
from SCONetLib.postprocess import keep_largest_components
from SCONetLib.progress import ProgressCallback, report, sub_progress

logger = logging.getLogger("SCONetLib.evaluate")

#: Case mean HD (mm) when no organ's distance could be computed, as in the reference.
HD_NONE_COMPUTED = 1000.0
#: Metrics of the table, in row order: key prefix and display name.
METRICS = (("dice", "Dice"), ("hd", "HD (mm)"), ("hd95", "HD95 (mm)"))
ORGAN_NAMES = tuple(organ.name for organ in ORGANS)


def score_case(prediction: sitk.Image, truth: sitk.Image) -> dict:
    """Per-organ Dice, HD and HD95 of one predicted label map against the truth (SCONet labels 0–4).

    Parameters
    ----------
    prediction, truth : sitk.Image of integer labels
        The prediction is resampled onto ``truth``'s grid (nearest neighbour) if their geometry differs.

    Returns
    -------
    dict
        ``dice_<organ>``, ``hd_<organ>``, ``hd95_<organ>`` for liver, kidneys, spleen, pancreas (HD in mm, NaN
        when the organ is missing from either map) and ``dice_mean``, ``hd_mean``, ``hd95_mean`` (see the module
        notes).
    """
    if (prediction.GetSize() != truth.GetSize() or
            not np.allclose(prediction.GetSpacing(), truth.GetSpacing(), rtol=1e-6) or
            not np.allclose(prediction.GetOrigin(), truth.GetOrigin(), atol=1e-4) or
            not np.allclose(prediction.GetDirection(), truth.GetDirection(), atol=1e-6)):
        logger.info("resampling the prediction onto the truth's grid (nearest neighbour)")
        prediction = sitk.Resample(prediction, truth, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                   prediction.GetPixelID())
    pred = sitk.GetArrayViewFromImage(prediction)
    gt = sitk.GetArrayViewFromImage(truth)
    spacing = truth.GetSpacing()[::-1]  # KJI array axes
    scores = {}
    for organ in ORGANS:
        scores[f"dice_{organ.name}"] = dice(pred, gt, organ.label)
        pred_mask, gt_mask = pred == organ.label, gt == organ.label
        both = pred_mask.any() and gt_mask.any()
        for key, percentile in (("hd", 100.0), ("hd95", 95.0)):
            scores[f"{key}_{organ.name}"] = hausdorff(pred_mask, gt_mask, spacing, percentile) if both else math.nan
    scores["dice_mean"] = float(np.mean([scores[f"dice_{n}"] for n in ORGAN_NAMES]))
    for key in ("hd", "hd95"):
        computed = [scores[f"{key}_{n}"] for n in ORGAN_NAMES if not math.isnan(scores[f"{key}_{n}"])]
        scores[f"{key}_mean"] = float(np.mean(computed)) if computed else HD_NONE_COMPUTED
    return scores


def summarize(rows: Sequence[dict], prefix: str = "") -> dict:
    """Mean, sample standard deviation and count over cases of every metric column (``prefix`` + name), NaN
    skipped.

    Returns
    -------
    dict
        ``{"dice": {"liver": {"mean", "std", "n"}, …, "mean": {…}}, "hd": …, "hd95": …}`` (std NaN below 2
        values).
    """
    summary = {}
    for key, _ in METRICS:
        summary[key] = {}
        for column in ORGAN_NAMES + ("mean",):
            values = np.array([row[f"{prefix}{key}_{column}"] for row in rows], dtype=np.float64)
            values = values[~np.isnan(values)]
            summary[key][column] = {"mean": float(values.mean()) if len(values) else math.nan,
                                    "std": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
                                    "n": int(len(values))}
    return summary


def format_table(summary: dict) -> str:
    """The summary as a text table shaped like the paper's Table 1 (``mean ± std``)."""
    header = ["metric", *ORGAN_NAMES, "mean"]
    lines = []
    for key, name in METRICS:
        cells = [name]
        for column in ORGAN_NAMES + ("mean",):
            entry = summary[key][column]
            digits = 3 if key == "dice" else 1
            cells.append(f"{entry['mean']:.{digits}f} ± {entry['std']:.{digits}f}" if entry["n"] else "n/a")
        lines.append(cells)
    widths = [max(len(row[i]) for row in [header] + lines) for i in range(len(header))]
    render = [" | ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in [header] + lines]
    render.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(render)


def evaluate_cases(cases: Sequence[Case], segmenter, label_map=None, predictions_dir=None,
                   progress: ProgressCallback | None = None) -> dict:
    """Segment and score every case.

    Parameters
    ----------
    cases : sequence of Case
    segmenter : SCONetLib.infer.Segmenter
        The model to evaluate.
    label_map : preset name, ``"src:dst,…"`` or mapping, optional
        Applied to the truth label maps (see :func:`SCONetLib.data.parse_label_map`).
    predictions_dir : str or Path, optional
        If given, each predicted label map is written there as ``<case_id>.nii.gz``.
    progress : callable(fraction, message), optional
        May raise :class:`SCONetLib.progress.Cancelled`.

    Returns
    -------
    dict
        ``cases``: one dict per scored case (``case_id``, the :func:`score_case` scores, ``seconds_prepare``
        (points + encoding), ``seconds_segment`` (decoding), ``seconds_inference`` (their sum), ``peak_rss_mb``
        and, on CUDA, ``cuda_peak_mb``); ``skipped``: ``{"case_id", "reason"}`` for cases that could not be read
        or segmented; ``summary``: :func:`summarize` of the scored cases; ``summary_postprocessed``: the same
        after keeping each organ's largest components.
    """
    mapping = parse_label_map(label_map)
    rows, skipped = [], []
    for index, case in enumerate(cases):
        step = sub_progress(progress, index / max(1, len(cases)), (index + 1) / max(1, len(cases)))
        report(step, 0.0, f"case {index + 1}/{len(cases)}: {case.case_id}")
        try:
            row = _evaluate_case(case, segmenter, mapping, predictions_dir, step)
        except (OSError, ValueError, RuntimeError) as error:
            logger.warning("skipping case %s: %s: %s", case.case_id, type(error).__name__, error)
            skipped.append({"case_id": case.case_id, "reason": f"{type(error).__name__}: {error}"})
            continue
        rows.append(row)
        logger.info("%s: Dice %s, HD %s mm, %.1f s, peak RSS %.0f MB", case.case_id,
                    " ".join(f"{row[f'dice_{n}']:.3f}" for n in ORGAN_NAMES),
                    " ".join(f"{row[f'hd_{n}']:.1f}" for n in ORGAN_NAMES), row["seconds_inference"],
                    row["peak_rss_mb"])
    report(progress, 1.0, f"evaluated {len(rows)} case(s)")
    return {"cases": rows, "skipped": skipped, "summary": summarize(rows) if rows else None,
            "summary_postprocessed": summarize(rows, "post_") if rows else None}


def _evaluate_case(case: Case, segmenter, mapping, predictions_dir, progress) -> dict:
    image = sconet_io.read_image(case.image)
    truth_image = sconet_io.read_image(case.label)
    truth = sitk.GetImageFromArray(apply_label_map(sitk.GetArrayViewFromImage(truth_image), mapping))
    truth.CopyInformation(truth_image)
    cuda = segmenter.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(segmenter.device)
    peak_resettable = _reset_peak_rss()
    start = time.perf_counter()
    segmenter.prepare(image, progress=sub_progress(progress, 0.0, 0.7))
    prepared = time.perf_counter()
    prediction = segmenter.segment(progress=sub_progress(progress, 0.7, 0.95))
    done = time.perf_counter()
    post = {f"post_{key}": value for key, value in score_case(keep_largest_components(prediction), truth).items()}
    row = {"case_id": case.case_id, **score_case(prediction, truth), **post,
           "seconds_prepare": round(prepared - start, 3), "seconds_segment": round(done - prepared, 3),
           "seconds_inference": round(done - start, 3), "peak_rss_mb": round(_peak_rss_mb(), 1),
           "peak_rss_scope": "case" if peak_resettable else "process"}
    if cuda:
        row["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated(segmenter.device) / 2 ** 20, 1)
    if predictions_dir is not None:
        sconet_io.write_image(prediction, Path(predictions_dir) / f"{case.case_id}.nii.gz")
    return row


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux ``/proc/self/clear_refs``); False if not."""
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mb() -> float:
    """Peak resident memory (MB) since the last reset (``VmHWM``), else of the whole process."""
    try:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    try:
        import resource  # POSIX only
    except ImportError:
        return math.nan
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024.0


# ============================================================================ outputs

def write_outputs(result: dict, out_dir, settings: dict) -> dict:
    """Write ``eval_cases.csv``, ``eval_summary.csv``, ``evaluation.json`` and (when a case was scored) the box
    plots ``evaluation.png`` into ``out_dir``, as one all-or-nothing set; return the paths by name."""
    out_dir = Path(out_dir)
    paths = {"cases_csv": out_dir / "eval_cases.csv", "summary_csv": out_dir / "eval_summary.csv",
             "json": out_dir / "evaluation.json"}
    rows = result["cases"]
    summary_rows = []
    if result["summary"] is not None:
        for key, name in METRICS:
            for statistic in ("mean", "std"):
                summary_rows.append({"metric": name, "statistic": statistic,
                                     **{column: result["summary"][key][column][statistic]
                                        for column in ORGAN_NAMES + ("mean",)}})
    post = result.get("summary_postprocessed")
    content = {"settings": settings, "summary": result["summary"], "summary_postprocessed": post,
               "timing": _timing(rows), "table": format_table(result["summary"]) if result["summary"] else None,
               "table_postprocessed": format_table(post) if post else None,
               "cases": rows, "skipped": result["skipped"]}
    outputs = [sconet_io.text_output(sconet_io.csv_text(rows, list(rows[0]) if rows else ["case_id"]),
                                     paths["cases_csv"]),
               sconet_io.text_output(sconet_io.csv_text(summary_rows, ["metric", "statistic", *ORGAN_NAMES, "mean"]),
                                     paths["summary_csv"]),
               sconet_io.json_output(content, paths["json"])]
    if rows:
        paths["plots"] = out_dir / "evaluation.png"
        outputs.append(png_output(evaluation_plots(rows), paths["plots"]))
    sconet_io.write_outputs(outputs)
    return paths


def _timing(rows) -> dict:
    """Mean and maximum over cases of the timing and memory columns."""
    timing = {}
    for key in ("seconds_prepare", "seconds_segment", "seconds_inference", "peak_rss_mb", "cuda_peak_mb"):
        values = [row[key] for row in rows if key in row]
        if values:
            timing[key] = {"mean": float(np.mean(values)), "max": float(np.max(values))}
    return timing


def record_in_checkpoint(weights, destination, result: dict, settings: dict) -> Path:
    """Copy a checkpoint to ``destination`` with this evaluation as ``metadata["evaluation"]`` (settings, the
    summary, the table, the timings and the per-case rows); see :func:`record_metadata`."""
    return record_metadata(weights, destination, {"evaluation": {
        "settings": settings, "summary": result["summary"], "table": format_table(result["summary"]),
        "timing": _timing(result["cases"]), "cases": result["cases"], "skipped": result["skipped"]}})


def record_metadata(weights, destination, entries: dict) -> Path:
    """Copy a checkpoint to ``destination`` with ``entries`` added to its metadata, and write the metadata as JSON.

    The copy keeps the weights, config and metadata of ``weights`` (not its training state, so a training
    checkpoint becomes a release-sized file). ``destination.with_suffix(".json")`` receives the whole metadata.
    Both files are written atomically.

    Returns
    -------
    Path of the written checkpoint.
    """
    from SCONetLib.checkpoint import load_checkpoint, save_checkpoint

    model, metadata = load_checkpoint(weights, "cpu")
    metadata = {**metadata, **sconet_io.jsonable(entries)}
    destination = Path(destination)
    save_checkpoint(destination, model, metadata)
    _, stored = load_checkpoint(destination, "cpu")  # as stored, with the entries save_checkpoint adds
    sconet_io.write_json(stored, destination.with_suffix(".json"))
    logger.info("wrote %s and %s", destination, destination.with_suffix(".json"))
    return destination


if __name__ == "__main__":  # python -m SCONetLib.evaluate: the command line lives in SCONetLib.cli
    from SCONetLib.cli import evaluate_main, run_as_script

    run_as_script(evaluate_main)

"""Tests of SCONetLib.evaluate: per-case scores with known answers, the summary table, and the command line."""
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SCONetLib import evaluate
from SCONetLib.checkpoint import load_checkpoint, save_checkpoint
from SCONetLib.cli import evaluate_main
from SCONetLib.evaluate import HD_NONE_COMPUTED, evaluate_cases, format_table, score_case, summarize
from SCONetLib.model import SCONet

SPACING = (0.8, 1.5, 3.0)  # i, j, k (mm)


def _image(array_kji, spacing=SPACING, origin=(10.0, -20.0, 5.0)):
    image = sitk.GetImageFromArray(array_kji.astype(np.uint8))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


@pytest.fixture
def truth_and_prediction():
    """Truth: liver, kidneys and spleen boxes, no pancreas. Prediction: liver shifted by 2 voxels along i,
    kidneys exact, spleen missing, no pancreas."""
    truth = np.zeros((12, 30, 40), np.uint8)
    truth[2:10, 5:15, 5:15] = 1
    truth[2:6, 20:25, 20:30] = 2
    truth[7:11, 20:28, 30:38] = 3
    pred = np.zeros_like(truth)
    pred[2:10, 5:15, 7:17] = 1
    pred[2:6, 20:25, 20:30] = 2
    return _image(truth), _image(pred)


def test_scores_of_a_case_with_known_answers(truth_and_prediction):
    truth, prediction = truth_and_prediction
    scores = score_case(prediction, truth)
    assert scores["dice_liver"] == pytest.approx((2 * 8 * 10 * 8) / (2 * 8 * 10 * 10), abs=1e-6)
    assert scores["hd_liver"] == pytest.approx(2 * SPACING[0])  # a 2-voxel shift along i
    assert scores["hd95_liver"] == pytest.approx(2 * SPACING[0])
    assert scores["dice_kidneys"] == pytest.approx(1.0) and scores["hd_kidneys"] == 0.0
    assert scores["dice_spleen"] == pytest.approx(0.0, abs=1e-6) and math.isnan(scores["hd_spleen"])
    assert scores["dice_pancreas"] == 1.0 and math.isnan(scores["hd_pancreas"])  # absent in both
    assert scores["dice_mean"] == pytest.approx((0.8 + 1.0 + 0.0 + 1.0) / 4, abs=1e-6)
    assert scores["hd_mean"] == pytest.approx((1.6 + 0.0) / 2)  # over the organs that were computed


def test_no_computable_distance_gives_1000(truth_and_prediction):
    truth, _ = truth_and_prediction
    empty = _image(np.zeros(truth.GetSize()[::-1]))
    scores = score_case(empty, truth)
    assert scores["hd_mean"] == HD_NONE_COMPUTED and scores["hd95_mean"] == HD_NONE_COMPUTED


def test_prediction_on_another_grid_is_resampled_to_the_truth(truth_and_prediction):
    truth, _ = truth_and_prediction
    array = sitk.GetArrayFromImage(truth)
    coarse = array[:, :, ::2]  # every other voxel along i: spacing 1.6 mm, first voxel at the same place
    prediction = _image(coarse, spacing=(2 * SPACING[0],) + SPACING[1:])
    scores = score_case(prediction, truth)
    assert scores["dice_kidneys"] > 0.9 and scores["hd_kidneys"] <= 2 * SPACING[0] + 1e-9


def test_summary_statistics_skip_nan_and_use_the_sample_std():
    rows = []
    for dice_liver, hd_liver in ((0.8, 10.0), (1.0, math.nan), (0.9, 20.0)):
        row = {f"{m}_{o}": 0.5 for m in ("dice", "hd", "hd95") for o in evaluate.ORGAN_NAMES + ("mean",)}
        row.update(dice_liver=dice_liver, hd_liver=hd_liver)
        rows.append(row)
    summary = summarize(rows)
    assert summary["dice"]["liver"] == {"mean": pytest.approx(0.9), "std": pytest.approx(0.1), "n": 3}
    assert summary["hd"]["liver"]["mean"] == pytest.approx(15.0)
    assert summary["hd"]["liver"]["std"] == pytest.approx(np.std([10.0, 20.0], ddof=1))
    assert summary["hd"]["liver"]["n"] == 2
    table = format_table(summary).splitlines()
    assert table[0].split("|")[0].strip() == "metric"
    assert [c.strip() for c in table[0].split("|")] == ["metric", "liver", "kidneys", "spleen", "pancreas", "mean"]
    assert [line.split("|")[0].strip() for line in table[2:]] == ["Dice", "HD (mm)", "HD95 (mm)"]
    assert table[2].split("|")[1].strip() == "0.900 ± 0.100"
    assert table[3].split("|")[1].strip() == "15.0 ± 7.1"


class _FixedSegmenter:
    """Stand-in for Segmenter: returns a stored label map for every prepared image."""

    device = torch.device("cpu")

    def __init__(self, labels: sitk.Image):
        self.labels = labels
        self.prepared = []

    def prepare(self, image, progress=None):
        self.prepared.append(image.GetSize())

    def segment(self, spacing=None, progress=None):
        return self.labels


def test_evaluate_cases_scores_times_and_skips(tmp_path, truth_and_prediction):
    from SCONetLib.data import Case

    truth, prediction = truth_and_prediction
    sitk.WriteImage(truth, str(tmp_path / "ct.nii.gz"))  # any image works for the stand-in segmenter
    sitk.WriteImage(truth, str(tmp_path / "labels.nii.gz"))
    cases = [Case("good", tmp_path / "ct.nii.gz", tmp_path / "labels.nii.gz"),
             Case("missing", tmp_path / "nowhere.nii.gz", tmp_path / "labels.nii.gz")]
    segmenter = _FixedSegmenter(prediction)
    result = evaluate_cases(cases, segmenter, predictions_dir=tmp_path / "pred")
    assert [row["case_id"] for row in result["cases"]] == ["good"]
    assert [s["case_id"] for s in result["skipped"]] == ["missing"]
    row = result["cases"][0]
    assert row["dice_liver"] == pytest.approx(0.8, abs=1e-6)
    assert row["seconds_inference"] >= row["seconds_prepare"] >= 0 and row["peak_rss_mb"] > 10
    assert (tmp_path / "pred" / "good.nii.gz").is_file()
    assert result["summary"]["dice"]["liver"]["mean"] == pytest.approx(0.8, abs=1e-6)
    paths = evaluate.write_outputs(result, tmp_path / "out", {"note": "test"})
    content = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert content["summary"]["hd"]["spleen"]["mean"] is None  # NaN → null in JSON
    assert content["cases"][0]["case_id"] == "good" and "Dice" in content["table"]
    assert paths["summary_csv"].read_text(encoding="utf-8").splitlines()[0] == "metric,statistic,liver,kidneys,spleen,pancreas,mean"
    plots = sitk.ReadImage(str(paths["plots"]))                   # box plots of Dice and HD95 per organ
    assert plots.GetSize()[0] > 500 and plots.GetNumberOfComponentsPerPixel() in (3, 4)


def test_command_line_end_to_end(tmp_path, capsys):
    from test_data import _synthetic_case

    root = tmp_path / "ds"
    for k in (1, 2):
        _synthetic_case(root, f"Case_{k:05d}", shift=k)
    torch.manual_seed(0)
    weights = save_checkpoint(tmp_path / "untrained.pt", SCONet(grid_resolution=8))
    status = evaluate_main(["--data", str(root), "--weights", str(weights), "--split", "all", "--out",
                            str(tmp_path / "out"), "--points", "2000", "--device", "cpu",
                            "--record-in", str(tmp_path / "release.pt")])
    assert status == 0
    printed = capsys.readouterr().out
    assert "Dice" in printed and "HD95 (mm)" in printed and "2 case(s), 0 skipped" in printed
    content = json.loads((tmp_path / "out" / "evaluation.json").read_text(encoding="utf-8"))
    assert [c["case_id"] for c in content["cases"]] == ["Case_00001", "Case_00002"]
    assert content["settings"]["n_points"] == 2000 and content["timing"]["seconds_inference"]["mean"] > 0
    model, metadata = load_checkpoint(tmp_path / "release.pt")
    assert metadata["evaluation"]["summary"]["dice"]["liver"]["n"] == 2 and "HD95" in metadata["evaluation"]["table"]
    assert json.loads((tmp_path / "release.json").read_text(encoding="utf-8"))["evaluation"]["settings"]["n_points"] == 2000
    assert evaluate_main(["--data", str(tmp_path / "nothing"), "--weights", str(weights)]) == 1

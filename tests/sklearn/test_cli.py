"""The command line on scikit-learn files: skops input, compare, and every kind of bad input
(clear error, exit 2, nothing written)."""

import csv
import json

import joblib
import numpy as np
import pytest
import skops.io
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.tree import DecisionTreeClassifier
from typer.testing import CliRunner

import lowbit
from lowbit.cli import app


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sklearn-cli")
    features, labels = load_breast_cancer(return_X_y=True)
    joblib.dump(LogisticRegression(max_iter=5000).fit(features[:400], labels[:400]), folder / "model.joblib")
    skops.io.dump(
        DecisionTreeClassifier(random_state=0).fit(features[:400], labels[:400]), folder / "tree.skops"
    )
    with open(folder / "test.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([f"feature{i}" for i in range(30)] + ["label"])
        writer.writerows([*row, label] for row, label in zip(features[400:], labels[400:], strict=True))
    np.save(folder / "three_columns.npy", features[400:, :3])
    return folder


def _run(*args):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def test_a_skops_file_needs_no_trust_and_compare_reports_the_comparison(files, tmp_path):
    out = tmp_path / "tree.lowbit"
    result = _run("quantize", files / "tree.skops", "--data", files / "test.csv", "--out", out)
    assert result.exit_code == 0, result.output
    assert "0 prediction differences" in result.output
    report = tmp_path / "compare.json"
    compared = _run(
        "compare", files / "tree.skops", out, "--data", files / "test.csv", "--runs", 5, "--json", report
    )
    assert compared.exit_code in (0, 3), compared.output  # 3: measurably slower, which timing decides
    measured = json.loads(report.read_text())
    assert measured["quality"]["agreement"]["quantized"] == 1.0
    assert measured["quality"]["accuracy"]["original"] == measured["quality"]["accuracy"]["quantized"]
    assert measured["delta"]["size_ratio"] > 2
    assert measured["layers"][0]["name"].startswith("model.tree_.")
    assert "Verdict" in compared.output


def test_compare_through_the_python_api_on_estimators(files):
    original = joblib.load(files / "model.joblib")
    quantized = lowbit.sklearn.quantize(original, bits=8, data=str(files / "test.csv"))
    comparison = lowbit.compare(original, quantized, str(files / "test.csv"), runs=3)
    assert comparison.metric == "accuracy"
    assert comparison.quality["agreement"]["quantized"] == 1.0
    assert set(comparison.speedups) == {"1", "8"}


@pytest.mark.parametrize(
    "case", ["no trust", "not sklearn", "unfitted", "columns", "truncated", "no such file", "tolerance"]
)
def test_bad_input_is_a_clear_error_with_exit_2_and_nothing_written(files, tmp_path, case):
    model, data, flags = files / "model.joblib", files / "test.csv", ["--trust-pickle"]
    expected = {
        "no trust": "--trust-pickle",
        "not sklearn": "scikit-learn estimator",
        "unfitted": "not fitted",
        "columns": "3 features",
        "truncated": "cannot read",
        "no such file": "does not exist",
        "tolerance": "--probability-tolerance",  # refused where the option is parsed
    }[case]
    if case == "no trust":
        flags = []
    elif case == "not sklearn":
        model = tmp_path / "weights.joblib"
        joblib.dump({"weights": [1.0, 2.0]}, model)
    elif case == "unfitted":
        model = tmp_path / "unfitted.joblib"
        joblib.dump(LogisticRegression(), model)
    elif case == "columns":
        data = files / "three_columns.npy"
    elif case == "truncated":
        model = tmp_path / "truncated.joblib"
        model.write_bytes((files / "model.joblib").read_bytes()[:200])
    elif case == "tolerance":
        flags = ["--trust-pickle", "--probability-tolerance", "2"]
    else:
        model = tmp_path / "missing.joblib"
    before = model.read_bytes() if model.exists() else None
    out = tmp_path / "out.lowbit"
    result = _run("quantize", model, *flags, "--data", data, "--out", out)
    assert result.exit_code == 2, result.output
    assert expected in " ".join(result.output.split()) and "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.glob(".*partial"))
    assert (model.read_bytes() if model.exists() else None) == before  # input untouched


def test_a_model_fitted_on_a_dataframe_reads_its_csv_by_column_name(tmp_path):
    """Named and text columns (a ColumnTransformer over a DataFrame) reach the model from a CSV;
    a CSV that lacks one of them is a clear error."""
    import pandas
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    features, labels = load_breast_cancer(return_X_y=True, as_frame=True)
    frame = features.iloc[:, :6].copy()
    frame["size class"] = pandas.cut(features["mean area"], 3, labels=["small", "medium", "large"]).astype(
        str
    )
    columns = ColumnTransformer(
        [("numbers", StandardScaler(), list(frame.columns[:6])), ("words", OneHotEncoder(), ["size class"])]
    )
    model = make_pipeline(columns, LogisticRegression(max_iter=2000)).fit(frame[:400], labels[:400])
    joblib.dump(model, tmp_path / "frame.joblib")
    frame[400:].assign(label=labels[400:]).to_csv(tmp_path / "test.csv", index=False)
    out = tmp_path / "frame.lowbit"
    result = _run(
        "quantize", tmp_path / "frame.joblib", "--trust-pickle", "--data", tmp_path / "test.csv", "--out", out
    )
    assert result.exit_code == 0, result.output
    assert "0 prediction differences" in result.output and "kept as is" in result.output  # OneHotEncoder
    assert np.array_equal(lowbit.load(out).predict(frame[400:]), model.predict(frame[400:]))
    compared = lowbit.compare(
        tmp_path / "frame.joblib", out, tmp_path / "test.csv", runs=3, trust_pickle=True
    )
    assert compared.quality["accuracy"]["original"] == compared.quality["accuracy"]["quantized"]
    frame[400:].drop(columns=["mean radius"]).to_csv(tmp_path / "partial.csv", index=False)
    partial = _run(
        "quantize",
        tmp_path / "frame.joblib",
        "--trust-pickle",
        "--data",
        tmp_path / "partial.csv",
        "--out",
        tmp_path / "partial.lowbit",
    )
    assert partial.exit_code == 2 and "lacks columns" in partial.output and "mean radius" in partial.output
    assert not (tmp_path / "partial.lowbit").exists()


def test_inspect_and_bench_read_a_scikit_learn_file(files, tmp_path):
    out = tmp_path / "model.lowbit"  # a 30-coefficient model: the CLI would refuse it as not smaller
    lowbit.sklearn.quantize(joblib.load(files / "model.joblib"), data=str(files / "test.csv")).save(out)
    shown = _run("inspect", out, "--verify")
    assert shown.exit_code == 0, shown.output
    assert "model.coef_" in shown.output and "0 prediction differences" in shown.output
    described = json.loads(_run("inspect", out, "--json").output)
    assert [entry["path"] for entry in described["arrays"]] == ["model.coef_"]
    assert described["arrays"][0]["stored_bytes"] < 30 * 8  # 30 float64 coefficients, stored narrower
    timed = _run("bench", out, "--data", files / "test.csv", "--samples", 3, "--json")
    assert timed.exit_code == 0, timed.output
    assert set(json.loads(timed.output)["latency_ms"]) == {"1", "8"}
    assert _run("bench", out).exit_code == 2  # a scikit-learn model needs --data
    broken = tmp_path / "broken.lowbit"
    broken.write_bytes(out.read_bytes()[:-40])
    assert _run("inspect", broken, "--verify").exit_code == 2


def test_weight_threshold_on_the_command_line_reports_what_was_pruned(tmp_path):
    from sklearn.datasets import load_digits
    from sklearn.linear_model import RidgeClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features, labels = load_digits(return_X_y=True)
    model = make_pipeline(StandardScaler(), RidgeClassifier(alpha=10)).fit(features[:1200], labels[:1200])
    joblib.dump(model, tmp_path / "ridge.joblib")
    np.save(tmp_path / "held_out.npy", features[1200:])
    threshold = float(np.quantile(np.abs(model[-1].coef_), 0.05)) + 1e-12  # 32 of its 640 weights
    out = tmp_path / "pruned.lowbit"
    result = _run("quantize", tmp_path / "ridge.joblib", "--trust-pickle", "--weight-threshold", threshold,
                  "--data", tmp_path / "held_out.npy", "--out", out)
    assert result.exit_code == 0, result.output
    assert "0 prediction differences" in result.output
    assert "pruned: model.steps[1][1].coef_: 5.0% of its entries are zero" in " ".join(result.output.split())


def test_without_data_nothing_is_written_and_the_exit_code_is_2(files, tmp_path):
    out = tmp_path / "model.lowbit"
    result = _run("quantize", files / "model.joblib", "--trust-pickle", "--out", out)
    assert result.exit_code == 2 and "--data" in result.output
    assert not out.exists()


def test_a_file_that_would_not_be_smaller_is_refused_with_exit_4(tmp_path):
    """A 13-feature GaussianNB pickles to about 1.4 kB; the lowbit file cannot beat that."""
    from sklearn.datasets import load_wine
    from sklearn.naive_bayes import GaussianNB

    features, labels = load_wine(return_X_y=True)
    joblib.dump(GaussianNB().fit(features, labels), tmp_path / "wine.joblib")
    np.save(tmp_path / "wine.npy", features)
    out = tmp_path / "wine.lowbit"
    result = _run("quantize", tmp_path / "wine.joblib", "--trust-pickle", "--data", tmp_path / "wine.npy",
                  "--out", out)
    assert result.exit_code == 4 and "no smaller" in result.output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["wine.joblib", "wine.npy"]


def test_data_of_the_wrong_kind_is_a_short_clear_error(files, tmp_path):
    """Text for a numeric model, numbers for a text pipeline: exit 2, a one-line message that
    names the file and does not paste the data, nothing written."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.pipeline import make_pipeline

    texts = ["the cat sat on the mat", "stocks fell sharply today", "a cat and a dog", "markets rallied"] * 5
    joblib.dump(make_pipeline(TfidfVectorizer(), LogisticRegression()).fit(texts, [0, 1, 0, 1] * 5),
                tmp_path / "text.joblib")
    (tmp_path / "texts.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    cases = [(tmp_path / "text.joblib", files / "three_columns.npy", "reads text"),
             (files / "model.joblib", tmp_path / "texts.jsonl", "holds text")]
    for model, data, message in cases:
        out = tmp_path / "out.lowbit"
        result = _run("quantize", model, "--trust-pickle", "--data", data, "--out", out)
        assert result.exit_code == 2 and message in result.output, result.output
        assert "stocks fell" not in result.output and not out.exists()

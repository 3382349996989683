"""lowbit.sklearn: guarded quantization of fitted estimators, and the pickle-free file."""

import json
import zipfile

import joblib
import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.naive_bayes import MultinomialNB
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import lowbit.sklearn as lowbit_sklearn
from lowbit.data import assets
from lowbit.errors import ChecksumError, FormatError, LowbitError, QuantizationError


@pytest.fixture(scope="module")
def topics():
    documents = assets.wikipedia_documents()
    order = np.random.default_rng(0).permutation(len(documents))[:1500]
    texts = [documents[i]["extract"] for i in order]
    labels = np.array([documents[i]["topic"] for i in order])
    return texts[:1000], labels[:1000], texts[1000:]


@pytest.mark.parametrize("classifier", [LogisticRegression(max_iter=500), MultinomialNB()])
def test_text_pipeline_predicts_held_out_data_exactly_and_shrinks(topics, classifier, tmp_path):
    train, labels, held_out = topics
    model = make_pipeline(TfidfVectorizer(), classifier).fit(train, labels)
    before = model.predict(held_out)
    quantized = lowbit_sklearn.quantize(model, bits=8, data=held_out)
    assert quantized.verified and quantized.prediction_differences == 0
    assert quantized.max_probability_difference <= 0.01
    assert np.array_equal(model.predict(held_out), before)  # the input is not changed
    path = quantized.save(tmp_path / "model.lowbit")
    joblib.dump(model, tmp_path / "model.joblib")
    assert path.stat().st_size < 0.5 * (tmp_path / "model.joblib").stat().st_size
    assert "skeleton.json" in zipfile.ZipFile(path).namelist()
    reloaded = lowbit_sklearn.load(path)
    assert np.array_equal(reloaded.predict(held_out), before)
    assert np.allclose(reloaded.predict_proba(held_out), quantized.predict_proba(held_out))


def test_an_array_that_changes_predictions_falls_back_to_a_wider_type():
    features, labels = load_breast_cancer(return_X_y=True)
    network = MLPClassifier((32,), max_iter=300, random_state=0)
    model = make_pipeline(StandardScaler(), network).fit(features, labels)
    quantized = lowbit_sklearn.quantize(model, bits=8, data=features)
    assert quantized.prediction_differences == 0
    assert np.array_equal(quantized.predict(features), model.predict(features))
    for path, steps in quantized.fallbacks.items():
        assert steps[0] == "int8-rows" and quantized.encodings[path].encoding == steps[-1]


def test_without_reference_data_nothing_is_quantized():
    features, labels = load_breast_cancer(return_X_y=True)
    with pytest.raises(QuantizationError, match="no reference data"):
        lowbit_sklearn.quantize(LogisticRegression(max_iter=3000).fit(features, labels), bits=16)


def test_positive_arrays_never_round_to_zero_so_unseen_rows_keep_finite_probabilities():
    """The wine GaussianNB: int8 variances rounded some to zero (NaN probabilities, 122 of 178
    predictions wrong). Variances are all positive, so they keep every entry within 0.1% of
    itself on any rung; guarded on 9 rows, all 178 predict as the original, probabilities finite."""
    from sklearn.datasets import load_wine
    from sklearn.naive_bayes import GaussianNB

    features, labels = load_wine(return_X_y=True)
    model = GaussianNB().fit(features, labels)
    quantized = lowbit_sklearn.quantize(model, bits=8, data=features[::20])
    assert np.all(quantized.estimator_.var_ > 0)
    assert np.isfinite(quantized.predict_proba(features)).all()
    assert np.array_equal(quantized.predict(features), model.predict(features))


def test_unsupported_unfitted_and_foreign_objects_are_clear_errors():
    from sklearn.cluster import KMeans

    with pytest.raises(QuantizationError, match="not supported; supported: .*LogisticRegression"):
        lowbit_sklearn.quantize(KMeans(n_clusters=2).fit(np.random.rand(20, 2)))
    with pytest.raises(QuantizationError, match="not fitted"):
        lowbit_sklearn.quantize(LogisticRegression())
    with pytest.raises(QuantizationError, match="scikit-learn"):
        lowbit_sklearn.quantize({"weights": [1, 2]})
    with pytest.raises(QuantizationError, match="bits"):
        lowbit_sklearn.quantize(LogisticRegression(), bits=4)


def test_a_corrupt_or_foreign_file_is_refused(tmp_path):
    features, labels = load_breast_cancer(return_X_y=True)
    path = lowbit_sklearn.quantize(LogisticRegression(max_iter=3000).fit(features, labels),
                                   data=features).save(tmp_path / "m.lowbit")
    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    entries["arrays.safetensors"] = entries["arrays.safetensors"][:-4] + b"\0\0\0\0"
    with zipfile.ZipFile(tmp_path / "bad.lowbit", "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    with pytest.raises(ChecksumError):
        lowbit_sklearn.load(tmp_path / "bad.lowbit")
    (tmp_path / "junk.lowbit").write_bytes(b"not a zip")
    with pytest.raises(FormatError):
        lowbit_sklearn.load(tmp_path / "junk.lowbit")
    with pytest.raises(FormatError, match="exists"):
        lowbit_sklearn.quantize(LogisticRegression(max_iter=3000).fit(features, labels),
                                data=features).save(path)


def _pickled_pipeline(tmp_path, topics):
    train, labels, held_out = topics
    model = make_pipeline(TfidfVectorizer(), LogisticRegression(max_iter=500)).fit(train, labels)
    joblib.dump(model, tmp_path / "model.joblib")
    data = tmp_path / "test.jsonl"
    data.write_text("\n".join(json.dumps({"text": text}) for text in held_out) + "\n")
    return model, data


def test_quantize_model_file_measures_both_files(topics, tmp_path):
    model, data = _pickled_pipeline(tmp_path, topics)
    report = lowbit_sklearn.quantize_model_file(tmp_path / "model.joblib", tmp_path / "model.lowbit",
                                                data=data, trust_pickle=True)
    assert report["prediction_differences"] == 0 and report["file_size_reduction_percent"] > 50
    for key in ("original_load_seconds", "quantized_load_seconds", "original_predictions_per_second",
                "quantized_predictions_per_second", "fallbacks"):
        assert report[key] is not None
    with pytest.raises(LowbitError, match="trust-pickle"):
        lowbit_sklearn.quantize_model_file(tmp_path / "model.joblib", tmp_path / "other.lowbit")
    assert not (tmp_path / "other.lowbit").exists()


def test_cli_quantizes_a_pickle_only_when_trusted(topics, tmp_path):
    from typer.testing import CliRunner

    from lowbit.cli import app

    _, data = _pickled_pipeline(tmp_path, topics)
    out = tmp_path / "model.lowbit"
    refused = CliRunner().invoke(app, ["quantize", str(tmp_path / "model.joblib"), "--data", str(data),
                                       "--out", str(out)])
    assert refused.exit_code == 2 and "--trust-pickle" in refused.output and not out.exists()
    result = CliRunner().invoke(app, ["quantize", str(tmp_path / "model.joblib"), "--trust-pickle",
                                      "--bits", "8", "--data", str(data), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "0 prediction differences" in result.output and lowbit_sklearn.load(out) is not None
    (tmp_path / "truncated.joblib").write_bytes((tmp_path / "model.joblib").read_bytes()[:100])
    broken = CliRunner().invoke(app, ["quantize", str(tmp_path / "truncated.joblib"), "--trust-pickle",
                                      "--out", str(tmp_path / "t.lowbit")])
    assert broken.exit_code == 2 and not (tmp_path / "t.lowbit").exists()


def test_a_quantized_estimator_clones_refits_and_runs_inside_a_grid_search(tmp_path):
    from sklearn.base import clone
    from sklearn.model_selection import GridSearchCV

    features, labels = load_breast_cancer(return_X_y=True)
    train, test, train_labels, test_labels = features[:400], features[400:], labels[:400], labels[400:]
    fitted = make_pipeline(StandardScaler(), LogisticRegression()).fit(train, train_labels)
    quantized = lowbit_sklearn.quantize(fitted, bits=8, data=test)
    cloned = clone(quantized)
    assert cloned.get_params(deep=False)["bits"] == 8
    assert not hasattr(cloned, "estimator_")  # a clone is unfitted, as scikit-learn's contract says
    assert np.array_equal(cloned.fit(train, train_labels).predict(test), quantized.predict(test))
    search = GridSearchCV(
        lowbit_sklearn.QuantizedEstimator(make_pipeline(StandardScaler(), LogisticRegression())),
        {"estimator__logisticregression__C": [0.1, 1.0]}, cv=3)
    search.fit(train, train_labels)
    best = search.best_estimator_
    assert best.verified and best.prediction_differences == 0  # guarded on its training data
    assert search.score(test, test_labels) > 0.9
    reloaded = lowbit_sklearn.load(best.save(tmp_path / "best.lowbit"))
    assert np.array_equal(reloaded.predict(test), best.predict(test))


def test_the_guard_generalises_to_rows_it_never_saw():
    """The case that changed 6 of 2,000 unseen predictions: a character n-gram TF-IDF + SGD
    pipeline guarded on 500 training texts. The guard keeps a fifth of its data aside, bounds the
    margin shift by the density of rows near the boundary, and reports what it measured."""
    from sklearn.linear_model import SGDClassifier
    from sklearn.pipeline import make_pipeline

    from lowbit.data import assets

    documents = assets.across_topics(assets.wikipedia_documents())
    texts, topics = [d["extract"] for d in documents], [d["topic"] for d in documents]
    characters = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), min_df=2, sublinear_tf=True)
    model = make_pipeline(characters, SGDClassifier(random_state=0)).fit(texts[:4000], topics[:4000])
    quantized = lowbit_sklearn.quantize(model, bits=8, data=texts[:500])
    unseen = texts[6000:8000]
    assert np.array_equal(quantized.predict(unseen), model.predict(unseen))
    check = quantized.report()["held_out"]
    assert check["rows"] == 100 and check["changed"] == 0
    assert check["estimated_flip_rate"] <= 1e-4 and check["ci95"][0] == 0.0
    assert quantized.encodings["model.steps[1][1].coef_"].encoding != "exact"  # still quantized


def test_probabilities_stay_within_the_tolerance_off_the_check_set():
    from sklearn.datasets import load_digits
    from sklearn.naive_bayes import GaussianNB

    features, labels = load_digits(return_X_y=True)
    model = GaussianNB().fit(features[:900], labels[:900])
    quantized = lowbit_sklearn.quantize(model, bits=8, data=features[:450], probability_tolerance=0.01)
    unseen = features[900:]
    assert np.abs(quantized.predict_proba(unseen) - model.predict_proba(unseen)).max() <= 0.01


def test_flip_rate_interval_is_the_exact_binomial_one():
    from lowbit.families.sklearn.guard import flip_rate

    none = flip_rate(0, 200)
    assert none["rate"] == 0 and none["ci95"][0] == 0 and none["ci95"][1] == pytest.approx(0.0183, abs=1e-4)
    some = flip_rate(3, 100)
    assert some["ci95"][0] == pytest.approx(0.0062, abs=1e-4)
    assert some["ci95"][1] == pytest.approx(0.0852, abs=1e-4)


def test_the_guard_ends_when_the_original_itself_answers_nan_or_inf():
    """Reference rows on which the original's scores are inf and its probabilities NaN: those
    rows cannot be judged, the others still are, and the guard finishes."""
    rng = np.random.default_rng(0)
    features, labels = rng.normal(size=(300, 5)), rng.integers(0, 3, 300)
    model = LogisticRegression(max_iter=500).fit(features, labels)
    model.coef_ = model.coef_ * 1e4
    reference = features.copy()
    reference[:3] = 1e306 * np.sign(model.coef_[0])
    with np.errstate(all="ignore"):
        quantized = lowbit_sklearn.quantize(model, bits=8, data=reference)
        assert np.array_equal(quantized.predict(features), model.predict(features))

"""lowbit for scikit-learn on real models: joblib pickle vs lowbit file, side by side.

Trains, on real data: TF-IDF + LogisticRegression / MultinomialNB / LinearSVC on the Wikipedia
topic corpus (12 topics, and a binary one-topic-vs-rest model), an MLP and a RandomForest on
digits, a HistGradientBoosting on breast_cancer. Each is saved with joblib, quantized with
`lowbit.sklearn.quantize_model_file(bit_depth=8, data=held-out split)` and measured: file sizes,
reduction, prediction differences of the reloaded file on the held-out split, load time and
predictions/s of both. Writes bench/results/sklearn.json.

    .venv/bin/python -m bench.sklearn_models
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import joblib
import numpy as np
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.model_selection import train_test_split
from sklearn.naive_bayes import MultinomialNB
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.svm import LinearSVC

import lowbit.sklearn
from bench.common import print_table, write_json
from lowbit.data import assets


def text_split():
    documents = assets.wikipedia_documents()
    order = np.random.default_rng(0).permutation(len(documents))
    texts = [documents[i]["extract"] for i in order]
    topics = np.array([documents[i]["topic"] for i in order])
    cut = int(0.8 * len(texts))
    return texts[:cut], topics[:cut], texts[cut:]


def halves(inputs):
    """(rows the guard sees, rows it never sees): the held-out split cut in two."""
    middle = len(inputs) // 2
    return inputs[:middle], inputs[middle:]


def models():
    """(name, fitted model, held-out inputs) for every model of the table."""
    train, topics, held_out = text_split()
    first_topic = topics[0]
    for name, classifier in (("tfidf+logreg", LogisticRegression(max_iter=1000)),
                             ("tfidf+multinomialNB", MultinomialNB()), ("tfidf+linearSVC", LinearSVC())):
        yield name, make_pipeline(TfidfVectorizer(), classifier).fit(train, topics), held_out
    binary = make_pipeline(TfidfVectorizer(), LogisticRegression(max_iter=1000))
    yield f"tfidf+logreg binary ({first_topic} vs rest)", binary.fit(train, topics == first_topic), held_out
    characters = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), min_df=2, sublinear_tf=True)
    yield "char n-gram tfidf+SGD", make_pipeline(characters, SGDClassifier(random_state=0)).fit(
        train[:4000], topics[:4000]), held_out
    digits, digit_labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, _ = train_test_split(digits, digit_labels, test_size=0.25, random_state=0)
    network = MLPClassifier(hidden_layer_sizes=(64,), max_iter=500, random_state=0)
    yield "digits MLP", network.fit(x_train, y_train), x_test
    yield "digits RandomForest", RandomForestClassifier(100, random_state=0).fit(x_train, y_train), x_test
    cancer, cancer_labels = load_breast_cancer(return_X_y=True)
    x_train, x_test, y_train, _ = train_test_split(cancer, cancer_labels, test_size=0.25, random_state=0)
    yield "breast_cancer HistGradientBoosting", HistGradientBoostingClassifier(random_state=0).fit(
        x_train, y_train), x_test


def fallback_summary(fallbacks: dict[str, list[str]]) -> str:
    """'3 arrays fell back: 2 to int16-rows, 1 to float32 (e.g. coef_, idf_)'."""
    if not fallbacks:
        return "no array fell back"
    finals = Counter(steps[-1] for steps in fallbacks.values())
    names = Counter(path.rpartition(".")[2] for path in fallbacks)
    return (f"{len(fallbacks)} arrays fell back: " + ", ".join(f"{n} to {rung}" for rung, n in finals.items())
            + " (" + ", ".join(f"{name} ×{n}" for name, n in names.most_common(4)) + ")")


def unseen_differences(model, path: Path, unseen) -> int:
    """Predictions of the reloaded lowbit file that differ from the original's on rows the
    guard never saw."""
    reloaded = lowbit.sklearn.load(path)
    return int(np.sum(np.asarray(reloaded.predict(unseen)) != np.asarray(model.predict(unseen))))


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as scratch:
        for index, (name, model, held_out) in enumerate(models()):
            seen, unseen = halves(held_out)
            source, target = Path(scratch) / f"{index}.joblib", Path(scratch) / f"{index}.lowbit"
            joblib.dump(model, source)
            report = lowbit.sklearn.quantize_model_file(source, target, 8, data=seen, trust_pickle=True)
            rows.append({"model": name, "guard_rows": len(seen), "unseen_rows": len(unseen), **report,
                         "unseen_differences": unseen_differences(model, target, unseen)})
    print_table("scikit-learn models: joblib pickle vs lowbit file (8-bit start, guarded on half the "
                "held-out data, checked on the other half)",
                rows, [("model", "model"), ("original_size_bytes", "joblib bytes"),
                       ("quantized_size_bytes", "lowbit bytes"), ("file_size_reduction_percent", "smaller %"),
                       ("prediction_differences", "guard-set diff."),
                       ("unseen_differences", "unseen diff."), ("unseen_rows", "unseen rows"),
                       ("original_load_seconds", "joblib load s"),
                       ("quantized_load_seconds", "lowbit load s"),
                       ("original_predictions_per_second", "joblib pred/s"),
                       ("quantized_predictions_per_second", "lowbit pred/s"),
                       ("quantize_seconds", "quantize s")])
    for row in rows:
        check = row.get("held_out") or {}
        estimate = (f"; guard's own held-out check: {check['changed']} of {check['rows']} changed "
                    f"(95% ≤ {check['ci95'][1]:.2%}), estimated flip rate {check['estimated_flip_rate']:.1e}"
                    if check else "")
        print(f"{row['model']}: {fallback_summary(row['fallbacks'])}{estimate}")
    print(f"results: {write_json('sklearn', {'rows': rows})}")


if __name__ == "__main__":
    main()

"""Small utilities for reading tabular data and scoring classifiers.

This file is a perplexity sample for `etpo perplexity`: ordinary, idiomatic Python of the
kind the model writes during training, so a trained adapter should not make it less likely.
"""

import csv
import math
from collections import Counter


def read_table(path, target):
    """Read a CSV file and split it into feature rows and a list of labels."""
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    if not rows:
        raise ValueError(f"{path} has no data rows")
    features = [name for name in rows[0] if name != target]
    x = [[float(row[name]) for name in features] for row in rows]
    y = [row[target] for row in rows]
    return features, x, y


def train_test_split(x, y, fraction=0.5, seed=0):
    """Shuffle the rows with a fixed seed and cut them into a training and a test part."""
    import random

    order = list(range(len(x)))
    random.Random(seed).shuffle(order)
    cut = int(len(order) * fraction)
    train, test = order[:cut], order[cut:]
    return (
        [x[i] for i in train],
        [y[i] for i in train],
        [x[i] for i in test],
        [y[i] for i in test],
    )


def majority_baseline(y_train, y_test):
    """Accuracy of always predicting the most common training label."""
    label, _ = Counter(y_train).most_common(1)[0]
    hits = sum(1 for value in y_test if value == label)
    return hits / len(y_test)


def log_loss(y_true, probabilities, eps=1e-12):
    """Mean negative log-likelihood of the true labels under predicted probabilities."""
    total = 0.0
    for label, row in zip(y_true, probabilities):
        p = min(max(row[label], eps), 1.0 - eps)
        total -= math.log(p)
    return total / len(y_true)


def build_model(x_train, y_train):
    """Fit a random forest with a fixed seed and return it."""
    from sklearn.ensemble import RandomForestClassifier

    model = RandomForestClassifier(n_estimators=200, max_depth=None, random_state=0)
    model.fit(x_train, y_train)
    return model


if __name__ == "__main__":
    names, x, y = read_table("data.csv", target="class")
    x_train, y_train, x_test, y_test = train_test_split(x, y)
    print("features:", ", ".join(names))
    print("majority baseline:", round(majority_baseline(y_train, y_test), 3))
    model = build_model(x_train, y_train)
    print("test accuracy:", round(model.score(x_test, y_test), 3))

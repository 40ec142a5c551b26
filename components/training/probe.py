"""Linear and k-NN probes: how well frozen backbone features separate the target's classes, in seconds.

A cheap signal, before fine-tuning spends the compute, of whether a source is worth transferring:
the features are the backbone's output for each image (the model's head is not used); a
logistic regression and a k-nearest-neighbour vote (cosine) are fitted on the target's train split
and scored on its val split. Near chance, the source's features carry nothing the target can use.
"""

from __future__ import annotations

import time

import keras
import numpy as np

from components.data.dataset import Split
from components.data.stream import predict
from components.training.models import HEAD_NAME

NEIGHBOURS = 5


def feature_model(model: keras.Model) -> keras.Model:
    """The model without its head: the backbone's features (what the head reads; dropout is off at inference)."""
    if HEAD_NAME not in {layer.name for layer in model.layers}:
        return model  # headless already (a downloaded or self-supervised source)
    return keras.Model(model.inputs, model.get_layer(HEAD_NAME).input, name="features")


def probe(model: keras.Model, train: Split, val: Split, images: int, set_head: bool = False) -> dict[str, float | int]:
    """Linear-probe and k-NN accuracy of the model's backbone features on val, fitted on train.

    Each split contributes at most `images` images (transfer.probe_images), spread evenly over it
    (splits are sorted by class, so every class shows): their features are held in memory, which
    must not grow with the data. set_head: the model's softmax head takes the linear probe's weights
    (transfer.head_init: probe), so fine-tuning starts from a head that already fits the features.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    started = time.perf_counter()
    extractor = feature_model(model)
    train_at, val_at = train.spread(images), val.spread(images)
    train_x, val_x = (np.asarray(predict(extractor, split, positions=at), dtype="float64")
                      for split, at in ((train, train_at), (val, val_at)))
    train_y, val_y = train.y[train_at], val.y[val_at]
    mean, std = train_x.mean(axis=0), train_x.std(axis=0) + 1e-6
    linear = LogisticRegression(max_iter=2000).fit((train_x - mean) / std, train_y)
    linear_accuracy = float(np.mean(linear.predict((val_x - mean) / std) == val_y))
    if set_head:
        _set_head(model, linear, mean, std, len(train.classes))
    # Never more neighbours than the smallest class has images: 5 neighbours of 1 image per class vote for anything.
    k = max(1, min(NEIGHBOURS, int(np.bincount(train_y, minlength=len(train.classes)).min())))
    knn = KNeighborsClassifier(n_neighbors=k, metric="cosine").fit(train_x, train_y)
    knn_accuracy = float(np.mean(knn.predict(val_x) == val_y))
    return {
        "linear_probe_accuracy": round(linear_accuracy, 6),
        "knn_accuracy": round(knn_accuracy, 6),
        "knn_k": k,
        "chance": round(1.0 / len(train.classes), 6),
        "train_images": len(train_at),
        "val_images": len(val_at),
        "features": int(train_x.shape[1]),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _set_head(model: keras.Model, linear, mean: np.ndarray, std: np.ndarray, classes: int) -> None:
    """Write the logistic regression (fitted on standardized features) into the Dense softmax head.

    The standardization folds into the weights: w.(x - mean)/std + b = (w/std).x + (b - w.(mean/std)).
    A class the train sample lacks gets a large negative bias; a binary fit has one row of weights,
    the logit of class 1 against class 0's zero.
    """
    coef, intercept = linear.coef_, linear.intercept_
    if coef.shape[0] == 1:  # scikit-learn's binary fit
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    kernel = np.zeros((coef.shape[1], classes))
    bias = np.full(classes, -30.0)
    kernel[:, linear.classes_] = (coef / std).T
    bias[linear.classes_] = intercept - coef @ (mean / std)
    model.get_layer(HEAD_NAME).set_weights([kernel.astype("float32"), bias.astype("float32")])
